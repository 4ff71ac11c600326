"""The transport's changelog highwater against the real embedded broker."""

from __future__ import annotations

import asyncio

import aiokafka
import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from streams.worker.broker import EmbeddedBroker
from streams.worker.transport import fetched_highwaters

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
