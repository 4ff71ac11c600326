"""What the worker checks before Faust starts: local state that the broker no longer backs.

The worker's tables live in RocksDB under the state folder, each partition's
database holding the last changelog offset it applied. When the broker lost its
data (the embedded broker keeps everything in memory; a durable one may be
restored from an older backup), that offset is at or past the changelog's end:
Faust then stops with a ``ConsistencyError`` at every start, and if the
changelog is empty it would instead reuse state whose "already applied"
positions point at records the new broker has not even received. Neither can be
repaired locally: the broker's changelogs are the truth, so the worker says so
in one line and starts clean from them.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys

from streams.settings import Settings
from streams.worker.tables import partition_databases, read_only, stored_offset


def stored_offsets(app) -> dict[tuple[str, int], int]:
    """(changelog topic, partition) -> last offset applied, for each table database on disk."""
    found = {}
    for table in app.tables.values():
        changelog = table.changelog_topic.get_topic_name()
        for partition, path in partition_databases(app.conf.tabledir, table.name).items():
            with read_only(path) as db:
                offset = stored_offset(db)
            if offset is not None:
                found[(changelog, partition)] = offset
    return found


async def _broker_ends(settings: Settings, wanted: set[tuple[str, int]]) -> dict:
    """(topic, partition) -> the broker's high watermark (0 for a topic it does not have)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.worker.kafka import aiokafka_options, start_consumer
    from streams.worker.transport import fetched_highwaters

    options = aiokafka_options(settings)
    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **options)
    try:
        topics = await start_consumer(consumer, settings)
        tps = [TopicPartition(t, p) for t, p in wanted
               if t in topics and p in (consumer.partitions_for_topic(t) or ())]
        # ListOffsets on the embedded broker stops short of the end (the base offset of
        # the last batch + 1; -1 when empty): a fetch there gives the high watermark.
        listed = {tp: max(end, 0) for tp, end in (await consumer.end_offsets(tps)).items()} \
            if tps else {}
    finally:
        await consumer.stop()
    servers = options.pop("bootstrap_servers")
    nonempty = [tp for tp, end in listed.items() if end > 0]
    if nonempty:
        listed.update(await fetched_highwaters(servers, listed, nonempty, **options))
    return {(tp.topic, tp.partition): end for tp, end in listed.items()}


def stale_state(app, settings: Settings) -> str | None:
    """Why the tables on disk do not belong to this broker's changelogs, or None."""
    stored = stored_offsets(app)
    if not stored:
        return None
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # a failed connection is said once, by the caller
    try:
        ends = asyncio.run(_broker_ends(settings, set(stored)))
    finally:
        quiet.setLevel(level)
    ahead = sorted((tp, offset) for tp, offset in stored.items() if offset >= ends.get(tp, 0))
    if not ahead:
        return None
    (topic, partition), offset = ahead[0]
    more = f" and {len(ahead) - 1} more partitions" if len(ahead) > 1 else ""
    return (f"state in {settings.state_dir} is from a broker that no longer has its changelog "
            f"({topic}[{partition}] applied up to offset {offset}, the broker ends at "
            f"{ends.get((topic, partition), 0)}{more})")


def start_clean_if_stale(app, settings: Settings) -> bool:
    """Remove the tables on disk if the broker no longer backs them (one line on stderr)."""
    why = stale_state(app, settings)
    if why is None:
        return False
    print(f"worker: {why}; starting clean from the broker's changelogs", file=sys.stderr,
          flush=True)
    shutil.rmtree(app.conf.tabledir, ignore_errors=True)
    return True
