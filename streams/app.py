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
from streams.records import screen
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
            result = screen(((event.value, event.key) for event in batch), pipeline.reject_reason)
            for key, reason, raw in result.rejected:
                await dead_letter(key, raw, reason)
            if not result.events:
                continue
            order = np.argsort(result.ts, kind="stable")  # per client, partition order is kept
            await publish(pipeline.process_inference([result.events[i] for i in order],
                                                     result.ts[order]))

    @app.agent(stats)
    async def judge_stats(stream):
        async for event in stream.events():
            record, ts, reason = pipeline.screen_stats(event.value)
            if reason is not None:
                await dead_letter(event.key, event.value, reason)
                continue
            await publish(pipeline.process_stats(record, ts))

    app.modelwatch_pipeline = pipeline
    return app
