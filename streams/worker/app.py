"""The Faust worker: inference logs and training stats in, alerts and dead letters out.

One agent per input topic runs :class:`streams.pipeline.Pipeline` (the code
``replay`` runs) on batches of Kafka records; each record may hold a JSON array
of events, all of one partition.

State and exact recovery
------------------------
Per-key detector state (a client of a model, a source of a dataset) lives in
Faust tables with changelogs (RocksDB on disk). Writing every touched key after
every batch would send ~20 KiB per client per batch to the changelog, so the
worker keeps working copies in memory and *checkpoints* every ``CHECKPOINT_S``
(the first after a rebalance at once). Under the batch lock it takes a cut: the
changed keys serialized (with the partition and offset of the last record
applied to each), the alerts and dead letters sent and the records judged so
far. Then, while judging goes on, it waits until those alerts and dead letters
are acknowledged, writes the keys and waits for them, and only then acknowledges
the records, which lets Faust commit their offsets. So a committed offset never
runs ahead of the state, and after a kill -9 the records after the last commit
are read again: a key whose stored state already holds a record skips it, the
others apply it. The state comes back equal to that of an uninterrupted run, and
an alert raised again carries the same ``event.id``.

Population baselines span partitions: each partition's clients are summed per
shard (rebuilt from the restored client states after a restart or rebalance);
at each event-time epoch a shard publishes its snapshot to a global table, and
rules read the sum of all shards' latest snapshots. With several workers a
shard that lags behind contributes its previous epoch's snapshot for a while:
that is the bounded difference to ``replay``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import struct
import sys
import time
import weakref
from collections import Counter
from collections.abc import Iterator, MutableMapping

import faust
import msgspec
import numpy as np
from faust.streams import _current_event

from detectors.clients import ClientState, Population
from detectors.config import Thresholds
from detectors.poisoning import SourceState
from detectors.profile import Profile
from detectors.state import dumps, loads
from streams.metrics import WorkerMetrics
from streams.pipeline import Pipeline
from streams.records import dead_letter_id, screen
from streams.settings import Settings
from streams.sinks.base import Outbox
from streams.worker.transport import faust_broker_urls

TAKE = 10_000        # records per processing batch at most
WITHIN_S = 0.05      # ... or what arrived within this time
# Detectors cost ~0.3 ms per client per batch on top of the per-event cost: under a
# backlog, batches must be large, so fetch far more than Faust's 1 MiB per partition.
FETCH_BYTES = 16 << 20
# State to the changelog, then offsets may be committed. Every checkpoint writes each
# key changed since the last (~20 KiB a client): at 5,000 events/s from 1,000 clients
# 660 keys a second at 1 s, 200 at 5 s. The first after an assignment comes at once,
# so a new worker commits within a second of its first batch.
CHECKPOINT_S = 5.0
TICK_S = 1.0
WRITE_SLICE = 64         # changelog writes in flight at most (~1.3 MB)
WRITE_PAUSE_S = 0.02
SEND_TIMEOUT_S = 30.0
# A dead letter must fit in one produce request (Faust's producer: 1,000,000 bytes): a
# longer record is forwarded cut to this size, with its size in the headers.
DEAD_LETTER_VALUE_MAX = 512 << 10
DEAD_LETTER_KEY_MAX = 4 << 10
REASON_MAX = 1000  # characters of a reason in a header (a reason may quote the record)
_APPLIED = struct.Struct("<iq")  # partition, offset of the last record applied to a key


class KeyedStates(MutableMapping):
    """Working copies of per-key detector state, backed by a Faust table.

    Read from the table on first use; written back at checkpoints, each value
    prefixed with the partition and offset of the last record applied to it.
    """

    def __init__(self, table, cls):
        self.table, self.cls = table, cls
        self.live: dict[str, object] = {}
        self.applied: dict[str, tuple[int, int]] = {}
        self.dirty: set[str] = set()
        self.deleted: dict[str, int] = {}  # evicted keys -> partition, for a tombstone
        self.position: tuple[int, int] = (-1, -1)  # the records being applied now

    def _load(self, key: str) -> bool:
        if key in self.live:
            return True
        if key in self.deleted:  # evicted; the table still has it until the next checkpoint
            return False
        blob = self.table.get(key.encode())
        if blob is None:
            return False
        partition, offset = _APPLIED.unpack_from(blob)
        self.live[key] = loads(self.cls, blob[_APPLIED.size:])
        self.applied[key] = (partition, offset)
        return True

    def holds(self, key: str, partition: int, offset: int) -> bool:
        """Whether the state of ``key`` already includes that record."""
        if not self._load(key):
            return False
        applied = self.applied.get(key)
        return applied is not None and applied[0] == partition and offset <= applied[1]

    def __getitem__(self, key: str):
        if not self._load(key):
            raise KeyError(key)
        return self.live[key]

    def __setitem__(self, key: str, state) -> None:
        self.live[key] = state
        self.applied[key] = self.position
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
            partition, offset = self.applied[key]
            if partition in partitions:
                out.append((self.table, partition, key.encode(),
                            _APPLIED.pack(partition, offset) + dumps(self.live[key])))
        for key, partition in sorted(self.deleted.items()):
            if partition in partitions:
                out.append((self.table, partition, key.encode(), None))
        self.dirty.clear()
        self.deleted.clear()
        return out

    def forget(self, partitions: set[int]) -> list[str]:
        """Drop working copies of partitions this worker no longer owns; returns their keys."""
        gone = [k for k, (p, _) in self.applied.items() if p in partitions]
        for key in gone:
            self.live.pop(key, None)
            self.applied.pop(key, None)
            self.dirty.discard(key)
        for key in [k for k, p in self.deleted.items() if p in partitions]:
            del self.deleted[key]  # its next owner still has it: it evicts by its own caps
        return gone

    def restored(self, partition: int) -> Iterator[tuple[str, object]]:
        """Every stored key of a partition, loaded into the working copies."""
        for raw_key, blob in list(self.table.items()):
            if blob is None or _APPLIED.unpack_from(blob)[0] != partition:
                continue
            key = raw_key.decode()
            if self._load(key):
                yield key, self.live[key]


class SharedSnapshots(MutableMapping):
    """Population snapshots per "model/shard" in a global table; writes wait for
    the next checkpoint, reads decode once per stored version."""

    def __init__(self, table):
        self.table = table
        self.local: dict[str, Population] = {}
        self.dirty: set[str] = set()
        self.deleted: set[str] = set()  # an evicted unprofiled model's shards
        self._decoded: dict[str, tuple[bytes, Population]] = {}

    def __getitem__(self, key: str) -> Population:
        if key in self.deleted:
            raise KeyError(key)
        if key in self.local:
            return self.local[key]
        blob = self.table.get(key.encode())
        if blob is None:
            raise KeyError(key)
        cached = self._decoded.get(key)
        if cached is None or cached[0] != blob:
            cached = self._decoded[key] = (blob, loads(Population, blob))
        return cached[1]

    def __setitem__(self, key: str, snapshot: Population) -> None:
        self.local[key] = snapshot
        self.dirty.add(key)
        self.deleted.discard(key)

    def __delitem__(self, key: str) -> None:
        self.local.pop(key, None)
        self.dirty.discard(key)
        self._decoded.pop(key, None)
        self.deleted.add(key)

    def __iter__(self) -> Iterator[str]:
        keys = {k.decode() for k in list(self.table.keys())} | set(self.local)
        return iter(sorted(keys - self.deleted))

    def __len__(self) -> int:
        return len(set(self))

    def snapshot(self, partitions: set[int]) -> list[tuple]:
        """Like :meth:`KeyedStates.snapshot`; the snapshots stay readable here until
        :meth:`written`."""
        out = []
        for key in sorted(self.dirty):
            shard = int(key.rsplit("/", 1)[1])
            if shard in partitions:
                out.append((self.table, shard, key.encode(), dumps(self.local[key])))
        for key in sorted(self.deleted):
            shard = int(key.rsplit("/", 1)[1])
            if shard in partitions:
                out.append((self.table, shard, key.encode(), None))
        self.dirty.clear()
        return out

    def written(self) -> None:
        """The table holds every snapshot not changed since: read them from there."""
        for key in [k for k in self.local if k not in self.dirty]:
            del self.local[key]
        self.deleted = {k for k in self.deleted if self.table.get(k.encode()) is not None}


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


def dead_letter_record(topic: str, partition: int, offset: int, element: int | None,
                       key: bytes | None, value: bytes | None, reason: str):
    """(key, value, headers) of the dead letter for a record, or one element of it.

    Headers: ``reason``; ``id``, the same for the same record after any restart
    (:func:`streams.records.dead_letter_id`), to drop repeats by; ``source``,
    "topic/partition/offset"; ``element``, the index in an array record; and, for
    a key or value cut to fit, ``original-key-size`` / ``original-size``.
    """
    if len(reason) > REASON_MAX:
        reason = reason[:REASON_MAX] + "…"
    headers = [("reason", reason.encode("utf-8", "replace")),
               ("id", dead_letter_id(topic, partition, offset, element).encode()),
               ("source", f"{topic}/{partition}/{offset}".encode())]
    if element is not None:
        headers.append(("element", str(element).encode()))
    if key is not None and len(key) > DEAD_LETTER_KEY_MAX:
        headers.append(("original-key-size", str(len(key)).encode()))
        key = bytes(key[:DEAD_LETTER_KEY_MAX])
    if value is not None and len(value) > DEAD_LETTER_VALUE_MAX:
        headers.append(("original-size", str(len(value)).encode()))
        value = bytes(value[:DEAD_LETTER_VALUE_MAX])
    return key, value, headers


async def _halt() -> None:
    """Wait, judging nothing, until the crash stops the worker. An agent that returned
    would be restarted and take its next batch, and taking a batch acknowledges the
    one before: the failed one, whose offsets Faust could then commit."""
    await asyncio.Event().wait()


def build_app(settings: Settings, profiles: list[Profile], thresholds: Thresholds, *,
              partitions: dict[str, int], metrics: WorkerMetrics | None = None,
              outboxes: list[Outbox] = ()) -> faust.App:
    """The worker's Faust app; ``partitions`` gives each input topic's partition count,
    ``outboxes`` the alert outputs besides the alerts topic."""
    app = faust.App(
        "modelwatch",
        broker=faust_broker_urls(settings.broker),
        broker_credentials=_credentials(settings),
        store="rocksdb://",
        datadir=str(settings.state_dir),
        broker_session_timeout=10,  # a new group joins in ~5 s on Tansu, not ~30 s
        producer_acks=-1,
        web_enabled=False,
        topic_disable_leader=True,
        stream_wait_empty=False,    # un-acked records are read again by the next owner
        consumer_max_fetch_size=FETCH_BYTES,
        stream_buffer_maxsize=TAKE,
    )
    n_inference = partitions[settings.topic_inference]
    n_stats = partitions[settings.topic_stats]
    inference = app.topic(settings.topic_inference, key_serializer="raw", value_serializer="raw")
    stats = app.topic(settings.topic_stats, key_serializer="raw", value_serializer="raw")
    alerts_topic = app.topic(settings.topic_alerts, key_serializer="raw", value_serializer="raw")
    dead_topic = app.topic(settings.topic_deadletter, key_serializer="raw", value_serializer="raw")
    raw = {"key_type": bytes, "value_type": bytes}  # Faust stores bytes types as raw
    clients = KeyedStates(app.Table("clients", partitions=n_inference, **raw), ClientState)
    sources = KeyedStates(app.Table("sources", partitions=n_stats, **raw), SourceState)
    shared = SharedSnapshots(app.GlobalTable("populations", partitions=n_inference, **raw))
    pipeline = Pipeline(profiles, thresholds, clients=clients, sources=sources, shared=shared)
    encoder = msgspec.json.Encoder()
    lock = asyncio.Lock()          # batches, checkpoint cuts and rebalances, one at a time
    checkpointing = asyncio.Lock()  # a checkpoint from its cut until its records are acked
    held: list = []            # events processed but not yet acknowledged
    next_offset: dict[tuple[str, int], int] = {}  # per partition, in this generation
    restored: set[int] = set()  # inference partitions whose population is rebuilt

    metrics = metrics or WorkerMetrics()
    reported_evictions = dict(pipeline.counters.evictions)
    read_up_to: dict[tuple[str, int], int] = {}  # (topic, partition) -> next offset to judge

    sends: list = []  # alerts and dead letters not yet known to be on the broker
    failed: list[BaseException] = []  # an agent failed: nothing is acknowledged any more

    async def dead_letter(topic: str, partition: int, offset: int, element: int | None,
                          key, raw_value: bytes | None, reason: str) -> None:
        metrics.invalid(topic, reason)
        key, value, headers = dead_letter_record(topic, partition, offset, element, key,
                                                 raw_value, reason)
        sends.append(await dead_topic.send(key=key, value=value, headers=headers))

    async def fail(agent: str, exc: BaseException) -> None:
        """An agent could not judge a batch: stop the worker, acknowledging nothing
        more (the records from the last commit on are read again at the next start).
        Called under the batch lock, so no checkpoint cut holds the failed batch."""
        if not failed:
            print(f"worker: {agent} failed ({type(exc).__name__}: {exc}); stopping without "
                  "committing what it did not judge", file=sys.stderr, flush=True)
        failed.append(exc)
        held.clear()
        sends.clear()
        await app.crash(exc)

    async def publish(alerts) -> None:
        for alert in alerts:
            sends.append(await alerts_topic.send(key=alert.event.id.encode(),
                                                 value=encoder.encode(alert)))
        if alerts:
            metrics.sink("kafka", delivered=len(alerts))
            as_dicts = [msgspec.to_builtins(a) for a in alerts]
            for alert in as_dicts:
                metrics.alert(alert)
            for outbox in outboxes:
                outbox.offer(as_dicts)

    def observe(topic: str, batch, started: float) -> None:
        metrics.kafka_records(topic, len(batch))
        metrics.processing(topic, time.perf_counter() - started)
        for event in batch:
            tp = (topic, event.message.partition)
            read_up_to[tp] = max(read_up_to.get(tp, 0), event.message.offset + 1)

    def report_state() -> None:
        for (topic, partition), offset in list(read_up_to.items()):
            highwater = app.consumer.highwater(faust.types.TP(topic, partition))
            if highwater is not None:
                metrics.consumer_lag(topic, partition, max(0, highwater - offset))
        metrics.tracked("client", len(clients.live))
        for reason, n in pipeline.counters.evictions.items():
            if n > reported_evictions[reason]:
                metrics.evicted(reason, n - reported_evictions[reason])
                reported_evictions[reason] = n
        metrics.tracked("source", len(sources.live))
        # The detector thread adds keys meanwhile: iterate over copies.
        metrics.state_bytes(sum(map(state_size, list(clients.live.values())))
                            + sum(map(state_size, list(sources.live.values()))))
        for outbox in outboxes:
            delivered, failed, dropped = outbox.take_counts()
            metrics.sink(outbox.name, delivered=delivered, failed=failed, dropped=dropped)

    assigned: set[tuple[str, int]] = set()  # kept by the rebalance handlers below

    def owned(topic: str) -> set[int]:
        return {p for t, p in assigned if t == topic}

    checkpoint_due = 0.0  # monotonic time

    async def checkpoint() -> None:
        nonlocal checkpoint_due
        # One at a time, and a revocation waits for the one under way: a write sent
        # late could otherwise land after the next owner's.
        async with checkpointing:
            async with lock:  # a consistent cut between batches; judging goes on after it
                if not held or failed:
                    return
                checkpoint_due = time.monotonic() + CHECKPOINT_S
                alert_sends, sends[:] = sends[:], []
                events, held[:] = held[:], []
                inference_owned = owned(settings.topic_inference)
                writes = (clients.snapshot(inference_owned) + shared.snapshot(inference_owned)
                          + sources.snapshot(owned(settings.topic_stats)))
                pipeline.refresh_populations()  # other workers' shards may have moved on
            # Alerts and dead letters on the broker first, then the state, then the acks:
            # a state that holds a record is never stored before the record's alerts.
            await delivered(alert_sends)
            await write_paced(writes)
            shared.written()
            for event in events:  # a partition given away is read again by its next owner
                if (event.message.topic, event.message.partition) in assigned:
                    event.ack()

    async def delivered(futures: list) -> None:
        """Wait until the broker acknowledged these sends. If it does not, stop: the
        records after the last commit are read again by the next worker, so nothing
        is lost, where going on would acknowledge records whose effects may be."""
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):  # wait_for may lose a cancel
                await asyncio.gather(*futures)
        except Exception as exc:
            await app.crash(RuntimeError(f"checkpoint: sends not acknowledged: {exc!r}"))
            raise

    async def write_paced(writes: list[tuple]) -> None:
        """:func:`write` each (table, partition, key, value) and wait for them,
        ``WRITE_SLICE`` at a time: a checkpoint writes up to a few thousand ~20 KiB
        values, and sent in one go they held up fetching (and so the alerts) for
        half a second."""
        for start in range(0, len(writes), WRITE_SLICE):
            if start:
                await asyncio.sleep(WRITE_PAUSE_S)
            await delivered([write(*item) for item in writes[start:start + WRITE_SLICE]])

    def hold(batch) -> list:
        """Keep a batch's records from being acknowledged until a checkpoint holds their
        effects; return those to judge, in offset order per partition, each once.

        Records fetched before a rebalance can still sit in the batch: they are never
        acknowledged (their partition is read again from its committed offset), and a
        record already judged in this generation is not judged twice.
        """
        for event in batch:
            event.message.incref()  # take_events acknowledges on return; we do after checkpoint
        generation = app.consumer_generation_id
        fresh = sorted((e for e in batch if e.message.generation_id == generation
                        and (e.message.topic, e.message.partition) in assigned),
                       key=lambda e: (e.message.topic, e.message.partition, e.message.offset))
        judge = []
        for event in fresh:
            tp = (event.message.topic, event.message.partition)
            if event.message.offset >= next_offset.get(tp, 0):
                next_offset[tp] = event.message.offset + 1
                judge.append(event)
        held.extend(judge)
        return judge

    @app.agent(inference)
    async def judge_inference(stream):
        loop = asyncio.get_running_loop()
        async for batch in stream.take_events(TAKE, within=WITHIN_S):
            started = time.perf_counter()
            async with lock:
                if failed:
                    await _halt()
                try:
                    by_partition: dict[int, list] = {}
                    for event in hold(batch):
                        by_partition.setdefault(event.message.partition, []).append(event)
                    # The detectors run in a thread, so the event loop keeps fetching and
                    # the next batch grows while this one is judged (bigger batches cost
                    # less per event).
                    rejected, alerts = await loop.run_in_executor(
                        None, judge_partitions, by_partition)
                    for partition, offset, element, key, reason, raw_value in rejected:
                        await dead_letter(settings.topic_inference, partition, offset, element,
                                          key, raw_value, reason)
                    await publish(alerts)
                except Exception as exc:
                    await fail("judge_inference", exc)
                    await _halt()
            observe(settings.topic_inference, batch, started)

    def judge_partitions(by_partition: dict[int, list]) -> tuple[list, list]:
        rejected, alerts = [], []
        for partition, events in by_partition.items():
            if partition not in restored:
                pipeline.restore_shard(partition, clients.restored(partition))
                restored.add(partition)
            result = screen(((e.value, (e.key, e.message.offset)) for e in events),
                            pipeline.reject_reason)
            rejected += [(partition, offset, element, key, reason, raw)
                         for ((key, offset), reason, raw), element
                         in zip(result.rejected, result.elements, strict=True)]
            if not result.events:
                continue
            metrics.event_lag(settings.topic_inference, time.time() - result.ts)
            keep = [i for i, (event, (_, offset))
                    in enumerate(zip(result.events, result.tags, strict=True))
                    if not clients.holds(f"{event.model}/{event.client_id}", partition, offset)]
            if not keep:
                continue
            ts = result.ts[keep]
            order = np.argsort(ts, kind="stable")  # per client, partition order is kept
            clients.position = (partition, events[-1].message.offset)
            judged = [result.events[keep[i]] for i in order]
            for model, n in Counter(e.model for e in judged).items():
                metrics.consumed(settings.topic_inference, model, n)
            alerts += pipeline.process_inference(judged, ts[order], shard=partition)
        return rejected, alerts

    @app.agent(stats)
    async def judge_stats(stream):
        async for batch in stream.take_events(TAKE, within=WITHIN_S):
            started = time.perf_counter()
            async with lock:
                if failed:
                    await _halt()
                try:
                    for event in hold(batch):
                        partition, offset = event.message.partition, event.message.offset
                        record, ts, reason = pipeline.screen_stats(event.value)
                        if reason is not None:
                            await dead_letter(settings.topic_stats, partition, offset, None,
                                              event.key, event.value, reason)
                            continue
                        metrics.consumed(settings.topic_stats, record.dataset, 1)
                        metrics.event_lag(settings.topic_stats, np.array([time.time() - ts]))
                        if sources.holds(f"{record.dataset}/{record.source}", partition, offset):
                            continue
                        sources.position = (partition, offset)
                        await publish(pipeline.process_stats(record, ts))
                except Exception as exc:
                    await fail("judge_stats", exc)
                    await _halt()
            observe(settings.topic_stats, batch, started)

    @app.timer(TICK_S)
    async def checkpoint_timer() -> None:
        report_state()
        if time.monotonic() >= checkpoint_due:
            await checkpoint()

    @app.on_partitions_assigned.connect
    async def take_on(app, assigned_now, **kwargs) -> None:
        nonlocal checkpoint_due
        async with lock:
            assigned.update((tp.topic, tp.partition) for tp in assigned_now)
            checkpoint_due = 0.0
        mine = sorted(p for t, p in assigned if t == settings.topic_inference)
        print(f"worker: {settings.topic_inference} partitions {mine}", file=sys.stderr)
        # A full collection scans every object the libraries made at start: ~90 ms,
        # several times a minute, all in the alert latency. Set them aside.
        gc.collect()
        gc.freeze()

    @app.on_partitions_revoked.connect
    async def forget(app, revoked, **kwargs) -> None:
        """Partitions taken away: drop their working state and un-acknowledged records
        (the next owner reads them again from the committed offset and the tables)."""
        async with checkpointing, lock:  # never in the middle of a batch or checkpoint
            # Records of these partitions still in a buffer must not be judged here any
            # more: their state would skip what this worker judged and then forgot.
            assigned.difference_update((tp.topic, tp.partition) for tp in revoked)
            gone_inference = {tp.partition for tp in revoked
                              if tp.topic == settings.topic_inference}
            gone_stats = {tp.partition for tp in revoked if tp.topic == settings.topic_stats}
            pipeline.forget_keys(clients.forget(gone_inference))
            sources.forget(gone_stats)
            restored.difference_update(gone_inference)
            for partition in gone_inference:
                pipeline.pending.pop(partition, None)
            for tp in revoked:
                next_offset.pop((tp.topic, tp.partition), None)
            held[:] = [e for e in held if e.message.tp not in revoked]

    app.modelwatch_pipeline = pipeline
    return app


def state_size(state) -> int:
    """Bytes held by a detector state's arrays (the bulk of it)."""
    return sum(v.nbytes for v in vars(state).values() if isinstance(v, np.ndarray))


def _credentials(settings: Settings):
    """TLS / SASL settings as Faust credentials (None: plaintext)."""
    import ssl

    context = None
    if settings.tls_ca or settings.tls_cert:
        context = ssl.create_default_context(cafile=str(settings.tls_ca) if settings.tls_ca else None)
        if settings.tls_cert:
            context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    if settings.sasl_mechanism:
        return faust.SASLCredentials(
            username=settings.sasl_username, password=settings.sasl_password,
            mechanism=settings.sasl_mechanism, ssl_context=context)
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def topic_partitions(settings: Settings, topics: list[str]) -> dict[str, int]:
    """Partition count of each topic (8, Faust's default, for one not created yet)."""
    from kafka import KafkaConsumer

    from streams.worker.kafka import client_options

    consumer = KafkaConsumer(**client_options(settings), enable_auto_commit=False)
    try:
        found = {t: consumer.partitions_for_topic(t) for t in topics}
    finally:
        consumer.close()
    return {t: len(p) if p else 8 for t, p in found.items()}
