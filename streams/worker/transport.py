"""Faust's aiokafka transport with two fixes modelwatch needs (see docs/streaming-notes.md).

* Table recovery must read a changelog to its true end. Faust takes the end from
  ListOffsets, which the embedded broker (Tansu) answers with the first offset of
  the last record batch, + 1: recovery stopped early and table updates were lost
  for good after a kill -9 (57 of 1,134 in a reproduction). The high watermark in
  a fetch response is right on every broker, so recovery asks for that.
* Faust hard-codes the consumer's ``fetch_max_wait_ms`` to 1,500 ms, which is
  the floor of event-to-alert latency at moderate load; modelwatch sets it.
* A worker restarted after a kill -9 waited for its dead predecessor's session to
  expire (6 s) before the group would rebalance. The consumer's client id names
  its host and process (:func:`member_client_id`); before joining, a worker asks
  the broker to remove members of its group whose process on this host is gone
  (:func:`remove_dead_members`).
* A lone worker stopped with SIGTERM or SIGINT stayed a member until its session
  expired: aiokafka leaves only for a generation > 0, and Tansu's first is 0. The
  consumer thread sends the LeaveGroup itself (:func:`leave_group`).

Selected by the broker URL scheme ``modelwatch://`` (see :func:`faust_broker_urls`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time

import aiokafka
from faust.transport import drivers
from faust.transport.drivers import aiokafka as fa

FETCH_MAX_WAIT_MS = 100   # 1,500 in stock Faust: p50 latency 392 ms → 37 ms (measured)
HIGHWATER_TIMEOUT_S = 10.0
#: A LeaveGroup round (the dead-member check at start, leaving at stop) gives up after
#: this: a broker that does not answer must not hold the start or the exit.
LEAVE_TIMEOUT_S = 5.0


class ConsumerThread(fa.AIOKafkaConsumerThread):
    async def on_start(self) -> None:
        if not self.app.client_only:
            servers, auth = self._connection()
            await remove_dead_members(servers, self.app.conf.id, **auth)
        await super().on_start()

    async def on_thread_stop(self) -> None:
        # Faust's last commit (Consumer.on_stop) is done before its thread stops, so
        # leaving here loses no offsets. aiokafka's stop leaves only for a generation > 0
        # and Tansu numbers a group's first generation 0: a worker of it stayed a member
        # until its session expired. That stop clears the member id: read it before.
        coordinator = getattr(self._consumer, "_coordinator", None)  # private in aiokafka 0.14
        member = coordinator.member_id if coordinator and coordinator.generation == 0 else None
        await super().on_thread_stop()
        if member and not self.app.client_only:
            servers, auth = self._connection()
            await leave_group(servers, self.app.conf.id, member, **auth)

    def _connection(self) -> tuple[list[str], dict]:
        return connection(self.app)

    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # private in aiokafka 0.14; read by start()
        return consumer

    async def _highwaters(self, partitions):
        highwaters = dict(await super()._highwaters(partitions))
        if self.consumer.in_transaction:
            return highwaters
        # Tansu says -1 for an empty partition where Kafka says 0.
        highwaters = {tp: (0 if off is not None and off < 0 else off)
                      for tp, off in highwaters.items()}
        todo = [tp for tp, off in highwaters.items() if off]
        if todo:
            highwaters.update(await self._fetched_highwaters(todo, highwaters))
        return highwaters

    async def _fetched_highwaters(self, tps, listed):
        servers, auth = self._connection()
        return await fetched_highwaters(servers, listed, tps, **auth)


def connection(app) -> tuple[list[str], dict]:
    """Bootstrap servers and aiokafka's auth arguments, as the app's consumer's own."""
    conf, transport = app.conf, app.transport
    return (fa.server_list(transport.url, transport.default_port),
            fa.credentials_to_aiokafka_auth(conf.broker_credentials, conf.ssl_context))


async def follow_topic(servers, topic: str, apply, **auth) -> None:
    """Read every partition of ``topic`` from its start and then as it grows, calling
    ``apply(partition, key, value)`` for each record, until cancelled. A reader of
    its own, outside the group: Faust's global tables miss other workers' updates
    (faust-streaming issues #212 and #283)."""
    reader = aiokafka.AIOKafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False,
                                       fetch_max_wait_ms=100, group_id=None,
                                       auto_offset_reset="earliest", **auth)
    await reader.start()
    try:
        partitions = None
        while not partitions:  # the worker creates the topic as it starts
            partitions = reader.partitions_for_topic(topic)
            if not partitions:
                await reader._client.force_metadata_update()  # private in aiokafka 0.14
                await asyncio.sleep(0.5)
        reader.assign([aiokafka.TopicPartition(topic, p) for p in sorted(partitions)])
        while True:
            for tp, records in (await reader.getmany(timeout_ms=500)).items():
                for record in records:
                    apply(tp.partition, record.key, record.value)
    finally:
        await reader.stop()


async def fetched_highwaters(servers, listed: dict, tps, **auth) -> dict:
    """The high watermark of each partition, from a fetch at its listed end.

    ``listed`` maps each partition (anything with ``topic`` and ``partition``) to
    the end ListOffsets gave; the answer is never lower.
    """
    reader = aiokafka.AIOKafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False,
                                       fetch_max_wait_ms=10, group_id=None, **auth)
    await reader.start()
    found = {}
    try:
        wanted = {aiokafka.TopicPartition(tp.topic, tp.partition): tp for tp in tps}
        reader.assign(list(wanted))
        for atp, tp in wanted.items():
            reader.seek(atp, listed[tp] - 1)
        pending, deadline = set(wanted), time.monotonic() + HIGHWATER_TIMEOUT_S
        while pending and time.monotonic() < deadline:
            await reader.getmany(*pending, timeout_ms=500, max_records=1)
            for atp in list(pending):
                highwater = reader.highwater(atp)
                if highwater is not None:
                    found[wanted[atp]] = max(listed[wanted[atp]], highwater)
                    pending.discard(atp)
    finally:
        await reader.stop()
    return found


def _host_prefix() -> str:
    """Start of the client id of every worker on this host (and PID namespace)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino  # two containers may share a host name
    except OSError:
        namespace = 0
    return f"modelwatch-{socket.gethostname()}-{namespace}-"


def member_client_id() -> str:
    """The worker's Kafka client id. The broker makes a member id of it plus "-" and a
    UUID, so a group member's id tells on which host and in which process it runs."""
    return f"{_host_prefix()}{os.getpid()}"


def _gone(pid: int) -> bool:
    """Whether no live process has this id here (a zombie is dead: it only awaits its reaping)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def dead_members(members: list[str], prefix: str | None = None) -> list[str]:
    """The member ids among ``members`` of worker processes on this host that are gone."""
    prefix = _host_prefix() if prefix is None else prefix
    dead = []
    for member in members:
        if not member.startswith(prefix):
            continue  # another host's, or not a worker's: its session will tell
        pid = member[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _gone(int(pid)):
            dead.append(member)
    return dead


async def remove_members(servers, group: str, choose, doing: str, otherwise: str,
                         **auth) -> list[str] | None:
    """Send LeaveGroup, the request a member sends itself when it stops (any client may
    send it: standard Kafka), for each member of ``group`` that ``choose`` picks from the
    member ids DescribeGroups lists. Returns the ids removed. Best effort within
    ``LEAVE_TIMEOUT_S``: on any error, says in one line that it could not do ``doing``,
    why, and ``otherwise`` (what follows), and returns None."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.errors import KafkaError
    from aiokafka.protocol.admin import DescribeGroupsRequest
    from aiokafka.protocol.group import LeaveGroupRequest

    removed = []
    try:
        async with asyncio.timeout(LEAVE_TIMEOUT_S):
            client = AIOKafkaClient(bootstrap_servers=servers, **auth)
            try:
                await client.bootstrap()
                coordinator = await client.coordinator_lookup(0, group)
                [described] = (await client.send(coordinator, DescribeGroupsRequest([group]))).groups
                for member in choose([m[0] for m in described[5]]):  # (member_id, ...)
                    answer = await client.send(coordinator, LeaveGroupRequest(group, member))
                    if answer.error_code == 0:
                        removed.append(member)
            finally:
                await client.close()
    except (KafkaError, OSError, ValueError, TimeoutError) as exc:
        print(f"worker: could not {doing} ({exc!r}); {otherwise}", file=sys.stderr, flush=True)
        return None
    return removed


async def remove_dead_members(servers, group: str, **auth) -> list[str]:
    """Remove from ``group`` the members whose worker process on this host is gone: the
    broker would otherwise hold the next rebalance until their sessions expire (a
    restart after kill -9 waited 10-23 s for its assignment, 5 s with this). On any
    error the group just waits, as before."""
    removed = await remove_members(
        servers, group, dead_members,
        f"check group {group} for dead members",
        "a member killed before this start delays the assignment until its session expires",
        **auth) or []
    if removed:
        print(f"worker: removed {len(removed)} member(s) of group {group} whose process is "
              f"gone ({', '.join(removed)}), so it need not wait for their sessions to expire",
              file=sys.stderr, flush=True)
    return removed


async def leave_group(servers, group: str, member: str, **auth) -> bool:
    """Take this worker's ``member`` out of ``group`` as it stops, if still listed, so the
    group rebalances at once (not after the session, 6 s)."""
    left = await remove_members(
        servers, group, lambda ids: [m for m in ids if m == member],
        f"leave group {group}", "it rebalances when this member's session expires", **auth)
    if left:
        print(f"worker: left group {group}", file=sys.stderr, flush=True)
    return bool(left)


class Consumer(fa.Consumer):
    def _new_consumer_thread(self):
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def committed_offset(self, tp) -> int | None:
        """The next offset to read that the group committed for a partition, as this
        consumer last learnt it (at its seek after an assignment, or its own commit);
        None if unknown or 0."""
        return self._committed_offset.get(tp)


class Transport(fa.Transport):
    Consumer = Consumer


drivers.TRANSPORTS.aliases["modelwatch"] = "streams.worker.transport:Transport"


def faust_broker_urls(broker: str) -> list[str]:
    """``kafka://a:1,b:2`` (the setting) → the URLs that select this transport.

    >>> faust_broker_urls("kafka://a:1,b:2")
    ['modelwatch://a:1', 'modelwatch://b:2']
    """
    return ["modelwatch://" + host for host in broker.removeprefix("kafka://").split(",")]
