"""Streaming speed against the embedded broker (issue 3, section 5), in one run.

1. Ceiling: a group-less aiokafka consumer assigned every partition of
   ``inference-logs`` reads the batched records (JSON arrays of events, as
   ``modelwatch tail`` ships them) and decodes each with msgspec into the
   contract's ``InferenceEvent``; events/s (median of ``--ceiling-runs``).
2. One worker process (``python -m streams.cli worker``, all detectors on, one
   profile) fed a pre-produced backlog of batched records: events/s from its
   consumer group's committed offsets, and the ratio to the ceiling.
3. The same worker fed one event per record.
4. Event-to-alert latency at steady rates (``--rates``, default 5,000 events/s) with
   attacker clients mixed in, so alerts fire steadily.

Every phase has a fresh broker (Tansu keeps everything in memory, and a fresh
consumer group starts from offset 0). Events come from ``bench/replay_speed.py``
(32 features, 1,000 Zipf clients), or from ``--log`` with its ``--profile``
(``bench/realistic_speed.py`` passes its realistic day). Scratch output goes to
``bench/out/stream/``.

Usage: .venv/bin/python bench/stream_speed.py [--backlog N] [--single N] [--latency-s S]
       [--rates 5000,20000] [--log LOG --profile PROFILE]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)  # make_inputs writes under bench/out/speed, relative to the repository
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import bisect  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import ExitStack, suppress  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import msgspec  # noqa: E402
import numpy as np  # noqa: E402

from bench.replay_speed import make_inputs  # noqa: E402
from streams.cli.run import PARTITIONS, create_topics  # noqa: E402
from streams.records import (  # noqa: E402
    InferenceEvent,
    format_ts,
    parse_ts,
    partition_of,  # noqa: E402
)
from streams.settings import resolve  # noqa: E402
from streams.worker.broker import EmbeddedBroker  # noqa: E402

OUT = Path("bench/out/stream")
GROUP = "modelwatch"           # the Faust app id, hence the worker's consumer group
SETTINGS = resolve(argparse.Namespace(), environ={})  # the contract's topic names
TOPIC = SETTINGS.topic_inference
POLL_S = 0.05                  # committed-offset polling interval
CLK = os.sysconf("SC_CLK_TCK")
worker_code = ROOT             # the tree the worker runs from (--worker-code)

partition = functools.lru_cache(maxsize=None)(partition_of)  # murmur2 once per client


class _Client(msgspec.Struct):
    client_id: str


# --------------------------------------------------------------------------- inputs


def load_log(path: Path, n: int) -> tuple[list[bytes], list[str]]:
    """The first ``n`` lines of the inference log (bytes, no newline) and their client ids."""
    lines = []
    with open(path, "rb") as handle:
        for raw in handle:
            lines.append(raw.rstrip(b"\n"))
            if len(lines) == n:
                break
    decode = msgspec.json.Decoder(_Client).decode
    return lines, [decode(line).client_id for line in lines]


def producer(address: str, **options):
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=address, acks="all", linger_ms=5,
                         max_request_size=4 << 20, **options)


def _track(ends: dict[int, int]):
    def acked(meta):
        ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    return acked


def produce_batched(address: str, lines: list[bytes], clients: list[str],
                    batch_events: int) -> tuple[dict[int, int], int]:
    """Ship lines as ``tail`` does: grouped by their client's partition, flushed every
    ``batch_events`` events as one JSON array per partition. Returns the acknowledged
    end offset of each partition and the number of records."""
    ends: dict[int, int] = {}
    acked = _track(ends)
    out = producer(address)
    pending: dict[int, list[bytes]] = {}
    records = 0

    def flush():
        nonlocal records
        for p, events in pending.items():
            out.send(TOPIC, partition=p, value=b"[" + b",".join(events) + b"]").add_callback(acked)
            records += 1
        pending.clear()

    for i, (line, client) in enumerate(zip(lines, clients, strict=True)):
        pending.setdefault(partition(client, PARTITIONS), []).append(line)
        if (i + 1) % batch_events == 0:
            flush()
    flush()
    out.flush()
    out.close()
    return ends, records


def produce_single(address: str, lines: list[bytes], clients: list[str]) -> tuple[dict[int, int], int]:
    """One event per record, keyed by client_id, on its default-partitioner partition."""
    ends: dict[int, int] = {}
    acked = _track(ends)
    out = producer(address)
    for line, client in zip(lines, clients, strict=True):
        key = client.encode()
        out.send(TOPIC, key=key, partition=partition(client, PARTITIONS), value=line).add_callback(acked)
    out.flush()
    out.close()
    return ends, len(lines)


# --------------------------------------------------------------------------- ceiling


async def _ceiling(address: str, ends: dict[int, int]) -> tuple[int, float]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    decode = msgspec.json.Decoder(list[InferenceEvent] | InferenceEvent).decode
    consumer = AIOKafkaConsumer(bootstrap_servers=address, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(TOPIC, p) for p in ends]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        todo = {tp: ends[tp.partition] for tp in tps}
        events, start = 0, time.perf_counter()
        while todo:
            batch = await consumer.getmany(*todo, timeout_ms=1000)
            for tp, records in batch.items():
                for record in records:
                    value = decode(record.value)
                    events += len(value) if isinstance(value, list) else 1
                if records and records[-1].offset + 1 >= todo[tp]:
                    del todo[tp]
        return events, time.perf_counter() - start
    finally:
        await consumer.stop()


def ceiling(address: str, ends: dict[int, int], runs: int) -> list[float]:
    rates = []
    for _ in range(runs):
        events, seconds = asyncio.run(_ceiling(address, ends))
        rates.append(events / seconds)
    return rates


# --------------------------------------------------------------------------- worker


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLK


def peak_rss_mib(pid: int) -> float:
    """A process's peak resident memory so far (VmHWM), MiB."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    kib = next((int(line.split()[1]) for line in status.splitlines()
                if line.startswith("VmHWM:")), None)
    return float("nan") if kib is None else kib / 1024


class Worker:
    """``modelwatch worker`` in its own process group, killed as a whole."""

    def __init__(self, url: str, profiles: Path, log: Path):
        self.state = tempfile.TemporaryDirectory(prefix="stream-speed-state-")
        self.log = open(log, "wb")  # noqa: SIM115 - closed by stop()
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        self.started = time.time()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker", "--broker", url,
             "--profiles", str(Path(profiles).resolve()), "--state-dir", self.state.name,
             "--metrics-port", "0"],
            cwd=worker_code, env=env, stdout=subprocess.DEVNULL, stderr=self.log,
            start_new_session=True)

    def cpu_s(self) -> float:
        return cpu_s(self.process.pid)

    def peak_rss_mib(self) -> float:
        return peak_rss_mib(self.process.pid)

    def check(self) -> None:
        if self.process.poll() is not None:
            self.log.flush()
            tail = Path(self.log.name).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"worker exited with status {self.process.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=8)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        with suppress(ProcessLookupError):  # anything it left in its group
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()
        self.state.cleanup()


class Commits:
    """The worker group's committed offsets on ``inference-logs`` (kafka-python admin,
    explicit partition list: Tansu lists a group only after its first commit)."""

    def __init__(self, address: str):
        from kafka import TopicPartition
        from kafka.admin import KafkaAdminClient

        self.admin = KafkaAdminClient(bootstrap_servers=address, request_timeout_ms=10_000)
        self.tps = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]

    def get(self) -> dict[int, int]:
        from kafka.errors import KafkaError

        try:
            got = self.admin.list_group_offsets({GROUP: self.tps}).get(GROUP, {})
        except (KafkaError, ValueError, KeyError):
            return {}
        return {tp.partition: meta.offset for tp, meta in got.items() if meta.offset >= 0}

    def close(self) -> None:
        self.admin.close()


def events_before(offsets: dict[int, int], cumulative: dict[int, list[int]]) -> int:
    """Events in records before each partition's offset (``cumulative[p][k]``: events in
    the first k records of partition p)."""
    return sum(cumulative[p][min(o, len(cumulative[p]) - 1)] for p, o in offsets.items())


@dataclass
class WorkerRun:
    events: int
    startup_s: float = float("nan")   # spawn to first commit
    samples: list = field(default_factory=list)  # (wall time, events committed, worker CPU s,
    #                                                broker CPU s)
    done: bool = False
    peak_rss_mib: float = float("nan")

    def figures(self) -> dict:
        first = next((s for s in self.samples if s[1] > 0), None)
        if first is None:
            return {}
        last = self.samples[-1]
        busy = [s for s in self.samples if first[1] < s[1] < self.events]
        out = {"first_commit_events": first[1], "commits": len(self.samples),
               "counted": last[1] - first[1]}
        if self.done and last[0] > first[0]:
            out["rate_to_end"] = (last[1] - first[1]) / (last[0] - first[0])
            out["cpu_rate"] = (last[1] - first[1]) / max(last[2] - first[2], 1e-9)
            out["worker_cpu"] = (last[2] - first[2]) / (last[0] - first[0])
            out["broker_cpu"] = (last[3] - first[3]) / (last[0] - first[0])
        if busy:
            out["rate_busy"] = (busy[-1][1] - first[1]) / (busy[-1][0] - first[0])
            out["busy_commits"] = len(busy)
        gaps = np.diff([s[0] for s in self.samples])
        out["commit_gap_s"] = float(np.median(gaps)) if len(gaps) else float("nan")
        out["rate"] = out.get("rate_busy", out.get("rate_to_end", float("nan")))
        return out


def run_worker(broker: EmbeddedBroker, profiles: Path, ends: dict[int, int],
               cumulative: dict[int, list[int]], total: int, log: Path,
               timeout_s: float, stack: ExitStack) -> WorkerRun:
    """Start a worker on a ready backlog; sample its commits until it has everything."""
    commits = Commits(broker.address)
    stack.callback(commits.close)
    worker = Worker(broker.url, profiles, log)
    stack.callback(worker.stop)
    run, seen = WorkerRun(total), -1
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            worker.check()
            offsets = commits.get()
            now, cpu = time.time(), worker.cpu_s()
            count = events_before(offsets, cumulative) if offsets else 0
            if count != seen and count > 0:
                if not run.samples:
                    run.startup_s = now - worker.started
                run.samples.append((now, count, cpu, cpu_s(broker.process.pid)))
                seen = count
            if offsets and all(offsets.get(p, 0) >= end for p, end in ends.items()):
                run.done = True
                break
            time.sleep(POLL_S)
    finally:
        run.peak_rss_mib = worker.peak_rss_mib()
        worker.stop()
    return run


def cumulative_events(lines_per_record: dict[int, list[int]]) -> dict[int, list[int]]:
    return {p: [0, *np.cumsum(sizes).tolist()] for p, sizes in lines_per_record.items()}


def record_sizes_batched(clients: list[str], batch_events: int) -> dict[int, list[int]]:
    """Events per record, per partition, in the order ``produce_batched`` sends them."""
    sizes: dict[int, list[int]] = {p: [] for p in range(PARTITIONS)}
    pending: dict[int, int] = {}
    for i, client in enumerate(clients):
        p = partition(client, PARTITIONS)
        pending[p] = pending.get(p, 0) + 1
        if (i + 1) % batch_events == 0:
            for q, n in pending.items():
                sizes[q].append(n)
            pending.clear()
    for q, n in pending.items():
        sizes[q].append(n)
    return sizes


def record_sizes_single(clients: list[str]) -> dict[int, list[int]]:
    sizes: dict[int, list[int]] = {p: [] for p in range(PARTITIONS)}
    for client in clients:
        sizes[partition(client, PARTITIONS)].append(1)
    return sizes


# --------------------------------------------------------------------------- latency


def _templates(lines: list[bytes]) -> list[tuple[str, bytes]]:
    """Honest events without ts and request_id: (client_id, the rest of the JSON object)."""
    out = []
    for line in lines:
        event = msgspec.json.decode(line)
        event.pop("ts"), event.pop("request_id")
        out.append((event["client_id"], msgspec.json.encode(event)[1:]))
    return out


def _attack_pool(profile_path: Path, lines: list[bytes], n: int, seed: int) -> list[bytes]:
    """Uniform random queries in the profile's feature box, answered by a logistic
    regression fitted to the honest events' predictions: the rest of each JSON object
    after the client's fields."""
    from sklearn.linear_model import LogisticRegression

    from streams.files import load_profile

    profile = load_profile(profile_path)
    decoded = [msgspec.json.decode(line) for line in lines[:10_000]]
    X = np.array([e["features"] for e in decoded])
    y = np.array([e["prediction"] for e in decoded])
    model = LogisticRegression(max_iter=300).fit(X, y)
    rng = np.random.default_rng(seed)
    rows = np.round(rng.uniform(profile.lower, profile.upper, size=(n, profile.n_features)), 3)
    proba = np.round(model.predict_proba(rows), 4)
    model_name = decoded[0]["model"]
    return [msgspec.json.encode({"model": model_name, "features": rows[i].tolist(),
                                 "prediction": int(model.classes_[proba[i].argmax()]),
                                 "probabilities": proba[i].tolist()})[1:]
            for i in range(n)]


@dataclass
class SteadyPlan:
    address: str
    mode: str                 # "batched" or "single"
    rate: float               # events/s
    seconds: float
    first_seq: int            # request ids are f"L{seq}"
    first_attacker: int
    linger_s: float
    batch_events: int
    attack_every_s: float     # a new attacker client starts this often
    attack_len_s: float       # ... and queries for this long
    attack_rate: float        # ... at this many queries/s


def steady_producer(plan: SteadyPlan, log_path: Path, first_line: int, attacks: list[bytes],
                    conn) -> None:
    """Child process: produce ``plan.rate`` events/s for ``plan.seconds``, honest events
    from the log's lines ``first_line`` on, re-stamped; report the send time of every
    flush ((first seq, end seq, wall time) ticks) through ``conn``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it
    lines, _ = load_log(log_path, first_line + int(plan.rate * plan.seconds))
    honest = _templates(lines[first_line:] or lines)
    del lines
    out = producer(plan.address)
    ends: dict[int, int] = {}
    acked = _track(ends)
    rng = np.random.default_rng(plan.first_seq)
    conn.send("ready")
    conn.recv()
    t0 = time.time()
    seq, h, a = plan.first_seq, 0, 0
    ticks: list[tuple[int, int, float]] = []
    pending: dict[int, list[bytes]] = {}
    n_pending, oldest = 0, 0.0
    attackers = set()
    records = 0  # batched mode: one per partition a flush touches
    total = int(plan.rate * plan.seconds)
    tick_s = 0.002 if plan.mode == "single" else min(plan.linger_s / 2, 0.005)

    def flush():
        nonlocal pending, n_pending, records
        for p, events in pending.items():
            out.send(TOPIC, partition=p,
                     value=b"[" + b",".join(events) + b"]").add_callback(acked)
        records += len(pending)
        ticks.append((seq - n_pending, seq, time.time()))
        pending, n_pending = {}, 0

    while seq - plan.first_seq < total:
        now = time.time()
        due = min(int((now - t0) * plan.rate), total) - (seq - plan.first_seq)
        first = seq
        for _ in range(due):
            at = t0 + (seq - plan.first_seq) / plan.rate
            since = at - t0
            newest = int(since // plan.attack_every_s)
            active = [k for k in range(max(0, newest - int(plan.attack_len_s // plan.attack_every_s)),
                                       newest + 1)
                      if since < k * plan.attack_every_s + plan.attack_len_s]
            head = b'{"ts":"%s","request_id":"L%d",' % (format_ts(at).encode(), seq)
            if active and rng.random() < len(active) * plan.attack_rate / plan.rate:
                k = plan.first_attacker + active[int(rng.integers(len(active)))]
                attackers.add(k)
                client = f"attacker-{k}"
                value = head + b'"client_id":"%s","source_ip":"203.0.%d.%d",' % (
                    client.encode(), 113 + k // 250, k % 250 + 1) + attacks[a % len(attacks)]
                a += 1
            else:
                client, rest = honest[h % len(honest)]
                value = head + rest
                h += 1
            p = partition(client, PARTITIONS)
            if plan.mode == "single":
                out.send(TOPIC, key=client.encode(), partition=p, value=value).add_callback(acked)
            else:
                if not n_pending:
                    oldest = now
                pending.setdefault(p, []).append(value)
                n_pending += 1
            seq += 1
            if n_pending >= plan.batch_events:  # full: records stay small however late we are
                flush()
        if plan.mode == "single":
            if seq > first:
                ticks.append((first, seq, time.time()))
        elif n_pending and (now - oldest >= plan.linger_s or seq - plan.first_seq >= total):
            flush()
        time.sleep(tick_s)
    out.flush()
    out.close()
    conn.send({"t0": t0, "ticks": ticks, "events": seq - plan.first_seq,
               "attackers": len(attackers), "attack_events": a,
               "elapsed": time.time() - t0, "ends": ends, "records": records})
    conn.close()


async def _collect_alerts(address: str, sink: list, stop: asyncio.Event) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=address, group_id=None, fetch_max_wait_ms=10,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(SETTINGS.topic_alerts, p) for p in range(PARTITIONS)])
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100)
            arrived = time.time()
            for records in batch.values():
                for record in records:
                    alert = json.loads(record.value)
                    detail = alert.get("modelwatch", {})
                    try:  # when the worker built the alert (wall clock, milliseconds)
                        created = parse_ts(alert["event"]["created"])
                    except (KeyError, TypeError, ValueError):
                        created = float("nan")
                    sink.append((arrived, (detail.get("trigger") or {}).get("request_id"),
                                 alert.get("rule", {}).get("name"), created))
    finally:
        await consumer.stop()


async def _wait_pipe(conn, worker: Worker, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while not conn.poll():
        worker.check()
        if time.monotonic() > deadline:
            raise RuntimeError("steady producer did not report in time")
        await asyncio.sleep(0.1)
    return conn.recv()


async def _latency(args, broker: EmbeddedBroker, profiles: Path, log_path: Path,
                   honest, attacks, stack: ExitStack) -> list[dict]:
    address = broker.address
    worker = Worker(broker.url, profiles, OUT / "worker-latency.log")
    stack.callback(worker.stop)
    alerts: list = []
    stop = asyncio.Event()
    collector = asyncio.create_task(_collect_alerts(address, alerts, stop))
    try:
        # Prime: a few hundred events; once they are committed the worker has joined.
        out = producer(address)
        ends: dict[int, int] = {}
        acked = _track(ends)
        now = time.time()
        for i, (client, rest) in enumerate(honest[:400]):
            value = b'{"ts":"%s","request_id":"P%d",' % (format_ts(now).encode(), i) + rest
            out.send(TOPIC, key=client.encode(), partition=partition(client, PARTITIONS),
                     value=value).add_callback(acked)
        out.flush()
        out.close()
        commits = Commits(address)
        stack.callback(commits.close)
        deadline = time.monotonic() + args.timeout_s
        while True:
            worker.check()
            offsets = await asyncio.to_thread(commits.get)
            if offsets and all(offsets.get(p, 0) >= e for p, e in ends.items()):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("worker did not consume the priming events in time")
            await asyncio.sleep(0.2)
        print(f"  worker ready {time.time() - worker.started:.1f} s after spawn", flush=True)

        ctx = multiprocessing.get_context("spawn")
        results, seq, attacker = [], 0, 0
        for rate, mode in [(r, m) for r in args.rates for m in args.latency_modes.split(",")]:
            plan = SteadyPlan(address, mode, rate, args.settle_s + args.latency_s, seq,
                              attacker, args.linger_ms / 1000, args.batch_events,
                              args.attack_every_s, args.attack_len_s, args.attack_rate)
            parent, child = ctx.Pipe()
            # Each mode its own slice of the log: honest clients do not repeat themselves.
            first_line = (seq + len(honest)) % max(1, args.log_events - int(plan.rate * plan.seconds))
            proc = ctx.Process(target=steady_producer,
                               args=(plan, log_path, first_line, attacks, child), daemon=True)
            proc.start()
            stack.callback(_end_process, proc)
            await _wait_pipe(parent, worker, 60)
            cpu0, broker0 = worker.cpu_s(), cpu_s(broker.process.pid)
            parent.send("go")
            report = await _wait_pipe(parent, worker, plan.seconds + 60)
            stopped = time.time()
            cpu = worker.cpu_s() - cpu0
            broker_cpu = cpu_s(broker.process.pid) - broker0
            # Wait until the worker has committed everything produced (or give up).
            caught_up = float("nan")
            while time.time() - stopped < args.catchup_s:
                worker.check()
                offsets = await asyncio.to_thread(commits.get)
                if all(offsets.get(p, 0) >= e for p, e in report["ends"].items()):
                    caught_up = time.time() - stopped
                    break
                await asyncio.sleep(POLL_S)
            await asyncio.sleep(args.grace_s)  # alerts still in flight
            proc.join(5)
            results.append(_latency_figures(plan, report, alerts, args, cpu))
            results[-1].update(caught_up=caught_up, broker_cpu=broker_cpu)
            seq += report["events"]
            attacker += int(plan.seconds / plan.attack_every_s) + 1
        return results
    finally:
        stop.set()
        await collector


def _end_process(proc) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _latency_figures(plan: SteadyPlan, report: dict, alerts: list, args, worker_cpu: float) -> dict:
    ticks = report["ticks"]
    starts = [t[0] for t in ticks]
    window = (plan.first_seq + int(args.settle_s * plan.rate), plan.first_seq + report["events"])
    sent_lat, due_lat, built, published, rules, total = [], [], [], [], {}, 0
    for arrived, request_id, rule, created in alerts:
        if not (request_id and request_id.startswith("L")):
            continue
        seq = int(request_id[1:])
        if not plan.first_seq <= seq < plan.first_seq + report["events"]:
            continue
        total += 1
        if not window[0] <= seq < window[1]:
            continue
        tick = ticks[bisect.bisect_right(starts, seq) - 1]
        sent_lat.append(arrived - tick[2])
        if created == created:
            built.append(created - tick[2])
            published.append(arrived - created)
        due_lat.append(arrived - (report["t0"] + (seq - plan.first_seq) / plan.rate))
        rules[rule] = rules.get(rule, 0) + 1
    lag = [t[2] - (report["t0"] + (t[1] - 1 - plan.first_seq) / plan.rate) for t in ticks]
    return {"mode": plan.mode, "rate": plan.rate, "events": report["events"], "elapsed": report["elapsed"],
            "records": report["records"] if plan.mode == "batched" else report["events"],
            "attackers": report["attackers"], "attack_events": report["attack_events"],
            "alerts_all": total, "sent": sent_lat, "due": due_lat, "rules": rules,
            "built": built, "published": published,
            "producer_lag_p99": float(np.percentile(lag, 99)) if lag else float("nan"),
            "worker_cpu": worker_cpu}


# --------------------------------------------------------------------------- main


def fresh_broker(stack: ExitStack) -> EmbeddedBroker:
    broker = stack.enter_context(EmbeddedBroker())
    create_topics(broker.address, SETTINGS)
    return broker


def _pct(values, q) -> str:
    return f"{np.percentile(values, q) * 1000:,.0f}" if values else "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=1_500_000,
                        help="events, batched phase (long enough that the 5 s commit gaps matter little)")
    parser.add_argument("--single", type=int, default=50_000, help="events, one-per-record phase")
    parser.add_argument("--batch-events", type=int, default=500,
                        help="events per flush over all partitions (tail's --batch-events)")
    parser.add_argument("--ceiling-runs", type=int, default=3)
    parser.add_argument("--worker-runs", type=int, default=1,
                        help="batched worker runs (each on a fresh broker); median reported")
    parser.add_argument("--rates", type=lambda text: [float(r) for r in text.split(",")],
                        default=[5000.0], help="latency phase events/s, comma-separated")
    parser.add_argument("--log", type=Path,
                        help="inference log to use (default: bench/replay_speed.py's)")
    parser.add_argument("--profile", type=Path, help="the --log's model profile")
    parser.add_argument("--worker-code", type=Path, default=ROOT,
                        help="run the worker from this source tree (python -m from there "
                             "imports its packages): other code measured by the same bench")
    parser.add_argument("--latency-s", type=float, default=40.0, help="measured seconds per mode")
    parser.add_argument("--settle-s", type=float, default=5.0,
                        help="seconds of steady traffic before measuring")
    parser.add_argument("--grace-s", type=float, default=3.0,
                        help="wait for alerts after the worker caught up")
    parser.add_argument("--catchup-s", type=float, default=90.0,
                        help="longest wait for the worker to commit what was produced")
    parser.add_argument("--latency-modes", default="batched,single",
                        help="comma-separated: batched (per-partition arrays), single")
    parser.add_argument("--linger-ms", type=float, default=20.0,
                        help="batched latency mode: longest wait before a flush")
    parser.add_argument("--attack-every-s", type=float, default=0.5)
    parser.add_argument("--attack-len-s", type=float, default=2.0)
    parser.add_argument("--attack-rate", type=float, default=60.0,
                        help="queries/s of each attacker (uniform in the feature box)")
    parser.add_argument("--timeout-s", type=float, default=240.0, help="per worker phase")
    parser.add_argument("--skip", default="", help="comma-separated: batched,single,latency")
    args = parser.parse_args(argv)
    if (args.log is None) != (args.profile is None):
        parser.error("--log and --profile go together")
    global worker_code
    worker_code = args.worker_code.resolve()
    skip = set(filter(None, args.skip.split(",")))
    signal.signal(signal.SIGTERM, _interrupt)  # stopped as a service: unwind like Ctrl-C

    began = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.log is None:
        args.log_events = max(500_000, args.backlog, args.single)
        profile_path, log_path = make_inputs(args.log_events)
    else:  # every phase takes what the log holds, at most
        profile_path, log_path = args.profile, args.log
        with open(log_path, "rb") as handle:
            args.log_events = sum(1 for _ in handle)
        args.backlog, args.single = (min(n, args.log_events) for n in (args.backlog, args.single))
    profiles = OUT / "profiles"
    shutil.rmtree(profiles, ignore_errors=True)  # the worker loads every profile here
    profiles.mkdir()
    shutil.copy(profile_path, profiles / "speed.json")
    lines, clients = load_log(log_path, max(args.backlog, args.single))
    print(f"stream_speed: {len(lines):,} events from {log_path} "
          f"(~{sum(map(len, lines[:1000])) / 1000:.0f} B each), {PARTITIONS} partitions, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    rows: list[tuple[str, str, str]] = []

    # 1 + 2: ceiling and worker on batched records -------------------------------
    batched = []
    if "batched" not in skip:
        sizes = record_sizes_batched(clients[:args.backlog], args.batch_events)
        cumulative = cumulative_events(sizes)
        for r in range(args.worker_runs):
            with ExitStack() as stack:
                broker = fresh_broker(stack)
                t = time.time()
                ends, records = produce_batched(broker.address, lines[:args.backlog],
                                                clients[:args.backlog], args.batch_events)
                assert ends == {p: len(s) for p, s in sizes.items() if s}, (ends, sizes)
                print(f"[batched {r + 1}] produced {args.backlog:,} events in {records:,} records "
                      f"({args.backlog / records:.0f} events/record) in {time.time() - t:.1f} s",
                      flush=True)
                ceil = ceiling(broker.address, ends, args.ceiling_runs)
                print(f"[batched {r + 1}] ceiling events/s: "
                      f"{', '.join(f'{c:,.0f}' for c in ceil)}", flush=True)
                run = run_worker(broker, profiles, ends, cumulative,
                                 args.backlog, OUT / f"worker-batched-{r + 1}.log",
                                 args.timeout_s, stack)
                fig = run.figures()
                print(f"[batched {r + 1}] worker: {_describe(run, fig)}", flush=True)
                batched.append((statistics.median(ceil), run, fig))
        ceil_med = statistics.median(c for c, _, _ in batched)
        rates = [f["rate"] for _, _, f in batched if f.get("rate") is not None]
        rows.append(("ceiling: raw aiokafka + msgspec, batched records",
                     f"{ceil_med:,.0f}", f"median of {args.ceiling_runs * len(batched)} passes"))
        if rates:
            worker_rate = statistics.median(rates)
            cpu = statistics.median(f.get("cpu_rate", float("nan")) for _, _, f in batched)
            rows.append(("worker, batched records (target >= 80,000, >= 40 % of ceiling)",
                         f"{worker_rate:,.0f}",
                         f"{worker_rate / ceil_med:.1%} of ceiling; "
                         f"{cpu:,.0f} per worker CPU-second"))

    # 3: one event per record ---------------------------------------------------
    if "single" not in skip:
        with ExitStack() as stack:
            broker = fresh_broker(stack)
            t = time.time()
            ends, records = produce_single(broker.address, lines[:args.single], clients[:args.single])
            print(f"[single] produced {args.single:,} one-event records in {time.time() - t:.1f} s",
                  flush=True)
            ceil = ceiling(broker.address, ends, 1)
            cumulative = cumulative_events(record_sizes_single(clients[:args.single]))
            run = run_worker(broker, profiles, ends, cumulative,
                             args.single, OUT / "worker-single.log", args.timeout_s, stack)
            fig = run.figures()
            print(f"[single] ceiling {ceil[0]:,.0f} events/s; worker: {_describe(run, fig)}",
                  flush=True)
            rows.append(("ceiling: raw aiokafka + msgspec, one event per record",
                         f"{ceil[0]:,.0f}", "one pass"))
            if fig.get("rate") is not None:
                rows.append(("worker, one event per record (target >= 10,000)", f"{fig['rate']:,.0f}",
                             f"{fig['rate'] / ceil[0]:.1%} of its ceiling; "
                             f"{fig.get('cpu_rate', float('nan')):,.0f} per worker CPU-second"))

    # 4: latency at a steady rate -----------------------------------------------
    if "latency" not in skip:
        honest = _templates(lines[:400])  # priming events
        n_attack = int((args.latency_s + args.settle_s) / args.attack_every_s + 2) * int(
            args.attack_len_s * args.attack_rate + 1)
        attacks = _attack_pool(profile_path, lines, min(n_attack, 50_000), seed=1)
        with ExitStack() as stack:
            broker = fresh_broker(stack)
            print(f"[latency] {', '.join(f'{r:,.0f}' for r in args.rates)} events/s, modes "
                  f"{args.latency_modes}", flush=True)
            results = asyncio.run(_latency(args, broker, profiles, log_path, honest, attacks,
                                           stack))
        for res in results:
            rate = res["events"] / res["elapsed"]
            print(f"[latency {res['mode']} {res['rate']:,.0f}/s] produced {res['events']:,} events in {res['records']:,} "
                  f"records at {rate:,.0f}/s (producer lag p99 {res['producer_lag_p99'] * 1000:.0f} ms);"
                  f" {res['attackers']} attackers, {res['attack_events']:,} attack events; "
                  f"{res['alerts_all']} alerts on its events, {len(res['sent'])} in the window "
                  f"{dict(sorted(res['rules'].items()))}; worker CPU "
                  f"{res['worker_cpu'] / res['elapsed']:.0%}, broker "
                  f"{res['broker_cpu'] / res['elapsed']:.0%} of a core while producing; "
                  + (f"worker committed everything {res['caught_up']:.1f} s after the producer "
                     "stopped" if res["caught_up"] == res["caught_up"] else
                     f"worker had NOT caught up {args.catchup_s:.0f} s after the producer stopped"),
                  flush=True)
            lat = res["sent"]
            rows.append((f"latency at {res['rate']:,.0f}/s, {res['mode']} records "
                         f"(~{res['events'] / max(res['records'], 1):.0f} events/record), ms "
                         "from send: p50/p90/p99/max",
                         f"{_pct(lat, 50)}/{_pct(lat, 90)}/{_pct(lat, 99)}/{_pct(lat, 100)}",
                         f"n={len(lat)}; from due time p99 {_pct(res['due'], 99)}; "
                         f"send->alert built p50/p99 {_pct(res['built'], 50)}/"
                         f"{_pct(res['built'], 99)}, built->arrived p50/p99 "
                         f"{_pct(res['published'], 50)}/{_pct(res['published'], 99)}"
                         + ("" if res["caught_up"] == res["caught_up"] else
                            "; WORKER FELL BEHIND: lower bounds, alerts may be missing")))
            if not lat:
                print(f"[latency {res['mode']} {res['rate']:,.0f}/s] WARNING: no alerts arrived for the window",
                      flush=True)

    print(f"\nstream_speed figures ({time.time() - began:.0f} s in all)")
    width = max(len(r[0]) for r in rows) if rows else 10
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>22}  {note}")


def _interrupt(*_):
    raise KeyboardInterrupt


def _describe(run: WorkerRun, fig: dict) -> str:
    if not fig:
        return f"no commit seen ({'done' if run.done else 'timed out'})"
    text = (f"first commit {run.startup_s:.1f} s after spawn with {fig['first_commit_events']:,} "
            f"events; {fig['counted']:,} events counted after it over {fig['commits']} commits "
            f"(median gap {fig['commit_gap_s']:.1f} s)")
    if "rate_busy" in fig:
        text += f"; {fig['rate_busy']:,.0f}/s between commits while busy"
    if "rate_to_end" in fig:
        text += (f"; {fig['rate_to_end']:,.0f}/s to the commit that reached the end "
                 f"(includes up to one commit gap idle); {fig['cpu_rate']:,.0f} per worker CPU-s; "
                 f"CPU worker {fig['worker_cpu']:.0%}, broker {fig['broker_cpu']:.0%} of a core")
    text += f"; worker peak RSS {run.peak_rss_mib:,.0f} MiB"
    if not run.done:
        text += "; TIMED OUT before the end"
    return text


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("stream_speed: interrupted; worker and broker stopped", file=sys.stderr)
        sys.exit(130)
