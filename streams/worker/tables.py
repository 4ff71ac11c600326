"""Per-key detector state in Faust tables, kept as working copies in memory.

:class:`KeyedStates` (clients, training sources) and :class:`SharedSnapshots`
(population snapshots per shard) change in memory while batches are judged and
hand their changes to the checkpoint as ``(table, partition, key, value)``
writes; :func:`write` sends one to the table's changelog outside an agent.
"""

from __future__ import annotations

import contextlib
import struct
import sys
import threading
import time
import weakref
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import faust.tables
import msgspec
import numpy as np
from faust.streams import _current_event
from faust.types import TP

from detectors.clients import Population
from detectors.state import dumps, loads, split
from streams.gcpause import cyclic_gc_paused
from streams.pipeline import GatheredClients, gather_clients, parse_snapshot_key, shard_of_key

OFFSET_KEY = b"__faust\0offset__"  # where Faust's RocksDB store keeps a partition's offset
PREFETCH_SWITCH_S = 0.0005  # the interpreter's switch interval while Prefetch reads

_APPLIED = struct.Struct("<iq")  # partition, offset of the last record applied to a key
# ... then, when the partition field is -(partition + 1), a count and that many
# (offset, element) events of those records not yet applied (waiting for an epoch).
_SKIPPED_COUNT = struct.Struct("<I")
_SKIPPED = struct.Struct("<qi")


def pack_applied(partition: int, offset: int, skipped: tuple = ()) -> bytes:
    """The prefix of a stored state: which records of its partition it holds."""
    if not skipped:
        return _APPLIED.pack(partition, offset)
    return (_APPLIED.pack(-partition - 1, offset) + _SKIPPED_COUNT.pack(len(skipped))
            + b"".join(_SKIPPED.pack(*item) for item in skipped))


def unpack_applied(blob) -> tuple[tuple[int, int, tuple], int]:
    """((partition, offset, skipped), size of the prefix) of a stored state."""
    partition, offset = _APPLIED.unpack_from(blob)
    if partition >= 0:
        return (partition, offset, ()), _APPLIED.size
    (count,) = _SKIPPED_COUNT.unpack_from(blob, _APPLIED.size)
    start = _APPLIED.size + _SKIPPED_COUNT.size
    skipped = tuple(_SKIPPED.unpack_from(blob, start + i * _SKIPPED.size) for i in range(count))
    return (-partition - 1, offset, skipped), start + count * _SKIPPED.size

class KeyedStates(MutableMapping):
    """Working copies of per-key detector state, backed by a Faust table.

    Read from the table on first use; written back at checkpoints, each value
    prefixed with the partition and offset of the last record applied to it, and
    the events of those records it does not hold yet (:func:`pack_applied`).
    """

    def __init__(self, table, cls):
        self.table, self.cls = table, cls
        self.live: dict[str, object] = {}
        self.applied: dict[str, tuple[int, int, tuple]] = {}
        self.dirty: set[str] = set()
        self.deleted: dict[str, int] = {}  # evicted keys -> partition, for a tombstone
        self.position: tuple[int, int] = (-1, -1)  # the records being applied now
        # per key, its events of those records left to apply: (offset, element) pairs
        self.skipped: dict[str, tuple] = {}
        self.prefetch: Prefetch | None = None

    def _load(self, key: str) -> bool:
        if key in self.live:
            return True
        if key in self.deleted:  # evicted; the table still has it until the next checkpoint
            return False
        blob = self.table.get(key.encode())
        if blob is None:
            return False
        applied, size = unpack_applied(blob)
        self.live[key] = loads(self.cls, blob[size:])
        self.applied[key] = applied
        return True

    def holds(self, key: str, partition: int, offset: int, element: int = 0) -> bool:
        """Whether the state of ``key`` already includes that event of that record."""
        if not self._load(key):
            return False
        applied = self.applied.get(key)
        return (applied is not None and applied[0] == partition and offset <= applied[1]
                and (offset, element) not in applied[2])

    def __getitem__(self, key: str):
        if not self._load(key):
            raise KeyError(key)
        return self.live[key]

    def __setitem__(self, key: str, state) -> None:
        self.live[key] = state
        self.applied[key] = (*self.position, self.skipped.get(key, ()))
        self.dirty.add(key)
        self.deleted.pop(key, None)

    def __delitem__(self, key: str) -> None:
        """An evicted key: gone from memory now, from the table (a changelog tombstone,
        so a restart does not bring it back) at the next checkpoint."""
        if not self._load(key):
            raise KeyError(key)
        del self.live[key]
        self.deleted[key] = self.applied.pop(key)[0]
        self.dirty.discard(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.live)

    def __len__(self) -> int:
        return len(self.live)

    def snapshot(self, partitions: set[int]) -> list[tuple]:
        """The changed keys of the partitions still owned, as (table, partition, key,
        value) to :func:`write`; the working copies may change again right after."""
        out = []
        for key in sorted(self.dirty):
            applied = self.applied[key]
            if applied[0] in partitions:
                out.append((self.table, applied[0], key.encode(),
                            pack_applied(*applied) + dumps(self.live[key])))
        for key, partition in sorted(self.deleted.items()):
            if partition in partitions:
                out.append((self.table, partition, key.encode(), None))
        self.dirty.clear()
        self.deleted.clear()
        return out

    def forget(self, partitions: set[int]) -> list[str]:
        """Drop working copies of partitions this worker no longer owns; returns their keys."""
        gone = [k for k, applied in self.applied.items() if applied[0] in partitions]
        for key in gone:
            self.live.pop(key, None)
            self.applied.pop(key, None)
            self.dirty.discard(key)
        for key in [k for k, p in self.deleted.items() if p in partitions]:
            del self.deleted[key]  # its next owner still has it: it evicts by its own caps
        return gone

    def restored(self, partition: int) -> Iterator[tuple[str, object]]:
        """Every stored key of a partition, each as its working copy if loaded, else as a
        :class:`StoredState` view (decoded into a working copy on first use): a restore
        reads a few fields of every client, and most clients come back later, if at all."""
        for raw_key, blob in self._stored(partition):
            if blob is None:
                continue
            key = raw_key.decode()
            if key in self.live:
                yield key, self.live[key]
                continue
            found = None if key in self.deleted else stored_view(self.cls, blob, partition)
            if found is None:
                continue
            self.applied[key] = found[0]  # so forget() knows the key's partition
            yield key, found[1]

    def prefetched(self, partition: int) -> GatheredClients | None:
        """A partition's clients as :class:`Prefetch` read and summed them before the
        assignment, if its database has not changed since and none of them is loaded."""
        if self.prefetch is None:
            return None
        found = self.prefetch.take(partition)
        if found is None:
            return None
        offset, applied, gathered = found
        if (offset != self._persisted_offset(partition) or applied.keys() & self.live.keys()
                or applied.keys() & self.deleted.keys()):
            return None
        self.applied.update(applied)
        return gathered

    def _persisted_offset(self, partition: int) -> int | None:
        """The last changelog offset the partition's database holds (Faust's store)."""
        return self.table.data.persisted_offset(
            TP(self.table.changelog_topic.get_topic_name(), partition))

    def _stored(self, partition: int) -> Iterator[tuple[bytes, bytes]]:
        """A partition's stored (key, value) pairs: from its own RocksDB database
        (Faust's ``items()`` reads every assigned partition's, so restoring 8
        partitions read each value 8 times), else (a dict in tests) all of them."""
        store = getattr(self.table, "data", None)
        dbs = getattr(store, "_dbs", None)  # faust.stores.rocksdb.Store, 0.15.3
        if dbs is None:
            return iter(list(self.table.items()))
        db = dbs.get(partition)
        return iter(()) if db is None else store._visible_items(db)


@contextlib.contextmanager
def read_only(path: Path):
    """A table partition's RocksDB database, opened read-only (Faust may hold it open for
    writing meanwhile: a read-only instance takes no lock and sees the data as it was)."""
    from rocksdict import AccessType, Options, Rdict

    db = Rdict(str(path), options=Options(raw_mode=True), access_type=AccessType.read_only())
    try:
        yield db
    finally:
        db.close()


def stored_offset(db) -> int | None:
    """The last changelog offset a partition's database holds (Faust's offset key)."""
    offset = db.get(OFFSET_KEY)
    return None if offset is None else int(offset)


def stored_view(cls, blob, partition: int) -> tuple[tuple, StoredState] | None:
    """A stored state's applied positions and a view of it, if it is ``partition``'s."""
    applied, size = unpack_applied(blob)
    return (applied, StoredState(cls, blob, size)) if applied[0] == partition else None


def partition_databases(tabledir: Path, table: str) -> dict[int, Path]:
    """partition -> its database of ``table`` in the state folder."""
    found = {}
    for path in Path(tabledir).glob(f"{table}-*.db"):
        partition = path.name.removeprefix(f"{table}-").removesuffix(".db")
        if partition.isdigit():
            found[int(partition)] = path
    return found


class Prefetch:
    """Reads each partition's stored client states from the state folder, and sums them
    as a restore does (:func:`streams.pipeline.gather_clients`), in a thread started as
    the worker joins its group. A restart on the same folder gets its partitions back once
    the group has formed (Tansu holds a join for half the session), and their restores
    used to start only then: ~1 s per 12,500 clients. A partition's restore uses what was
    read if its database still holds the same changelog offset (nothing recovered into it
    since)."""

    def __init__(self, tabledir: Path, table: str, cls):
        self.tabledir, self.table, self.cls = Path(tabledir), table, cls
        self.found: dict[int, tuple[int | None, dict, GatheredClients]] = {}
        self.wanted: set[int] | None = None  # None: not assigned yet, read every partition
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    def start(self) -> None:
        if self.thread.ident is None:
            self.thread.start()

    def running(self) -> bool:
        return self.thread.ident is not None and not self.done.is_set()

    def assigned(self, partitions: set[int]) -> None:
        """Keep only what the worker was given (the rest would only hold memory)."""
        self.wanted = set(partitions)
        for partition in list(self.found):
            if partition not in self.wanted:
                self.found.pop(partition, None)

    def take(self, partition: int) -> tuple[int | None, dict, GatheredClients] | None:
        """What was read of a partition (once): (its offset, key -> applied, sums)."""
        if self.thread.ident is None:  # never started
            return None
        self.done.wait()
        return self.found.pop(partition, None)

    def _run(self) -> None:
        # The event loop meanwhile joins the group and opens the partitions: many short
        # steps, each waiting for this thread to hand over the interpreter (up to 5 ms by
        # default). With 100,000 clients its assignment took 4 s instead of 0.7.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(PREFETCH_SWITCH_S)
        try:
            with cyclic_gc_paused(freeze_after=True):  # long-lived, as in a restore
                for partition, path in sorted(partition_databases(self.tabledir, self.table).items()):
                    if self.wanted is None or partition in self.wanted:
                        self.found[partition] = self._read(partition, path)
        except Exception as exc:  # a restore then reads the database itself
            print(f"worker: could not read stored states ahead of the assignment: {exc!r}",
                  file=sys.stderr, flush=True)
        finally:
            sys.setswitchinterval(switch)
            self.done.set()

    def _read(self, partition: int, path: Path) -> tuple[int | None, dict, GatheredClients]:
        with read_only(path) as db:
            offset = stored_offset(db)
            items = [(k, v) for k, v in db.items() if k != OFFSET_KEY]
        applied, views = {}, []
        for raw_key, blob in items:
            found = stored_view(self.cls, blob, partition)
            if found is not None:
                key = raw_key.decode()
                applied[key] = found[0]
                views.append((key, found[1]))
        return offset, applied, gather_clients(views)


class TableManager(faust.tables.TableManager):
    """Faust's, without the second it sleeps at start for agents to declare their tables:
    this app declares them all before it starts."""

    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


class StoredState:
    """A stored state's fields, read from its blob when asked (arrays not copied, read
    only): what a restore reads of each client (a few numbers and small arrays) costs a
    fraction of decoding the whole state, window included. Fields the blob lacks (stored
    before they existed) come from a full decode, with the class's defaults."""

    def __init__(self, cls, blob: bytes, origin: int = 0):
        raw_header, start = split(blob, origin)
        # msgspec: a third of json.loads's time on a client's header
        header = msgspec.json.decode(raw_header)
        fields = header["s"]
        fields.update(_cls=cls, _blob=blob, _origin=origin, _start=start, _arrays=header["a"],
                      _full=None)
        # The scalars are the instance's attributes: read without a call (a restore reads
        # ~10 fields of each of 100,000 clients; through __getattr__ that was 2 s of CPU).
        self.__dict__ = fields

    def __getattr__(self, name: str):  # arrays, and fields the blob lacks
        if name.startswith("__"):
            raise AttributeError(name)  # copy and pickle probe for special methods
        found = self._arrays.get(name)
        if found is not None:
            dtype, shape, offset, length = found
            start = self._start + offset
            return np.frombuffer(memoryview(self._blob)[start:start + length],
                                 dtype=dtype).reshape(shape)
        if self._full is None:
            self._full = loads(self._cls, self._blob[self._origin:])
        return getattr(self._full, name)


class SharedSnapshots(MutableMapping):
    """Population snapshots and shard marks (:mod:`streams.pipeline`) in a global table.
    Writes wait for the next checkpoint. The shards this worker owns read the table;
    the others read what :meth:`received` was given from the table's changelog (a
    reader of its own: Faust's global tables miss other workers' updates). Reads
    decode once per stored version."""

    def __init__(self, table):
        self.table = table
        self.local: dict[str, Population] = {}
        self.dirty: set[str] = set()
        self.deleted: set[str] = set()  # an evicted unprofiled model's shards
        self.owned: set[int] = set()
        self.remote: dict[str, bytes] = {}  # the changelog as read, every shard
        self._decoded: dict[str, tuple[bytes, Population]] = {}

    def received(self, partition: int, key: bytes | None, value: bytes | None) -> None:
        """A record of the table's changelog (None: a deletion)."""
        if key is None:
            return
        if value is None:
            self.remote.pop(key.decode(), None)
        else:
            self.remote[key.decode()] = value

    def _stored(self, key: str) -> bytes | None:
        if shard_of_key(key) in self.owned:
            return self.table.get(key.encode())
        return self.remote.get(key)

    def __getitem__(self, key: str) -> Population:
        if key in self.deleted:
            raise KeyError(key)
        if key in self.local:
            return self.local[key]
        blob = self._stored(key)
        if blob is None:
            raise KeyError(key)
        cached = self._decoded.get(key)
        if cached is None or (cached[0] is not blob and cached[0] != blob):
            cached = self._decoded[key] = (blob, loads(Population, blob))
        return cached[1]

    def __setitem__(self, key: str, snapshot: Population) -> None:
        self.dirty.add(key)  # first: written() drops local copies that are not dirty
        self.local[key] = snapshot
        self.deleted.discard(key)

    def __delitem__(self, key: str) -> None:
        self.local.pop(key, None)
        self.dirty.discard(key)
        self._decoded.pop(key, None)
        self.deleted.add(key)

    def __iter__(self) -> Iterator[str]:
        owned = {k.decode() for k in list(self.table.keys())}
        keys = ({k for k in owned if shard_of_key(k) in self.owned}
                | {k for k in list(self.remote) if shard_of_key(k) not in self.owned}
                | set(self.local))
        return iter(sorted(keys - self.deleted))

    def __len__(self) -> int:
        return len(set(self))

    def marks_unwritten(self) -> bool:
        """Whether a shard here entered an epoch that other workers cannot see yet."""
        return any(parse_snapshot_key(k) is None for k in self.dirty)

    def snapshot(self, partitions: set[int]) -> list[tuple]:
        """Like :meth:`KeyedStates.snapshot`; the snapshots stay readable here until
        :meth:`written`."""
        out = []
        # A shard's mark goes after its snapshots (the same changelog partition, so in
        # order): a reader that sees the mark finds the snapshots it vouches for.
        for key in sorted(self.dirty, key=lambda k: (parse_snapshot_key(k) is None, k)):
            shard = shard_of_key(key)
            if shard in partitions:
                out.append((self.table, shard, key.encode(), dumps(self.local[key])))
        for key in sorted(self.deleted):
            shard = shard_of_key(key)
            if shard in partitions:
                out.append((self.table, shard, key.encode(), None))
        self.dirty.clear()
        return out

    def forget(self, partitions: set[int]) -> None:
        """Shards given away: drop what they published here and did not write (their
        next owner publishes it again); reads go to the table."""
        for key in [k for k in self.local if shard_of_key(k) in partitions]:
            del self.local[key]
            self.dirty.discard(key)
        self.owned -= partitions

    def written(self) -> None:
        """The table holds every snapshot not changed since: read them from there."""
        # Copies: this runs outside the batch lock, while the detector thread publishes.
        for key in [k for k in list(self.local)
                    if k not in self.dirty and shard_of_key(k) in self.owned]:
            self.local.pop(key, None)
        self.deleted = {k for k in list(self.deleted) if self._stored(k) is not None}


def write(table, partition: int, key: bytes, value: bytes | None):
    """Set a table key outside an agent (``None`` deletes it: a changelog tombstone);
    returns the changelog send to wait for.

    Faust's own ``table[key] = value`` drops that future, and its producer flush
    gives up after 0.1 s without a send: a commit could then run ahead of the state.
    """
    with _as_partition(partition):
        if value is None:
            sent = table.send_changelog(partition, key, None, value_serializer="raw")
            with contextlib.suppress(KeyError):
                del table.data[key]
        else:
            sent = table.send_changelog(partition, key, value)
            table.data[key] = value  # the local store (RocksDB picks its partition database)
    return sent


class _as_partition:
    """Table writes outside an agent: Faust picks the changelog partition (and the
    RocksDB partition) from the current event, so stand in one of that partition."""

    def __init__(self, partition: int):
        self.event = _PartitionEvent(partition)

    def __enter__(self):
        self.token = _current_event.set(weakref.ref(self.event))

    def __exit__(self, *exc):
        _current_event.reset(self.token)


class _PartitionMessage:
    __slots__ = ("partition", "topic", "timestamp")

    def __init__(self, partition: int):
        self.partition, self.topic, self.timestamp = partition, None, time.time()


class _PartitionEvent:
    __slots__ = ("message", "__weakref__")

    def __init__(self, partition: int):
        self.message = _PartitionMessage(partition)
