"""``modelwatch alerts forward``: send alerts from the alerts topic to one sink.

For back-filling a SIEM that was down or added late, or for a bridge outside the
worker. It reads every partition without a consumer group (so it never moves the
worker's offsets or anyone else's), waits until the sink took each batch, and
with ``--to-end`` stops at the end of every partition.

The end of a partition is the high watermark of a fetch response, never
ListOffsets (``end_offsets``): the embedded broker answers that one with the
base offset of the last batch plus one, short of the real end.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from streams.settings import Settings, add_arguments, resolve
from streams.tabular import UserError
from streams.worker.kafka import aiokafka_options, start_consumer

if TYPE_CHECKING:  # the sinks are imported when alerts are forwarded, not by every command
    from streams.sinks import Sink

log = logging.getLogger("modelwatch.forward")

FETCH_MAX_RECORDS = 500
DELIVERY_ATTEMPTS = 10   # 0.1 s doubling: about 50 s of trying before giving up


@dataclass
class Progress:
    forwarded: int = 0
    skipped: int = 0       # records that are not JSON objects
    partitions: int = 0
    next_offset: dict = field(default_factory=dict)  # partition -> first offset not yet sent


async def forward(settings: Settings, sink: Sink, *, from_offset: int | None = None,
                  from_time_ms: int | None = None, to_end: bool = True,
                  progress: Progress | None = None,
                  delivery_attempts: int = DELIVERY_ATTEMPTS) -> Progress:
    """Send the alerts of ``settings.topic_alerts`` to ``sink``; returns what was done."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import OffsetOutOfRangeError

    from streams.sinks import deliver
    from streams.sinks.base import describe

    progress = progress if progress is not None else Progress()
    topic = settings.topic_alerts
    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False,
                                auto_offset_reset="none", **aiokafka_options(settings))
    try:
        topics = await start_consumer(consumer, settings)
        if topic not in topics:
            raise UserError(f"{settings.broker}: no topic {topic!r} (see --topic-alerts)")
        partitions = await _assign_and_seek(consumer, topic, from_offset, from_time_ms)
        progress.partitions = len(partitions)
        for tp in partitions:
            progress.next_offset[tp.partition] = await consumer.position(tp)
        end: dict = {}  # partition -> high watermark first seen: what "to the end" means
        while not (to_end and len(end) == len(partitions) and all(
                progress.next_offset[tp.partition] >= end[tp] for tp in partitions)):
            try:
                fetched = await consumer.getmany(timeout_ms=500, max_records=FETCH_MAX_RECORDS)
            except OffsetOutOfRangeError as exc:
                await _out_of_range(consumer, exc, progress)
                continue
            for tp in partitions:
                if tp not in end and consumer.highwater(tp) is not None:
                    end[tp] = consumer.highwater(tp)
            batch, last = [], {}
            for tp, records in fetched.items():
                for record in records:
                    if from_time_ms is not None and 0 <= record.timestamp < from_time_ms:
                        continue
                    alert = _decode(record.value)
                    if alert is None:
                        progress.skipped += 1
                    else:
                        batch.append(alert)
                last[tp.partition] = records[-1].offset + 1
            if batch:
                try:
                    await deliver(sink, batch, attempts=delivery_attempts)
                except Exception as exc:
                    resume = min(progress.next_offset.values())
                    raise UserError(
                        f"alerts forward: {sink.name}: {describe(exc)}; gave up after "
                        f"{delivery_attempts} attempts with {progress.forwarded} alerts sent; "
                        f"resume with --from-offset {resume}") from None
                progress.forwarded += len(batch)
            progress.next_offset.update(last)
        return progress
    finally:
        await consumer.stop()
        await sink.close()


async def _assign_and_seek(consumer, topic: str, from_offset: int | None,
                           from_time_ms: int | None) -> list:
    from aiokafka import TopicPartition

    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(partitions)
    if from_offset is not None:
        first = await consumer.beginning_offsets(partitions)
        for tp in partitions:
            consumer.seek(tp, max(from_offset, first[tp]))
    elif from_time_ms is not None:
        found = await consumer.offsets_for_times({tp: from_time_ms for tp in partitions})
        for tp in partitions:
            # "No record that late" comes back as None, or from the embedded broker as
            # offset 0 with timestamp -1: read from the start, the time filter skips.
            hit = found.get(tp)
            if hit is not None and hit.timestamp >= 0:
                consumer.seek(tp, hit.offset)
            else:
                await consumer.seek_to_beginning(tp)
    else:
        await consumer.seek_to_beginning(*partitions)
    return partitions


async def _out_of_range(consumer, exc, progress: Progress) -> None:
    """Before the log start: start there; past the end: nothing left in that partition."""
    asked = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    if not asked:
        raise exc
    first = await consumer.beginning_offsets(list(asked))
    for tp, offset in asked.items():
        if offset < first[tp]:
            consumer.seek(tp, first[tp])
            progress.next_offset[tp.partition] = first[tp]
        else:
            await consumer.seek_to_end(tp)
            progress.next_offset[tp.partition] = await consumer.position(tp)


def _decode(value: bytes | None) -> dict | None:
    try:
        alert = msgspec.json.decode(value) if value else None
    except msgspec.DecodeError:
        return None
    return alert if isinstance(alert, dict) else None


# --- command line ------------------------------------------------------------------


def forward_command(args: argparse.Namespace) -> int:
    # Imported here: every modelwatch command registers this verb, few run it.
    import asyncio

    from streams.records import parse_ts
    from streams.sinks import open_sink

    settings = resolve(args)
    if settings.broker is None:
        raise UserError("alerts forward: needs --broker or MODELWATCH_BROKER")
    if args.from_offset is not None and args.from_offset < 0:
        raise UserError(f"alerts forward: --from-offset {args.from_offset}: expected 0 or more")
    from_time_ms = None
    if args.from_time is not None:
        try:
            from_time_ms = round(parse_ts(args.from_time) * 1000)
        except ValueError:
            raise UserError(f"alerts forward: --from-time: not an RFC 3339 time: "
                            f"{args.from_time!r}") from None
    sink = open_sink(args.sink)
    progress = Progress()
    # aiokafka logs each failed connection; the failure that matters is said once, below.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    def summary() -> None:
        skipped = f", {progress.skipped} records not alerts skipped" if progress.skipped else ""
        print(f"alerts forward: {progress.forwarded} alerts from {settings.topic_alerts} "
              f"({progress.partitions} partitions) -> {sink.name}{skipped}", file=sys.stderr)

    try:
        asyncio.run(forward(settings, sink, from_offset=args.from_offset,
                            from_time_ms=from_time_ms, to_end=args.to_end, progress=progress))
    except KeyboardInterrupt:  # following, stopped with Ctrl-C
        summary()
        raise
    summary()
    return 0


def add_forward_parser(subparsers) -> None:
    """``modelwatch alerts forward``; the parser class of ``subparsers`` is kept."""
    alerts = subparsers.add_parser("alerts", help="work with the alerts topic")
    verbs = alerts.add_subparsers(dest="alerts_command", required=True, metavar="COMMAND",
                                  parser_class=type(alerts))
    p = verbs.add_parser("forward", help="send alerts from the alerts topic to a SIEM sink",
                         description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--sink", required=True, metavar="URL",
                   help="where to: syslog+udp://, syslog+tcp://, syslog+tls://, hec+https://, "
                        "webhook+https://, file:///abs/path.jsonl (see the README)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--from-offset", type=int, metavar="N",
                       help="start at offset N of every partition (default: the beginning)")
    start.add_argument("--from-time", metavar="RFC3339",
                       help="start at the alerts the broker received at or after this time "
                            "(the Kafka record's timestamp, not the alert's @timestamp, which is "
                            "the event time of its trigger)")
    p.add_argument("--to-end", action="store_true",
                   help="stop at the end of every partition (default: keep following)")
    add_arguments(p)
    p.set_defaults(func=forward_command)
