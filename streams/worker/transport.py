"""Faust's aiokafka transport with two fixes modelwatch needs (see docs/streaming-notes.md).

* Table recovery must read a changelog to its true end. Faust takes the end from
  ListOffsets, which the embedded broker (Tansu) answers with the first offset of
  the last record batch, + 1: recovery stopped early and table updates were lost
  for good after a kill -9 (57 of 1,134 in a reproduction). The high watermark in
  a fetch response is right on every broker, so recovery asks for that.
* Faust hard-codes the consumer's ``fetch_max_wait_ms`` to 1,500 ms, which is
  the floor of event-to-alert latency at moderate load; modelwatch sets it.

Selected by the broker URL scheme ``modelwatch://`` (see :func:`faust_broker_urls`).
"""

from __future__ import annotations

import time

import aiokafka
from faust.transport import drivers
from faust.transport.drivers import aiokafka as fa

FETCH_MAX_WAIT_MS = 100   # 1,500 in stock Faust: p50 latency 392 ms → 37 ms (measured)
HIGHWATER_TIMEOUT_S = 10.0


class ConsumerThread(fa.AIOKafkaConsumerThread):
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
        conf = self.app.conf
        return await fetched_highwaters(
            fa.server_list(self.transport.url, self.transport.default_port), listed, tps,
            **fa.credentials_to_aiokafka_auth(conf.broker_credentials, conf.ssl_context))


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
