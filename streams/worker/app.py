"""The Faust worker: inference logs and training stats in, alerts and dead letters out.

One agent per input topic runs :class:`streams.pipeline.Pipeline` (the code
``replay`` runs) on batches of Kafka records; each record may hold a JSON array
of events, all of one partition.

State and exact recovery
------------------------
Per-key detector state (a client of a model, a source of a dataset) lives in
Faust tables with changelogs (RocksDB on disk). Writing every touched key after
every batch would send ~20 KiB per client per batch to the changelog, so the
worker keeps working copies in memory and *checkpoints* every ``CHECKPOINT_S``
(the first after a rebalance at once). Under the batch lock it takes a cut: the
changed keys serialized (with the partition and offset of the last record
applied to each), the alerts and dead letters sent and the records judged so
far. Then, while judging goes on, it waits until those alerts and dead letters
are acknowledged, writes the keys and waits for them, and only then acknowledges
the records, which lets Faust commit their offsets. So a committed offset never
runs ahead of the state, and after a kill -9 the records after the last commit
are read again: a key whose stored state already holds a record skips it, the
others apply it. The state comes back equal to that of an uninterrupted run, and
an alert raised again carries the same ``event.id``.

Population baselines span partitions: each partition's clients are summed per
shard (rebuilt from the restored client states after a restart or rebalance).
When a shard's events enter an event-time epoch it publishes its snapshot and its
mark to a global table, and a shard judges an epoch's events only once every
shard has entered it (:class:`streams.worker.decode.InferenceJudge`), so the
alerts are ``replay --partitions N``'s whatever the timing. Other workers' marks
are read from the table's changelog by a consumer of its own; a partition idle at
its end for ``IDLE_S`` enters the latest epoch, so the others go on.

The pieces: :mod:`streams.worker.checkpoint` (the protocol), :mod:`streams.worker.decode`
(judging a batch), :mod:`streams.worker.tables` (the working copies); this module
declares the topics and tables and wires them to two agents, a timer and the
rebalance handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
import time

import faust
import msgspec
import numpy as np
from faust.types import TP

from detectors.clients import ClientState
from detectors.config import Thresholds
from detectors.poisoning import SourceState
from detectors.profile import Profile
from streams.metrics import WorkerMetrics
from streams.pipeline import Pipeline
from streams.settings import Settings
from streams.sinks.base import Outbox
from streams.worker.checkpoint import HOLE_RETRY_S, Checkpoint, Stopped
from streams.worker.decode import InferenceJudge, Judged, StatsJudge, dead_letter_record
from streams.worker.tables import KeyedStates, Prefetch, SharedSnapshots, TableManager, write
from streams.worker.transport import connection, faust_broker_urls, follow_topic, member_client_id

TAKE = 10_000        # records per processing batch at most
WITHIN_S = 0.05      # ... or what arrived within this time
# Behind by this many records or more, an agent gathers batches before judging them, up
# to TAKE records, GATHER_BYTES of values or GATHER_S: the detectors' cost per client per
# batch is spread over more events (one event per record: ~90 us an event at 1,000-record
# batches, ~26 at 10,000), and those records are late anyway. Caught up, a batch is judged
# as it comes, so latency is unchanged.
GATHER_BEHIND = 2_000
GATHER_BYTES = 12 << 20
GATHER_S = 0.5
# Detectors cost ~0.3 ms per client per batch on top of the per-event cost: under a
# backlog, batches must be large, so fetch far more than Faust's 1 MiB per partition.
FETCH_BYTES = 16 << 20
TICK_S = 1.0
# A partition read to its end with no record for this long enters the latest epoch of
# any partition, so theirs can be judged (Flink's idle-source timeout). An event of an
# earlier epoch that arrives after that is judged late, against the newer population.
IDLE_S = 5.0
WAIT_TICK_S = 0.25
CRASH_EXIT_S = 20.0
MAX_WAITING = 50_000  # events waiting for other partitions' epochs (~2.5 KB each)
# A judged record that has waited this long for a commit means something is stuck: say
# so, with every task's and thread's stack (what ``kill -USR1`` prints at any time).
STALL_S = 60.0
# The state's size walks every tracked key's arrays: ~0.1 s at 20,000 clients, 10 % of a
# core if done every tick. Prometheus scrapes every 15 s by default.
STATE_BYTES_S = 15.0


def build_app(settings: Settings, profiles: list[Profile], thresholds: Thresholds, *,
              partitions: dict[str, int], metrics: WorkerMetrics | None = None,
              outboxes: list[Outbox] = ()) -> faust.App:
    """The worker's Faust app; ``partitions`` gives each input topic's partition count,
    ``outboxes`` the alert outputs besides the alerts topic."""
    app = faust.App(
        "modelwatch",
        broker=faust_broker_urls(settings.broker),
        broker_credentials=_credentials(settings),
        broker_client_id=member_client_id(),  # a restart removes its killed predecessor
        store="rocksdb://",
        datadir=str(settings.state_dir),
        broker_session_timeout=6,  # Tansu holds a join for half of it, a dead member all of it
        broker_heartbeat_interval=2,  # a third of the session, as Kafka advises (Faust: 3 s)
        producer_acks=-1,
        web_enabled=False,
        topic_disable_leader=True,
        stream_wait_empty=False,    # un-acked records are read again by the next owner
        consumer_max_fetch_size=FETCH_BYTES,
        stream_buffer_maxsize=TAKE,
        TableManager=TableManager,
    )
    n_inference = partitions[settings.topic_inference]
    n_stats = partitions[settings.topic_stats]
    inference = app.topic(settings.topic_inference, key_serializer="raw", value_serializer="raw")
    stats = app.topic(settings.topic_stats, key_serializer="raw", value_serializer="raw")
    alerts_topic = app.topic(settings.topic_alerts, key_serializer="raw", value_serializer="raw")
    dead_topic = app.topic(settings.topic_deadletter, key_serializer="raw", value_serializer="raw")
    raw = {"key_type": bytes, "value_type": bytes}  # Faust stores bytes types as raw
    clients = KeyedStates(app.Table("clients", partitions=n_inference, **raw), ClientState)
    clients.prefetch = Prefetch(app.conf.tabledir, "clients", ClientState)
    sources = KeyedStates(app.Table("sources", partitions=n_stats, **raw), SourceState)
    shared = SharedSnapshots(app.GlobalTable("populations", partitions=n_inference, **raw))
    pipeline = Pipeline(profiles, thresholds, clients=clients, sources=sources, shared=shared,
                        shards=n_inference)
    encoder = msgspec.json.Encoder()
    metrics = metrics or WorkerMetrics()
    reported_evictions = dict(pipeline.counters.evictions)
    read_up_to: dict[tuple[str, int], int] = {}  # (topic, partition) -> next offset to judge
    last_record_at: dict[tuple[str, int], float] = {}  # (topic, partition) -> clock time
    judge_inference_batch = InferenceJudge(pipeline, clients, metrics, settings.topic_inference)
    judge_stats_batch = StatsJudge(pipeline, sources, metrics, settings.topic_stats)

    def cut_state(owned) -> list[tuple]:
        inference_owned = owned(settings.topic_inference)
        return (clients.snapshot(inference_owned) + shared.snapshot(inference_owned)
                + sources.snapshot(owned(settings.topic_stats)))

    def forget(revoked: set[tuple[str, int]]) -> None:
        inference_revoked = {p for t, p in revoked if t == settings.topic_inference}
        judge_inference_batch.forget(inference_revoked)
        shared.forget(inference_revoked)
        judge_stats_batch.forget({p for t, p in revoked if t == settings.topic_stats})

    async def crash(exc: BaseException) -> None:
        """Stop the worker on a failure. Faust's stop after a crash can hang (seen: a
        last offset commit through a consumer thread already stopped), and a worker
        that neither judges nor exits is the worst outcome: exit if it has not ended
        within CRASH_EXIT_S. Nothing it did not judge has been committed."""
        asyncio.get_running_loop().call_later(CRASH_EXIT_S, exit_now)
        await app.crash(exc)

    checkpoint = Checkpoint(cut_state=cut_state, write=write, written=shared.written,
                            forget=forget, crash=crash,
                            deferred=judge_inference_batch.deferred,
                            generation=lambda: app.consumer_generation_id,
                            committed=lambda tp: app.consumer.committed_offset(TP(*tp)),
                            rewind=lambda tp, offset: app.consumer.seek(TP(*tp), offset))

    async def send(judged: Judged) -> None:
        for dead in judged.dead_letters:
            metrics.invalid(dead.topic, dead.reason)
            key, value, headers = dead_letter_record(*dead)
            checkpoint.sent(await dead_topic.send(key=key, value=value, headers=headers))
        alerts = judged.alerts
        for alert in alerts:
            checkpoint.sent(await alerts_topic.send(key=alert.event.id.encode(),
                                                    value=encoder.encode(alert)))
        if alerts:
            metrics.sink("kafka", delivered=len(alerts))
            as_dicts = [msgspec.to_builtins(a) for a in alerts]
            for alert in as_dicts:
                metrics.alert(alert)
            for outbox in outboxes:
                outbox.offer(as_dicts)

    def observe(topic: str, batch, started: float) -> None:
        metrics.kafka_records(topic, len(batch))
        metrics.processing(topic, time.perf_counter() - started)
        now = time.monotonic()
        for event in batch:
            tp = (topic, event.message.partition)
            read_up_to[tp] = max(read_up_to.get(tp, 0), event.message.offset + 1)
            last_record_at[tp] = now

    def highwater(tp: tuple[str, int]) -> int | None:
        """A partition's end as the consumer last saw it; None if it does not hold the
        partition now (aiokafka asserts on any other: seen, a crash after a rebalance, as
        read_up_to and the checkpoint keep partitions until their revocation runs)."""
        tp = TP(*tp)
        return app.consumer.highwater(tp) if tp in app.consumer.assignment() else None

    state_bytes_due = 0.0

    def report_state() -> None:
        nonlocal state_bytes_due
        for (topic, partition), offset in list(read_up_to.items()):
            end = highwater((topic, partition))
            if end is not None:
                metrics.consumer_lag(topic, partition, max(0, end - offset))
        metrics.tracked("client", len(clients.live))
        for reason, n in pipeline.counters.evictions.items():
            if n > reported_evictions[reason]:
                metrics.evicted(reason, n - reported_evictions[reason])
                reported_evictions[reason] = n
        metrics.tracked("source", len(sources.live))
        if time.monotonic() >= state_bytes_due:
            state_bytes_due = time.monotonic() + STATE_BYTES_S
            # The detector thread adds keys meanwhile: iterate over copies.
            metrics.state_bytes(sum(map(state_size, list(clients.live.values())))
                                + sum(map(state_size, list(sources.live.values()))))
        for outbox in outboxes:
            delivered, failed, dropped = outbox.take_counts()
            metrics.sink(outbox.name, delivered=delivered, failed=failed, dropped=dropped)

    def behind(topic: str, batch) -> int:
        """Records on the broker after the last of ``batch`` in each of its partitions that
        the consumer holds (those unknown count 0)."""
        last: dict[int, int] = {}
        for event in batch:
            message = event.message
            if message.offset > last.get(message.partition, -1):
                last[message.partition] = message.offset
        lag = 0
        for partition, offset in last.items():
            if (end := highwater((topic, partition))) is not None:
                lag += max(0, end - offset - 1)
        return lag

    @app.agent(inference)
    async def judge_inference(stream):
        loop = asyncio.get_running_loop()
        gathered, gathered_bytes, since = [], 0, 0.0
        async for batch in stream.take_events(TAKE, within=WITHIN_S):
            # Every partition here waits for other workers' partitions: read no further
            # until some of it is judged (none here holds the others back).
            while judge_inference_batch.all_waiting(
                    checkpoint.owned(settings.topic_inference), MAX_WAITING):
                await asyncio.sleep(WAIT_TICK_S)
            if not gathered:
                since = time.perf_counter()
            for event in batch:
                event.message.incref()  # take_events acknowledges on return: not these yet
            gathered += batch
            gathered_bytes += sum(len(event.message.value or b"") for event in batch)
            if (len(gathered) < TAKE and gathered_bytes < GATHER_BYTES
                    and time.perf_counter() - since < GATHER_S
                    and behind(settings.topic_inference, batch) >= GATHER_BEHIND):
                continue
            batch, gathered, gathered_bytes = gathered, [], 0
            started = time.perf_counter()
            async with checkpoint.judging("judge_inference", batch) as events:
                for event in batch:  # held now, until a checkpoint acknowledges them
                    event.message.decref()
                # The detectors run in a thread, so the event loop keeps fetching and
                # the next batch grows while this one is judged (bigger batches cost
                # less per event).
                await send(await loop.run_in_executor(None, judge_inference_batch, events))
            observe(settings.topic_inference, batch, started)

    @app.agent(stats)
    async def judge_stats(stream):
        async for batch in stream.take_events(TAKE, within=WITHIN_S):
            started = time.perf_counter()
            async with checkpoint.judging("judge_stats", batch) as events:
                await send(judge_stats_batch(events))
            observe(settings.topic_stats, batch, started)

    @app.timer(TICK_S)
    async def checkpoint_timer() -> None:
        report_state()
        await checkpoint.tick()
        # What it acknowledged, committed now rather than at Faust's next commit (up to
        # 2.8 s later): a restart then reads less again, and sees sooner what was judged.
        await app.consumer.commit()

    def idle_partitions() -> set[int]:
        """Owned inference partitions read to their end, with no record for IDLE_S (none
        while the tables recover: a partition's clients are restored from them)."""
        if app.rebalancing or app.in_recovery or not app.tables.recovery.completed.is_set():
            return set()
        now, idle = time.monotonic(), set()
        for partition in checkpoint.owned(settings.topic_inference):
            tp = (settings.topic_inference, partition)
            end = highwater(tp)
            next_offset = read_up_to.get(tp, checkpoint.next_to_judge(tp) or 0)
            quiet_since = last_record_at.get(tp, checkpoint.progress_at.get(tp, now))
            if end is not None and next_offset >= end and now - quiet_since >= IDLE_S:
                idle.add(partition)
        return idle

    @app.timer(WAIT_TICK_S)
    async def judge_waiting() -> None:
        """Events that wait for other partitions' epochs: enter the idle partitions' and
        judge what other workers' marks freed; write this worker's marks at once when
        they are what holds others back."""
        if checkpoint.lock.locked() or checkpoint.failed:
            return  # a batch under way judges what it frees itself
        idle = idle_partitions()
        if not idle and not judge_inference_batch.any_waiting():
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Stopped):
            async with checkpoint.judging("judge_inference", [], halt=False):
                await send(await loop.run_in_executor(
                    None, judge_inference_batch.enter_idle,
                    idle & checkpoint.owned(settings.topic_inference)))
        if shared.marks_unwritten() and not checkpoint.failed:
            # Even with no record held: an idle worker's marks are what others wait on.
            await checkpoint.commit(force=True)

    @app.task
    async def follow_populations() -> None:
        servers, auth = connection(app)
        await follow_topic(servers, shared.table.changelog_topic.get_topic_name(),
                           shared.received, **auth)

    def where() -> None:
        """What the worker is doing: the checkpoint's state and every task's await chain."""
        print(f"worker: {len(checkpoint.held)} judged records wait for a checkpoint "
              f"(oldest {checkpoint.stalled_s():.0f} s); next offsets "
              f"{dict(sorted(checkpoint.next_offset.items()))}; owned "
              f"{sorted(checkpoint.assigned)}; generation {app.consumer_generation_id}",
              file=sys.stderr)
        consumer = app.consumer
        print(f"worker: consumer flow {'on' if consumer.flow_active else 'off'}, paused "
              f"{sorted(getattr(consumer, '_paused_partitions', ()))}, read up to "
              f"{ {tuple(tp): o for tp, o in getattr(consumer, '_read_offset', {}).items()} }, "
              f"high watermarks { {tuple(tp): consumer.highwater(tp) for tp in consumer.assignment()} }",
              file=sys.stderr)
        for task in asyncio.all_tasks():
            print(f"  task {task.get_name()}: {' -> '.join(await_chain(task))}", file=sys.stderr)
        sys.stderr.flush()

    stall_reported = False

    @app.timer(HOLE_RETRY_S)
    async def refetch_stalled() -> None:
        await checkpoint.refetch_stalled(
            highwater, (settings.topic_inference, settings.topic_stats))

    @app.timer(STALL_S / 4)
    async def stall_watch() -> None:
        nonlocal stall_reported
        stalled = checkpoint.stalled_s()
        if stalled < STALL_S:
            stall_reported = False
        elif not stall_reported:
            stall_reported = True
            print(f"worker: judged records have waited {stalled:.0f} s for a checkpoint",
                  file=sys.stderr)
            where()

    @app.task
    async def answer_usr1() -> None:
        # Replaces the generic dump of the worker framework (mode) with ours.
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, where)

    @app.on_partitions_assigned.connect
    async def take_on(app, assigned_now, **kwargs) -> None:
        await checkpoint.assign((tp.topic, tp.partition) for tp in assigned_now)
        shared.owned = checkpoint.owned(settings.topic_inference)
        clients.prefetch.assigned(shared.owned)
        print(f"worker: {settings.topic_inference} partitions {sorted(shared.owned)}",
              file=sys.stderr)
        # A full collection scans every object the libraries made at start: ~90 ms,
        # several times a minute, all in the alert latency. Set them aside. (While the
        # prefetch runs, it sets them aside when done: a collection now would scan what
        # it read so far, ~1 s on the event loop with 100,000 clients.)
        if not clients.prefetch.running():
            gc.collect()
            gc.freeze()

    @app.on_partitions_revoked.connect
    async def forget_partitions(app, revoked, **kwargs) -> None:
        # The first comes as the worker joins its group: read the stored clients while
        # the broker holds the join (started earlier, it slowed the start-up's own steps).
        clients.prefetch.start()
        await checkpoint.revoke((tp.topic, tp.partition) for tp in revoked)

    app.modelwatch_pipeline = pipeline
    return app


def exit_now() -> None:
    print(f"worker: the stop after the failure did not end in {CRASH_EXIT_S:.0f} s; exiting",
          file=sys.stderr, flush=True)
    os._exit(1)


def await_chain(task: asyncio.Task) -> list[str]:
    """Where a task waits: each coroutine it awaits, outermost first."""
    chain, awaited = [], task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
        if frame is not None:
            chain.append(f"{frame.f_code.co_name} ({frame.f_code.co_filename.rsplit('/', 2)[-1]}"
                         f":{frame.f_lineno})")
        else:
            chain.append(type(awaited).__name__)
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
    return chain


def state_size(state) -> int:
    """Bytes held by a detector state's arrays (the bulk of it)."""
    return sum(v.nbytes for v in vars(state).values() if isinstance(v, np.ndarray))


def _credentials(settings: Settings):
    """TLS / SASL settings as Faust credentials (None: plaintext)."""
    import ssl

    context = None
    if settings.tls_ca or settings.tls_cert:
        context = ssl.create_default_context(cafile=str(settings.tls_ca) if settings.tls_ca else None)
        if settings.tls_cert:
            context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    if settings.sasl_mechanism:
        return faust.SASLCredentials(
            username=settings.sasl_username, password=settings.sasl_password,
            mechanism=settings.sasl_mechanism, ssl_context=context)
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def topic_partitions(settings: Settings, topics: list[str]) -> dict[str, int]:
    """Partition count of each topic (8, Faust's default, for one not created yet)."""
    from kafka import KafkaConsumer

    from streams.worker.kafka import client_options

    consumer = KafkaConsumer(**client_options(settings), enable_auto_commit=False)
    try:
        found = {t: consumer.partitions_for_topic(t) for t in topics}
    finally:
        consumer.close()
    return {t: len(p) if p else 8 for t, p in found.items()}
