"""The Faust worker: inference logs and training stats in, alerts and dead letters out.

A first cut: detector state lives in the worker's memory (one worker holds all
partitions); tables with changelogs, the recovery fix in
``docs/streaming-notes.md`` and metrics come next.
"""

from __future__ import annotations

import faust
import msgspec
import numpy as np

from detectors.config import Thresholds
from detectors.profile import Profile
from streams.pipeline import Pipeline
from streams.records import Rejected, bad_time, decode_inference, decode_stats, event_times
from streams.settings import Settings

TAKE = 1_000        # records per processing batch at most
WITHIN_S = 0.05     # ... or what arrived within this time


def build_app(settings: Settings, profiles: list[Profile], thresholds: Thresholds) -> faust.App:
    app = faust.App(
        "modelwatch",
        broker=settings.broker,
        store="memory://",
        broker_session_timeout=10,  # a new group joins in ~5 s on Tansu, not ~30 s
        producer_acks=-1,
        web_enabled=False,
        topic_disable_leader=True,
    )
    pipeline = Pipeline(profiles, thresholds)
    inference = app.topic(settings.topic_inference, key_serializer="raw", value_serializer="raw")
    stats = app.topic(settings.topic_stats, key_serializer="raw", value_serializer="raw")
    alerts_topic = app.topic(settings.topic_alerts, key_serializer="raw", value_serializer="raw")
    dead_topic = app.topic(settings.topic_deadletter, key_serializer="raw", value_serializer="raw")
    encoder = msgspec.json.Encoder()

    async def dead_letter(key, raw: bytes, reason: str) -> None:
        await dead_topic.send(key=key, value=raw, headers={"reason": reason.encode()})

    async def publish(alerts) -> None:
        for alert in alerts:
            await alerts_topic.send(key=alert.event.id.encode(), value=encoder.encode(alert))

    @app.agent(inference)
    async def judge_inference(stream):
        async for batch in stream.take_events(TAKE, within=WITHIN_S):
            valid = []
            for event in batch:
                for record in decode_inference(event.value):
                    if isinstance(record, Rejected):
                        await dead_letter(event.key, record.raw or event.value, record.reason)
                        continue
                    reason = pipeline.reject_reason(record)
                    if reason is not None:
                        await dead_letter(event.key, msgspec.json.encode(record), reason)
                        continue
                    valid.append(record)
            if not valid:
                continue
            ts = event_times([e.ts for e in valid])
            good = ~np.isnan(ts)
            for record in (r for r, ok in zip(valid, good, strict=True) if not ok):
                await dead_letter(None, msgspec.json.encode(record), bad_time(record.ts).reason)
            order = np.argsort(ts[good], kind="stable")  # per client, partition order is kept
            kept = [r for r, ok in zip(valid, good, strict=True) if ok]
            await publish(pipeline.process_inference([kept[i] for i in order], ts[good][order]))

    @app.agent(stats)
    async def judge_stats(stream):
        async for event in stream.events():
            record, ts = decode_stats(event.value)
            reason = (record.reason if isinstance(record, Rejected)
                      else pipeline.stats_reject_reason(record))
            if reason is not None:
                await dead_letter(event.key, event.value, reason)
                continue
            await publish(pipeline.process_stats(record, ts))

    app.modelwatch_pipeline = pipeline
    return app
