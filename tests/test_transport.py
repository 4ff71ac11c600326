"""The transport's changelog highwater against the real embedded broker."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiokafka
import aiokafka.admin
import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from streams.worker.broker import EmbeddedBroker
from streams.worker.transport import (
    dead_members,
    fetched_highwaters,
    member_client_id,
    remove_dead_members,
)

pytestmark = pytest.mark.integration


def test_highwater_is_the_true_end_when_the_last_batch_holds_many_records():
    """Tansu lists the end of a partition as the first offset of its last record batch
    + 1; Faust's table recovery stopped there, losing the updates after it."""
    with EmbeddedBroker() as broker:
        admin = KafkaAdminClient(bootstrap_servers=broker.address, request_timeout_ms=5000)
        admin.create_topics([NewTopic("changelog", num_partitions=2, replication_factor=1)])
        admin.close()
        producer = KafkaProducer(bootstrap_servers=broker.address, acks="all", linger_ms=500,
                                 batch_size=1 << 20)
        for size in (100, 50):  # two batches on partition 0; one record on partition 1
            for i in range(size):
                producer.send("changelog", key=b"k%d" % i, value=b"v", partition=0)
            producer.flush()
        producer.send("changelog", key=b"k", value=b"v", partition=1)
        producer.flush()
        producer.close()

        async def ends():
            consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=broker.address, group_id=None)
            await consumer.start()
            try:
                tps = [aiokafka.TopicPartition("changelog", p) for p in (0, 1)]
                listed = await consumer.end_offsets(tps)
            finally:
                await consumer.stop()
            return listed, await fetched_highwaters(broker.address, listed, tps)

        listed, fetched = asyncio.run(ends())
    p0, p1 = (aiokafka.TopicPartition("changelog", p) for p in (0, 1))
    assert fetched[p0] == 150 and fetched[p1] == 1
    assert listed[p0] <= 150  # (101 on Tansu 0.6.0; 150 on a broker without the quirk)


def test_dead_members_are_workers_of_this_host_whose_process_is_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its id names no process now
    alive = os.getppid()
    prefix = member_client_id().removesuffix(str(os.getpid()))
    members = [f"{prefix}{child.pid}-u1", f"{prefix}{alive}-u2", f"{prefix}{os.getpid()}-u3",
               f"modelwatch-elsewhere-1-{child.pid}-u4", f"{prefix}x-u5", "faust-0.15.3-u6"]
    assert dead_members(members) == [f"{prefix}{child.pid}-u1"]


JOIN_AND_WAIT = """
import asyncio, os, sys
import aiokafka
async def main():
    consumer = aiokafka.AIOKafkaConsumer("topic", bootstrap_servers=sys.argv[1], group_id="g",
                                         client_id=sys.argv[2] + str(os.getpid()),
                                         session_timeout_ms=30000)
    await consumer.start()
    while not consumer.assignment():
        await consumer.getmany(timeout_ms=100)
    print("joined", flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


def group_members(broker, group_id: str = "g") -> list[str]:
    async def describe():
        admin = aiokafka.admin.AIOKafkaAdminClient(bootstrap_servers=broker.address)
        await admin.start()
        try:
            [answer] = await admin.describe_consumer_groups([group_id])
        finally:
            await admin.close()
        [group] = answer.groups
        return [member[0] for member in group[5]]  # (member_id, client_id, ...)

    return asyncio.run(describe())


def test_a_killed_member_is_removed_so_the_group_need_not_wait_for_its_session():
    """A rebalance waits until every member rejoined or its session expired: after a
    kill -9, 10-23 s for the worker's next start. A worker of this host whose process
    is gone is removed from the group instead."""
    with EmbeddedBroker() as broker:
        admin = KafkaAdminClient(bootstrap_servers=broker.address, request_timeout_ms=5000)
        admin.create_topics([NewTopic("topic", num_partitions=2, replication_factor=1)])
        admin.close()
        # A worker of this host: its client id is built as the worker's, with its own pid.
        prefix = member_client_id().removesuffix(str(os.getpid()))
        child = subprocess.Popen([sys.executable, "-c", JOIN_AND_WAIT, broker.address, prefix],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "joined"
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        [member] = group_members(broker)
        removed = asyncio.run(remove_dead_members(broker.address, "g"))
        left = group_members(broker)
    assert member.startswith(f"{prefix}{child.pid}-") and removed == [member]
    assert left == []


def test_a_broker_that_never_answers_does_not_hold_the_dead_member_check(capfd):
    """A listener that accepts and never answers: the check gives up on its own timeout
    (LEAVE_TIMEOUT_S) with one line, where aiokafka alone waited its 40 s request timeout
    and said it could not bootstrap."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        removed = asyncio.run(remove_dead_members(f"127.0.0.1:{listener.getsockname()[1]}", "g"))
    finally:
        listener.close()
        for connection in accepted:
            connection.close()
    assert removed == []
    [line] = [s for s in capfd.readouterr().err.splitlines() if s.startswith("worker:")]
    assert "could not check group g" in line and "TimeoutError" in line, line
