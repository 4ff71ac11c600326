"""The checkpoint protocol: a committed offset never runs ahead of the state.

Records are judged as they come but acknowledged (which lets Faust commit their
offsets) only once a checkpoint holds their effects. :meth:`Checkpoint.commit`
runs four steps:

1. *cut*, under the batch lock: the records judged so far, the alerts and dead
   letters sent for them, and the changed state (``cut_state``); judging goes
   on right after;
2. wait until the broker acknowledged those alerts and dead letters;
3. write the changed state to the changelog (``write``, ``WRITE_BYTES`` at a
   time) and wait for it;
4. acknowledge the records, except those of partitions given away since, and
   those with events still waiting for other partitions' epochs (``deferred``):
   they stay held for a later commit.

A step that fails stops the worker (``crash``) and the steps after it do not
run: the records after the last commit are read again by the next worker, so
nothing is lost. An agent that fails does the same (:meth:`Checkpoint.judging`),
and from then on nothing more is acknowledged.

Everything that touches Kafka or Faust is passed in, so the protocol is tested
in-process (``tests/test_checkpoint.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable, Iterable

# State to the changelog, then offsets may be committed. Every checkpoint writes each
# key changed since the last (~4-35 KiB a client): at 5,000 events/s from 1,000 clients
# 660 keys a second at 1 s, 200 at 5 s. The first after an assignment comes at once,
# so a new worker commits within a second of its first batch.
CHECKPOINT_S = 5.0
# ... and each tick for this long after an assignment: a restart judges its backlog in
# several batches (and a partition fetched a batch later than the others holds their
# events back), and all but the first were committed one or two intervals later.
SETTLE_S = 15.0
# Changelog writes in flight at most: this many bytes of values (a light client's state
# is ~4 KiB, a heavy one's ~35 KiB), and this many writes.
WRITE_BYTES = 1_300_000
WRITE_SLICE = 1024
WRITE_PAUSE_S = 0.02
SEND_TIMEOUT_S = 30.0
# A hole in a partition's records is read again (at most every HOLE_RETRY_S) until it
# has lasted HOLE_GIVE_UP_S: then its records count as deleted by retention.
HOLE_RETRY_S = 5.0
HOLE_GIVE_UP_S = 60.0
# Records on the broker that reach the worker for none of this long are read again.
STALE_S = 30.0

TP = tuple[str, int]  # (topic, partition)


async def halt() -> None:
    """Wait, judging nothing, until the crash stops the worker. An agent that returned
    would be restarted and take its next batch, and taking a batch acknowledges the
    one before: the failed one, whose offsets Faust could then commit."""
    await asyncio.Event().wait()


def _offset(event) -> int:
    return event.message.offset


class Stopped(Exception):
    """The worker has failed: nothing more is judged."""


class Checkpoint:
    """Held records, pending sends and the commit that acknowledges them.

    Parameters
    ----------
    cut_state
        Called under the batch lock with :meth:`owned`; returns the changed state
        of the partitions still owned as ``(table, partition, key, value)`` writes.
    write
        Sends one such write; returns the future to wait for.
    written
        Called once every write of a commit is on the broker.
    forget
        Called under both locks with the (topic, partition) pairs revoked: drop
        their working state.
    deferred
        Called under the batch lock: the (topic, partition, offset) of records given
        to judge whose events wait (for an epoch); they stay held, unacknowledged.
    crash
        Stops the worker with an exception (Faust's ``app.crash``).
    generation
        The consumer group generation now; a record fetched in an older one is
        never judged nor acknowledged.
    committed
        A partition's committed offset (None: not known), where its records must start.
    rewind
        Seeks a partition back to an offset, so its records are read again from there.
    """

    def __init__(self, *, cut_state: Callable[[Callable[[str], set[int]]], list[tuple]],
                 write: Callable[..., Awaitable], written: Callable[[], None],
                 forget: Callable[[set[TP]], None],
                 crash: Callable[[BaseException], Awaitable],
                 deferred: Callable[[], set[tuple[str, int, int]]] = set,
                 generation: Callable[[], int],
                 committed: Callable[[TP], int | None] = lambda tp: None,
                 rewind: Callable[[TP, int], Awaitable] = lambda tp, offset: asyncio.sleep(0),
                 halt: Callable[[], Awaitable] = halt,
                 clock: Callable[[], float] = time.monotonic,
                 interval_s: float = CHECKPOINT_S, send_timeout_s: float = SEND_TIMEOUT_S,
                 write_slice: int = WRITE_SLICE, write_pause_s: float = WRITE_PAUSE_S,
                 write_bytes: int = WRITE_BYTES):
        self.cut_state, self.write, self.written, self.forget = cut_state, write, written, forget
        self.crash, self.generation, self.halt, self.clock = crash, generation, halt, clock
        self.committed, self.rewind, self.deferred = committed, rewind, deferred
        self.interval_s, self.send_timeout_s = interval_s, send_timeout_s
        self.write_slice, self.write_pause_s, self.write_bytes = write_slice, write_pause_s, write_bytes
        self.lock = asyncio.Lock()        # batches, cuts and rebalances, one at a time
        self.committing = asyncio.Lock()  # a commit from its cut until its records are acked
        self.held: list = []    # events judged but not yet acknowledged
        self.sends: list = []   # alerts and dead letters not yet known to be on the broker
        self.failed: list[BaseException] = []  # nothing is acknowledged any more
        self.assigned: set[TP] = set()
        self.next_offset: dict[TP, int] = {}  # per partition, in this generation
        self.rewinds: dict[TP, tuple] = {}  # a hole: (first offset, since, last asked)
        self.pending_rewinds: dict[TP, int] = {}
        self.progress_at: dict[TP, float] = {}  # when a record of the partition was last judged
        self.due = 0.0  # clock time of the next commit
        self.settle_until = 0.0  # clock time: until then, a commit at every tick
        self.waiting_since: float | None = None  # clock time the oldest held record was judged

    def owned(self, topic: str) -> set[int]:
        return {p for t, p in self.assigned if t == topic}

    def sent(self, future) -> None:
        """An alert or dead letter sent for a record being judged."""
        self.sends.append(future)

    @contextlib.asynccontextmanager
    async def judging(self, agent: str, batch, halt: bool = True):
        """Judge a batch under the batch lock: yields its records to judge (see
        :meth:`hold`). An exception stops the worker; an agent (``halt``) never
        returns then. A timer must return, or the worker's stop waits for it: it
        gets :class:`Stopped` if the worker has already failed."""
        async with self.lock:
            if self.failed:
                if halt:
                    await self.halt()
                raise Stopped
            try:
                events = self.hold(batch)
                await self.rewind_pending()
                yield events
            except Exception as exc:
                await self.fail(agent, exc)
                if halt:
                    await self.halt()

    def hold(self, batch) -> list:
        """Keep a batch's records from being acknowledged until a checkpoint holds their
        effects; return those to judge, in offset order per partition, each once and
        with none skipped.

        Records fetched before a rebalance can still sit in the batch: they are never
        acknowledged (their partition is read again from its committed offset), and a
        record already judged in this generation is not judged twice. A partition's
        records must follow on from its committed offset without a hole: Faust's
        consumer can lose the first records after a restart (a fetch made before its
        seek to the committed offsets, delivered after it) and then counts them as
        read. Records after a hole are left unjudged and the partition is read again
        from the hole (:meth:`rewind_pending`).
        """
        generation, assigned = self.generation(), self.assigned
        fresh: dict[TP, list] = {}
        for event in batch:
            message = event.message
            message.incref()  # take_events acknowledges on return; we do after commit
            if message.generation_id == generation:
                tp = (message.topic, message.partition)
                if tp in assigned:
                    fresh.setdefault(tp, []).append(event)
        judge = []
        for tp in sorted(fresh):
            events = sorted(fresh[tp], key=_offset)
            expected = self.next_to_judge(tp)
            judged = len(judge)
            for event in events:
                offset = event.message.offset
                if expected is not None and offset > expected and not self._missing(tp, expected, offset):
                    continue
                if expected is None or offset >= expected:
                    expected = offset + 1
                    judge.append(event)
                    self.rewinds.pop(tp, None)
            if len(judge) > judged:
                self.next_offset[tp] = expected
                self.progress_at[tp] = self.clock()
        if judge and not self.held:
            self.waiting_since = self.clock()
        self.held.extend(judge)
        return judge

    def next_to_judge(self, tp: TP) -> int | None:
        """The offset a partition's next record must have: after the last one judged,
        else its committed offset (None: not known)."""
        expected = self.next_offset.get(tp)
        return self.committed(tp) if expected is None else expected

    def _missing(self, tp: TP, expected: int, offset: int) -> bool:
        """Records ``expected`` to ``offset - 1`` of a partition never came: ask for them
        again (False), or, once that has failed for ``HOLE_GIVE_UP_S``, take them as gone
        from the broker (retention) and go on from ``offset`` (True)."""
        now = self.clock()
        hole, since, asked = self.rewinds.get(tp, (None, now, None))
        if hole != expected:
            since, asked = now, None
        if now - since >= HOLE_GIVE_UP_S:
            print(f"worker: {tp[0]}[{tp[1]}] offsets {expected}-{offset - 1} are not on the "
                  f"broker; judging from {offset}", file=sys.stderr, flush=True)
            return True
        # Records fetched before the seek still arrive for a while: seek again only later.
        if asked is None or now - asked >= HOLE_RETRY_S:
            asked = now
            self.pending_rewinds[tp] = expected
            print(f"worker: {tp[0]}[{tp[1]}] offsets {expected}-{offset - 1} never reached the "
                  f"worker; reading from {expected} again", file=sys.stderr, flush=True)
        self.rewinds[tp] = (expected, since, asked)
        return False

    async def rewind_pending(self) -> None:
        """Seek each partition with a hole back to it (under the batch lock)."""
        pending, self.pending_rewinds = self.pending_rewinds, {}
        for tp, offset in pending.items():
            if tp in self.assigned:
                await self.rewind(tp, offset)

    def stalled_s(self) -> float:
        """How long the oldest judged record has waited for a commit (0: none waits)."""
        if self.waiting_since is None or self.failed:
            return 0.0
        return self.clock() - self.waiting_since

    async def fail(self, agent: str, exc: BaseException) -> None:
        """An agent could not judge a batch: stop the worker, acknowledging nothing
        more (the records from the last commit on are read again at the next start).
        Called under the batch lock, so no cut holds the failed batch."""
        if not self.failed:
            print(f"worker: {agent} failed ({type(exc).__name__}: {exc}); stopping without "
                  "committing what it did not judge", file=sys.stderr, flush=True)
        self.failed.append(exc)
        self.held.clear()
        self.sends.clear()
        await self.crash(exc)

    async def commit(self, force: bool = False) -> None:
        """Steps 1–4 (see the module); a no-op with nothing held (unless ``force``: state
        changed without records, such as a partition entering an idle epoch) or after
        a failure."""
        # One at a time, and a revocation waits for the one under way: a write sent
        # late could otherwise land after the next owner's.
        async with self.committing:
            async with self.lock:  # 1. the cut
                if not (self.held or force) or self.failed:
                    return
                self.due = self.clock() + (0.0 if self.clock() < self.settle_until
                                           else self.interval_s)
                sends, self.sends = self.sends, []
                # Faust commits up to the end of the first run of acknowledged offsets,
                # wherever it starts: a record after one that waits must wait too.
                first_waiting: dict[TP, int] = {}
                for topic, partition, offset in self.deferred():
                    first_waiting[topic, partition] = min(
                        offset, first_waiting.get((topic, partition), offset))
                held, events, self.held = self.held, [], []
                for event in held:
                    message = event.message
                    first = first_waiting.get((message.topic, message.partition))
                    (self.held if first is not None and message.offset >= first
                     else events).append(event)
                if not self.held:
                    self.waiting_since = None
                writes = self.cut_state(self.owned)
            # A state that holds a record is never stored before the record's alerts.
            await self.delivered(sends)                      # 2. alerts, dead letters
            await self.write_paced(writes)                   # 3. the state
            self.written()
            for event in events:                             # 4. the offsets
                # a partition given away is read again by its next owner
                if (event.message.topic, event.message.partition) in self.assigned:
                    event.ack()

    async def tick(self) -> None:
        """Commit if one is due (the first after an assignment is due at once)."""
        if self.clock() >= self.due:
            await self.commit()

    async def delivered(self, futures: list) -> None:
        """Wait until the broker acknowledged these sends. If it does not, stop: the
        records after the last commit are read again by the next worker, so nothing
        is lost, where going on would acknowledge records whose effects may be."""
        try:
            async with asyncio.timeout(self.send_timeout_s):  # wait_for may lose a cancel
                await asyncio.gather(*futures)
        except Exception as exc:
            # Later commits would acknowledge records judged after the lost sends.
            self.failed.append(exc)
            await self.crash(RuntimeError(f"checkpoint: sends not acknowledged: {exc!r}"))
            raise

    async def write_paced(self, writes: list[tuple]) -> None:
        """Write each (table, partition, key, value) and wait for them, a slice of at most
        ``write_bytes`` of values and ``write_slice`` writes at a time: a commit writes up
        to thousands of values, and sent in one go they held up fetching (and so the
        alerts) for half a second. Paced by bytes, since states grow with use."""
        start = 0
        while start < len(writes):
            if start:
                await asyncio.sleep(self.write_pause_s)
            stop, size = start + 1, len(writes[start][3] or b"")
            while stop < len(writes) and stop - start < self.write_slice:
                size += len(writes[stop][3] or b"")
                if size > self.write_bytes:
                    break
                stop += 1
            await self.delivered([self.write(*item) for item in writes[start:stop]])
            start = stop

    async def assign(self, tps: Iterable[TP]) -> None:
        """Partitions assigned: judge their records; commit at the next tick."""
        async with self.lock:
            tps = set(tps)
            self.assigned.update(tps)
            self.due, self.settle_until = 0.0, self.clock() + SETTLE_S
            for tp in tps:
                self.progress_at[tp] = self.clock()

    async def refetch_stalled(self, highwater: Callable[[TP], int | None],
                              topics: Iterable[str]) -> None:
        """Read again a partition of ``topics`` whose records are on the broker (below its
        high watermark) but none of which reached the worker for ``STALE_S`` (for
        ``HOLE_RETRY_S`` after a hole): the consumer lost them after a restart under load
        (they were fetched, never delivered). Called every ``HOLE_RETRY_S``."""
        async with self.lock:
            now = self.clock()
            topics = set(topics)
            for tp in sorted(tp for tp in self.assigned if tp[0] in topics):
                # No commit known: the group starts at the beginning. Records already
                # applied are skipped per key if read again.
                expected = self.next_to_judge(tp) or 0
                end = highwater(tp)
                # A hole already sought back to was likely lost again (records fetched
                # before the seek land after it): ask sooner.
                patience = HOLE_RETRY_S if tp in self.rewinds else STALE_S
                if end is None or end <= expected or now - self.progress_at.get(tp, now) < patience:
                    continue
                print(f"worker: {tp[0]}[{tp[1]}] offsets {expected}-{end - 1} are on the broker "
                      f"but none reached the worker for {now - self.progress_at[tp]:.0f} s; "
                      f"reading from {expected} again", file=sys.stderr, flush=True)
                self.progress_at[tp] = now
                if tp in self.rewinds:
                    self.rewinds[tp] = (*self.rewinds[tp][:2], now)
                await self.rewind(tp, expected)

    async def revoke(self, tps: Iterable[TP]) -> None:
        """Partitions taken away: drop their working state and un-acknowledged records
        (the next owner reads them again from the committed offset and the tables)."""
        revoked = set(tps)
        async with self.committing, self.lock:  # never in the middle of a batch or commit
            # Records of these partitions still in a buffer must not be judged here any
            # more: their state would skip what this worker judged and then forgot.
            self.assigned -= revoked
            self.forget(revoked)
            for tp in revoked:
                self.next_offset.pop(tp, None)
                self.rewinds.pop(tp, None)
                self.pending_rewinds.pop(tp, None)
                self.progress_at.pop(tp, None)
            self.held = [e for e in self.held
                         if (e.message.topic, e.message.partition) not in revoked]
            if not self.held:
                self.waiting_since = None
