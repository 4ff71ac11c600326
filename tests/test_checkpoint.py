"""The checkpoint protocol's contract, in-process: plain fakes for Kafka and Faust.

``tests/test_worker_faults.py`` shows the same rules end to end on the real broker.
"""

from __future__ import annotations

import asyncio

import pytest

from streams.worker.checkpoint import SETTLE_S, Checkpoint, Stopped

T = "inference-logs"


class Message:
    def __init__(self, topic: str, partition: int, offset: int, generation: int):
        self.topic, self.partition, self.offset = topic, partition, offset
        self.generation_id = generation
        self.refs = 0

    def incref(self) -> None:
        self.refs += 1


class Event:
    def __init__(self, log: list, topic: str, partition: int, offset: int, generation: int = 1):
        self.message = Message(topic, partition, offset, generation)
        self.log = log

    def ack(self) -> None:
        self.log.append(("ack", self.message.partition, self.message.offset))


class Halted(Exception):
    """The fake halt: the real one waits for the crash forever."""


class World:
    """The checkpoint's dependencies, recording what happens in one log."""

    def __init__(self, failing_write: bytes | None = None):
        self.log: list = []
        self.generation = 1
        self.crashes: list[BaseException] = []
        self.forgotten: list[set] = []
        self.failing_write = failing_write
        self.writes: list[tuple] = []  # handed to the next cut
        self.now = 100.0
        self.in_flight = self.most_in_flight = 0
        self.committed: dict = {}  # (topic, partition) -> committed offset

    def checkpoint(self, **options) -> Checkpoint:
        async def halt():
            raise Halted

        async def crash(exc):
            self.crashes.append(exc)

        return Checkpoint(cut_state=self.cut, write=self.write, written=self.written,
                          forget=self.forgotten.append, crash=crash,
                          generation=lambda: self.generation, halt=halt,
                          committed=self.committed.get, rewind=self.rewind,
                          clock=lambda: self.now, interval_s=5.0, send_timeout_s=1.0,
                          **({"write_slice": 2, "write_pause_s": 0} | options))

    def events(self, partition: int, *offsets: int, generation: int = 1) -> list[Event]:
        return [Event(self.log, T, partition, o, generation) for o in offsets]

    async def rewind(self, tp, offset) -> None:
        self.log.append(("seek", tp[1], offset))

    def cut(self, owned) -> list[tuple]:
        self.log.append(("cut", tuple(sorted(owned(T)))))
        writes, self.writes = self.writes, []
        return writes

    def write(self, table, partition, key, value):
        async def written():
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            await asyncio.sleep(0)
            self.in_flight -= 1
            if key == self.failing_write:
                raise OSError("changelog write refused")
            self.log.append(("write", key))
        return written()

    def written(self) -> None:
        self.log.append(("written",))

    def send(self, name: str, fails: bool = False):
        async def sent():
            await asyncio.sleep(0)
            if fails:
                raise OSError("broker went away")
            self.log.append(("sent", name))
        return asyncio.ensure_future(sent())


def run(coro):
    return asyncio.run(coro)


def test_commit_runs_its_steps_in_order_sends_then_state_then_acks():
    world = World()

    async def scenario():
        cp = world.checkpoint()
        await cp.assign([(T, 0), (T, 1)])
        async with cp.judging("judge", world.events(1, 5) + world.events(0, 3, 4)) as judge:
            assert [(e.message.partition, e.message.offset) for e in judge] == [
                (0, 3), (0, 4), (1, 5)]  # offset order per partition
            cp.sent(world.send("alert"))
            cp.sent(world.send("dead letter"))
        world.writes = [(None, 0, b"a", b"1"), (None, 1, b"b", b"2"), (None, 0, b"c", None)]
        await cp.commit()
        return cp

    cp = run(scenario())
    assert world.log == [("cut", (0, 1)), ("sent", "alert"), ("sent", "dead letter"),
                         ("write", b"a"), ("write", b"b"), ("write", b"c"), ("written",),
                         ("ack", 0, 3), ("ack", 0, 4), ("ack", 1, 5)]
    assert world.most_in_flight == 2  # paced: write_slice at a time
    assert cp.held == [] and cp.sends == [] and world.crashes == []


def test_a_failed_send_stops_the_commit_before_any_state_or_ack():
    world = World()

    async def scenario():
        cp = world.checkpoint()
        await cp.assign([(T, 0)])
        async with cp.judging("judge", world.events(0, 0, 1)):
            cp.sent(world.send("alert", fails=True))
        world.writes = [(None, 0, b"a", b"1")]
        with pytest.raises(OSError):
            await cp.commit()
        # Later batches are judged by no one here: nothing more is acknowledged.
        with pytest.raises(Halted):
            async with cp.judging("judge", world.events(0, 2)):
                pass
        await cp.commit()
        return cp

    cp = run(scenario())
    assert [entry[0] for entry in world.log] == ["cut"]
    assert len(world.crashes) == 1 and "sends not acknowledged" in str(world.crashes[0])
    assert cp.failed


def test_a_failed_state_write_acknowledges_nothing():
    world = World(failing_write=b"b")

    async def scenario():
        cp = world.checkpoint()
        await cp.assign([(T, 0)])
        async with cp.judging("judge", world.events(0, 0)):
            pass
        world.writes = [(None, 0, b"a", b"1"), (None, 0, b"b", b"2")]
        with pytest.raises(OSError):
            await cp.commit()

    run(scenario())
    assert not [e for e in world.log if e[0] in ("ack", "written")]
    assert len(world.crashes) == 1


def test_a_failed_agent_stops_the_worker_and_acknowledges_nothing_more(capsys):
    world = World()

    async def scenario():
        cp = world.checkpoint()
        await cp.assign([(T, 0)])
        async with cp.judging("judge", world.events(0, 0)):
            cp.sent(world.send("alert"))
        with pytest.raises(Halted):
            async with cp.judging("judge_inference", world.events(0, 1)):
                cp.sent(world.send("alert of the failed batch"))
                raise ValueError("a detector broke")
        assert cp.held == [] and cp.sends == []
        await cp.commit()  # nothing held: no cut, no ack (not even of the good batch)
        with pytest.raises(Halted):  # the next batch is not judged
            async with cp.judging("judge", world.events(0, 2)) as judge:
                raise AssertionError(f"judged {judge}")

    run(scenario())
    assert not [e for e in world.log if e[0] in ("cut", "ack")]
    assert [type(e) for e in world.crashes] == [ValueError]
    assert "judge_inference failed (ValueError: a detector broke)" in capsys.readouterr().err


def test_a_forced_commit_writes_state_changed_without_records():
    """A partition entering an idle epoch changes shared state with no record held: the
    waiting timer forces a commit, or other workers would wait on it for good."""
    world = World()

    async def scenario():
        cp = world.checkpoint()
        await cp.assign([(T, 0)])
        world.writes = [(None, 0, b"#0", b"mark")]
        await cp.commit()  # nothing held: no cut
        await cp.commit(force=True)

    run(scenario())
    assert world.log == [("cut", (0,)), ("write", b"#0"), ("written",)]


def test_a_timer_that_fails_stops_the_worker_and_returns(capsys):
    """A timer's judging (waiting events) must return after a failure: the worker's stop
    waits for its timers, and one that halted hung it."""
    world = World()

    async def scenario():
        cp = world.checkpoint()
        await cp.assign([(T, 0)])
        async with cp.judging("judge_waiting", [], halt=False):
            raise ValueError("a detector broke")
        with pytest.raises(Stopped):
            async with cp.judging("judge_waiting", [], halt=False):
                raise AssertionError("judged after the failure")

    run(scenario())
    assert [type(e) for e in world.crashes] == [ValueError]
    assert "judge_waiting failed (ValueError: a detector broke)" in capsys.readouterr().err


def test_records_of_a_revoked_partition_are_never_acknowledged():
    world = World()

    async def scenario():
        cp = world.checkpoint()
        await cp.assign([(T, 0), (T, 1)])
        async with cp.judging("judge", world.events(0, 0) + world.events(1, 0, 1)):
            pass
        await cp.revoke([(T, 1)])
        assert [e.message.partition for e in cp.held] == [0]
        # Records of the revoked partition still in a buffer are not judged here.
        async with cp.judging("judge", world.events(1, 2) + world.events(0, 1)) as judge:
            assert [(e.message.partition, e.message.offset) for e in judge] == [(0, 1)]
        await cp.commit()

    run(scenario())
    assert world.forgotten == [{(T, 1)}]
    assert world.log == [("cut", (0,)), ("written",), ("ack", 0, 0), ("ack", 0, 1)]


def test_records_with_events_still_waiting_stay_held_until_a_later_commit():
    """Events waiting for other partitions' epochs: their records are not acknowledged
    (a restart reads them again), and a later commit acknowledges them once judged."""
    world = World()
    waiting = {(T, 0, 1)}

    async def scenario():
        cp = world.checkpoint()
        cp.deferred = lambda: set(waiting)
        await cp.assign([(T, 0)])
        async with cp.judging("judge", world.events(0, 0, 1, 2)):
            pass
        await cp.commit()
        # Offset 2 waits too: Faust would commit past 1 once 2 were acknowledged.
        assert [e.message.offset for e in cp.held] == [1, 2] and cp.stalled_s() == 0
        world.now += 61
        assert cp.stalled_s() == 61  # still waiting: the stall watch counts it
        waiting.clear()
        await cp.commit()
        assert cp.held == []

    run(scenario())
    assert world.log == [("cut", (0,)), ("written",), ("ack", 0, 0),
                         ("cut", (0,)), ("written",), ("ack", 0, 1), ("ack", 0, 2)]


def test_records_already_judged_in_this_generation_are_not_judged_twice():
    world = World()

    async def scenario():
        cp = world.checkpoint()
        await cp.assign([(T, 0)])
        first = world.events(0, 0, 1, 2)
        async with cp.judging("judge", first) as judge:
            assert [e.message.offset for e in judge] == [0, 1, 2]
        again = world.events(0, 1, 2, 3)  # fetched again (a retry), overlapping
        async with cp.judging("judge", again) as judge:
            assert [e.message.offset for e in judge] == [3]
        assert all(e.message.refs == 1 for e in first + again)  # held from Faust's ack
        # A new generation: records fetched under the old one are neither judged nor
        # acknowledged; once the partition is revoked and given back, it starts over.
        world.generation = 2
        async with cp.judging("judge", world.events(0, 4)) as judge:
            assert judge == []
        await cp.revoke([(T, 0)])
        await cp.assign([(T, 0)])
        async with cp.judging("judge", world.events(0, 2, 3, generation=2)) as judge:
            assert [e.message.offset for e in judge] == [2, 3]

    run(scenario())


def test_commits_are_due_at_once_after_an_assignment_then_every_interval():
    world = World()

    async def scenario():
        cp = world.checkpoint()
        await cp.assign([(T, 0)])
        async with cp.judging("judge", world.events(0, 0)):
            pass
        await cp.tick()                     # due at once
        world.now += SETTLE_S
        async with cp.judging("judge", world.events(0, 1)):
            pass
        await cp.tick()                     # due since the last
        async with cp.judging("judge", world.events(0, 2)):
            pass
        world.now += 4.9
        await cp.tick()                     # not yet
        assert ("ack", 0, 2) not in world.log
        world.now += 0.2
        await cp.tick()
        await cp.tick()                     # nothing held: no cut

    run(scenario())
    assert [e for e in world.log if e[0] in ("cut", "ack")] == [
        ("cut", (0,)), ("ack", 0, 0), ("cut", (0,)), ("ack", 0, 1), ("cut", (0,)), ("ack", 0, 2)]


def test_for_a_while_after_an_assignment_every_tick_commits():
    """A restart judges its backlog in several batches, and a partition fetched a batch
    after the others holds their events back (they wait for its epoch): for SETTLE_S
    after an assignment each tick commits what was judged, not an interval later."""
    world, waiting = World(), {(T, 0, 1)}

    async def scenario():
        cp = world.checkpoint(deferred=lambda: set(waiting))
        await cp.assign([(T, 0)])
        async with cp.judging("judge", world.events(0, 0, 1)):
            pass
        await cp.tick()                     # acknowledges 0, holds 1 back
        waiting.clear()
        world.now += 1
        await cp.tick()                     # at once: 1
        async with cp.judging("judge", world.events(0, 2)):
            pass
        world.now += 1
        await cp.tick()                     # at once: 2
        world.now += SETTLE_S               # settled
        async with cp.judging("judge", world.events(0, 3)):
            pass
        await cp.tick()                     # the last commit was 15 s ago: 3
        async with cp.judging("judge", world.events(0, 4)):
            pass
        world.now += 4.9
        await cp.tick()                     # the interval again: not yet
        world.now += 0.1
        await cp.tick()

    run(scenario())
    assert [e for e in world.log if e[0] == "ack"] == [
        ("ack", 0, 0), ("ack", 0, 1), ("ack", 0, 2), ("ack", 0, 3), ("ack", 0, 4)]
    assert [e for e in world.log if e[0] in ("cut", "ack")][-2:] == [("cut", (0,)), ("ack", 0, 4)]


def test_state_writes_are_paced_by_bytes_as_well_as_by_count():
    """Small values go many at a time, large ones few: states grow with use."""
    def in_flight(values: list[bytes]) -> int:
        world = World()

        async def scenario():
            cp = world.checkpoint(write_slice=100, write_bytes=10)
            await cp.assign([(T, 0)])
            async with cp.judging("judge", world.events(0, 1)):
                pass
            world.writes = [(None, 0, b"k%d" % i, v) for i, v in enumerate(values)]
            await cp.commit()

        run(scenario())
        assert [e for e in world.log if e[0] == "write"] == [
            ("write", b"k%d" % i) for i in range(len(values))]  # every write, in order
        return world.most_in_flight

    assert in_flight([b"12"] * 12) == 5           # 5 x 2 bytes fit in 10
    assert in_flight([b"1234567890ab"] * 3) == 1  # one over the budget still goes, alone
    assert in_flight([None] * 300) == 100         # tombstones: the count caps


def test_stalled_counts_from_the_oldest_record_waiting_for_a_commit():
    world = World()

    async def scenario():
        cp = world.checkpoint()
        await cp.assign([(T, 0), (T, 1)])
        assert cp.stalled_s() == 0.0  # nothing waits
        async with cp.judging("judge", world.events(0, 0)):
            pass
        world.now += 30
        async with cp.judging("judge", world.events(0, 1)):
            pass
        world.now += 40
        assert cp.stalled_s() == 70.0  # from the first batch, not the last
        await cp.commit()
        assert cp.stalled_s() == 0.0
        async with cp.judging("judge", world.events(1, 0)):
            pass
        world.now += 10
        assert cp.stalled_s() == 10.0
        await cp.revoke([(T, 1)])  # its records are no longer this worker's to commit
        assert cp.stalled_s() == 0.0

    run(scenario())


def test_a_partition_is_judged_from_its_committed_offset_without_holes(capsys):
    """Records after a hole are not judged: the partition is read again from the hole."""
    world = World()
    world.committed[(T, 0)] = 10

    async def scenario():
        cp = world.checkpoint()
        await cp.assign([(T, 0)])
        async with cp.judging("judge", world.events(0, 13, 14)) as judge:
            assert judge == []  # 10-12 never came
        async with cp.judging("judge", world.events(0, 15)) as judge:
            assert judge == []  # still fetched before the seek: not asked again at once
        async with cp.judging("judge", world.events(0, 10, 11, 12, 13)) as judge:
            assert [e.message.offset for e in judge] == [10, 11, 12, 13]
        async with cp.judging("judge", world.events(0, 12, 13, 15)) as judge:
            assert [e.message.offset for e in judge] == []  # 12, 13 again; 14 missing
        world.now += 5
        async with cp.judging("judge", world.events(0, 15)) as judge:
            assert judge == []
        await cp.commit()

    run(scenario())
    assert world.log == [("seek", 0, 10), ("seek", 0, 14), ("seek", 0, 14), ("cut", (0,)),
                         ("written",), ("ack", 0, 10), ("ack", 0, 11), ("ack", 0, 12),
                         ("ack", 0, 13)]
    assert "offsets 10-12 never reached the worker; reading from 10 again" in capsys.readouterr().err


def test_a_hole_that_stays_is_taken_as_deleted_by_retention(capsys):
    world = World()
    world.committed[(T, 0)] = 10

    async def scenario():
        cp = world.checkpoint()
        await cp.assign([(T, 0)])
        async with cp.judging("judge", world.events(0, 40)) as judge:
            assert judge == []
        world.now += 61
        async with cp.judging("judge", world.events(0, 40, 41)) as judge:
            assert [e.message.offset for e in judge] == [40, 41]

    run(scenario())
    assert world.log[:1] == [("seek", 0, 10)]
    assert "offsets 10-39 are not on the broker; judging from 40" in capsys.readouterr().err


def test_records_on_the_broker_that_never_arrive_are_read_again(capsys):
    world = World()
    world.committed[(T, 0)] = 10
    ends = {(T, 0): 20, (T, 1): 0, (T, 2): 3}  # partition 2: no commit known, no record came

    async def scenario():
        cp = world.checkpoint()
        await cp.assign([(T, 0), (T, 1), (T, 2)])
        async with cp.judging("judge", world.events(0, 10, 11)):
            pass
        world.now += 29
        await cp.refetch_stalled(ends.get, [T])
        assert [x for x in world.log if x[0] == "seek"] == []  # not yet: records may be on the way
        world.now += 1
        await cp.refetch_stalled(ends.get, [T])
        await cp.refetch_stalled(ends.get, [T])  # asked: wait again before the next seek
        async with cp.judging("judge", world.events(0, 12)):
            pass
        ends[(T, 0)] = 13
        world.now += 60
        await cp.refetch_stalled(ends.get, [T])  # all judged: nothing to read again

    run(scenario())
    assert [x for x in world.log if x[0] == "seek"] == [("seek", 0, 12), ("seek", 2, 0), ("seek", 2, 0)]
    assert "offsets 12-19 are on the broker but none reached the worker for 30 s" in capsys.readouterr().err


def test_a_hole_sought_back_to_is_asked_again_soon_if_nothing_comes():
    world = World()
    world.committed[(T, 0)] = 4
    ends = {(T, 0): 20}

    async def scenario():
        cp = world.checkpoint()
        await cp.assign([(T, 0)])
        async with cp.judging("judge", world.events(0, 9, 10)):
            pass  # 4-8 missing: sought back to 4
        world.now += 4
        await cp.refetch_stalled(ends.get, [T])
        world.now += 1
        await cp.refetch_stalled(ends.get, [T])  # the re-read never came either

    run(scenario())
    assert [x for x in world.log if x[0] == "seek"] == [("seek", 0, 4), ("seek", 0, 4)]
