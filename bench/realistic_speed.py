"""Speed on realistic traffic (issue 12), each figure beside its ceiling in the same run.

The traffic: a two-hour day of the digits model (64 features) with the honest mix of the
detection bench (``streams.demo.scenario.production_clients``: light, medium and heavy users,
sensor noise, sites with another calibration, service back-ends, batch re-scoring,
backfills, probes, QA suites, entities re-scored, label-only, NAT offices) and a few
attackers (uniform and Jacobian extraction, a boundary walk, a 5-key sybil), seeded and
cached under bench/out/realistic/. The profile is rebuilt every run with
``modelwatch profile`` (it follows the code).

Parts (``--parts``, each a few minutes at most):

- ``replay``: ``modelwatch replay`` pinned to one core (``taskset -c 0``, one BLAS
  thread), wall and CPU, beside the ceiling of decoding the same file line by line
  (msgspec into the contract's ``InferenceEvent``; ``json.loads`` too), interleaved,
  ``--runs`` times; on this day and on ``bench/replay_speed.py``'s Zipf log
  (``--traffic``). Alert ids are hashed: the same traffic must give the same ids.
- ``stream``: ``bench/stream_speed.py`` on this day against the real broker: the
  worker fed ~10-event records and one event per record, beside a bare aiokafka
  consumer reading the same records; event-to-alert latency at steady 5,000 and
  20,000 events/s in ~10-event records.
- ``workers``: ``bench/workers_speed.py``: the same backlog judged by one worker and by
  ``--workers`` workers in one consumer group (``--runs`` runs of each, interleaved, each on
  a fresh broker): wall events/s until all is committed, the workers' CPU-seconds, events
  per worker CPU-second, the bare-consumer ceiling of the same run, the partitions each
  worker got, and the alert ids against one worker's and ``modelwatch replay``'s.
- ``batches``: the replay pipeline in-process, fed the day in batches of ``--batch-sizes``
  events (a worker's batches: a few hundred events at a light load, thousands under a
  backlog), beside screening (decoding and validating) the same batches: the cost a
  client pays per batch, which is what holds the worker back at small batches.
- ``memory``: resident memory growth per tracked client, in-process (the replay
  pipeline), for light clients (``--light-queries`` each, 100,000 of them) and heavy
  ones (``--heavy-queries`` each), events drawn from this day's honest queries.

Usage:
    .venv/bin/python bench/realistic_speed.py [--parts replay,batches,stream,memory] [--runs 3]
    .venv/bin/python bench/realistic_speed.py --parts workers --workers 1,2 --runs 3
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one core: no BLAS threads either
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import msgspec  # noqa: E402
import numpy as np  # noqa: E402

OUT = Path("bench/out/realistic")
DAY_S = 7200.0
EVENTS_PER_RECORD = 10
DECODE = """
import sys, msgspec
from streams.records import InferenceEvent
decode = msgspec.json.Decoder(InferenceEvent).decode
n = 0
with open(sys.argv[1], "rb") as handle:
    for line in handle:
        decode(line)
        n += 1
print(n)
"""
JSON_LOADS = """
import sys, json
n = 0
with open(sys.argv[1], "rb") as handle:
    for line in handle:
        json.loads(line)
        n += 1
print(n)
"""


# --------------------------------------------------------------------------- traffic


def make_day(seed: int, clients: int) -> tuple[Path, Path]:
    """The realistic day's log (cached) and its profile (rebuilt: it follows the code)."""
    OUT.mkdir(parents=True, exist_ok=True)
    log, train = OUT / f"day-s{seed}-c{clients}.jsonl", OUT / f"train-s{seed}.csv"
    kinds = log.with_suffix(".kinds.json")
    if not (log.exists() and train.exists() and kinds.exists()):
        from streams.demo import scenario

        started = time.perf_counter()
        victim = scenario.load_victim("digits", seed)
        rng = np.random.default_rng([seed, 12])
        identities = scenario.Identities(rng)
        truth: dict[str, dict] = {}
        events = scenario.production_clients(victim, clients, rng, scenario.DEFAULT_T0, DAY_S,
                                             identities, truth, scenario.honest_mix(rng))
        events += _attackers(victim, rng, identities, truth)
        scenario.write_jsonl(log, scenario.sort_events(events))
        scenario.write_csv(train, victim, victim.X_train, victim.y_train)
        kinds.write_text(json.dumps({c: t["behaviour"] for c, t in truth.items()}))
        print(f"generated {len(events):,} events of {len(truth)} keys in "
              f"{time.perf_counter() - started:.0f} s -> {log}", flush=True)
    profile = OUT / "profile.json"
    subprocess.run([sys.executable, "-m", "streams.cli", "profile", "--model", "digits-mlp",
                    "--dataset", "digits", "--data", str(train), "--label-column", "y",
                    "--out", str(profile)], check=True, capture_output=True)
    return profile, log


def _attackers(victim, rng, identities, truth) -> list[dict]:
    """A few attackers from ``streams.demo.scenario``, paced as scripts, at random times."""
    from streams.demo import scenario

    plans = [
        ("uniform extraction", 1, lambda rec: scenario.uniform_extraction(victim, rec, rng, 1000)),
        ("uniform extraction", 1, lambda rec: scenario.uniform_extraction(victim, rec, rng, 500)),
        ("Jacobian extraction", 1, lambda rec: scenario.jacobian_extraction(victim, rec, rng)),
        ("boundary walk", 1, lambda rec: scenario.boundary_walk_attack(
            victim, rec, rng, victim.X_attacker[0])),
        ("boundary walk", 1, lambda rec: scenario.boundary_walk_attack(
            victim, rec, rng, victim.X_attacker[1])),
        ("sybil uniform extraction", 5,
         lambda rec: scenario.uniform_extraction(victim, rec, rng, 1500)),
    ]
    events = []
    for name, n_ids, attack in plans:
        recorder = scenario.QueryRecorder(victim, 20)
        attack(recorder)
        sizes = [len(rows) for rows, _ in recorder.requests]
        times = scenario.DEFAULT_T0 + rng.uniform(0, DAY_S / 2) + scenario.paced_times(
            sizes, 0.0, rng)
        ids = [identities.client_id() for _ in range(n_ids)]
        events += scenario.recorded_events(recorder, ids, identities.ip(), times, rng)
        truth.update({cid: {"behaviour": f"attack: {name}"} for cid in ids})
    return events


def describe(log: Path) -> str:
    kinds = json.loads(log.with_suffix(".kinds.json").read_text())
    decode = msgspec.json.Decoder(_Client).decode
    per_client: dict[str, int] = {}
    with open(log, "rb") as handle:
        for line in handle:
            cid = decode(line).client_id
            per_client[cid] = per_client.get(cid, 0) + 1
    counts = np.array(list(per_client.values()))
    by_kind: dict[str, list[int]] = {}
    for cid, n in per_client.items():
        by_kind.setdefault(kinds.get(cid, "?"), []).append(n)
    mix = ", ".join(f"{k} {len(v)} ({sum(v):,} ev)" for k, v in
                    sorted(by_kind.items(), key=lambda kv: -sum(kv[1])))
    return (f"{counts.sum():,} events, {len(counts)} keys (events per key: median "
            f"{np.median(counts):.0f}, max {counts.max():,}; {int((counts <= 20).sum())} keys "
            f"with <= 20); kinds: {mix}")


class _Client(msgspec.Struct):
    client_id: str


# --------------------------------------------------------------------------- replay


def timed(command: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Wall seconds, the child's CPU seconds (user + system) and its stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, done.stdout


def alert_ids(path: Path) -> tuple[int, str]:
    ids = sorted(json.loads(line)["event"]["id"] for line in path.read_text().splitlines())
    return len(ids), hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]


def replay_part(name: str, profile: Path, log: Path, runs: int) -> list[tuple[str, str, str]]:
    one_core = ["taskset", "-c", "0"]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    alerts = OUT / f"alerts-{name}.jsonl"
    commands = {
        "ceiling: msgspec decode into InferenceEvent": [*one_core, sys.executable, "-c", DECODE,
                                                         str(log)],
        "ceiling: json.loads of each line": [*one_core, sys.executable, "-c", JSON_LOADS,
                                             str(log)],
        "modelwatch replay": [*one_core, sys.executable, "-m", "streams.cli", "replay",
                              "--profile", str(profile), "--inference-log", str(log),
                              "--alerts-out", str(alerts)],
    }
    with open(log, "rb") as handle:
        events = sum(1 for _ in handle)
    walls: dict[str, list[float]] = {k: [] for k in commands}
    cpus: dict[str, list[float]] = {k: [] for k in commands}
    hashes = set()
    for r in range(runs):  # interleaved: the machine's load hits all alike
        for label, command in commands.items():
            wall, cpu, _ = timed(command, env)
            walls[label].append(wall)
            cpus[label].append(cpu)
        hashes.add(alert_ids(alerts))
        print(f"[replay {name} {r + 1}] " + "; ".join(
            f"{label.split(':')[0]} {events / walls[label][-1]:,.0f}/s wall, "
            f"{events / cpus[label][-1]:,.0f}/CPU-s" for label in commands), flush=True)
    ceiling = "ceiling: msgspec decode into InferenceEvent"
    ceiling_wall = events / statistics.median(walls[ceiling])
    ceiling_cpu = events / statistics.median(cpus[ceiling])
    rows = []
    for label in commands:
        wall_rate = events / statistics.median(walls[label])
        cpu_rate = events / statistics.median(cpus[label])
        note = (f"{cpu_rate:,.0f} per CPU-second; {wall_rate / ceiling_wall:.1%} of the msgspec "
                f"ceiling's wall rate, {cpu_rate / ceiling_cpu:.1%} of its CPU rate")
        if label == "modelwatch replay":
            note += (f"; target >= 100,000; alerts {', '.join(f'{n} (ids {h})' for n, h in hashes)}"
                     + ("" if len(hashes) == 1 else " DIFFER BETWEEN RUNS"))
        rows.append((f"{name}: {label}, events/s wall on one core", f"{wall_rate:,.0f}",
                     f"median of {runs}; " + note))
    return rows


# --------------------------------------------------------------------------- batches


def batches_child(profile_path: Path, log: Path, n_events: int, batch_events: int, conn) -> None:
    """Child process: the replay pipeline fed the day's first ``n_events`` in batches of
    ``batch_events`` (a worker's batches under load are a few hundred to a few thousand
    events). Sends back CPU seconds to screen (decode and validate) and to judge, and
    the mean number of clients per batch."""
    from detectors.config import load_thresholds
    from streams.files import load_profile
    from streams.pipeline import Pipeline
    from streams.records import screen

    with open(log, "rb") as handle:
        lines = [line for _, line in zip(range(n_events), handle, strict=False)]
    pipeline = Pipeline([load_profile(profile_path)], load_thresholds())
    screen_s = judge_s = 0.0
    clients = []
    for start in range(0, len(lines), batch_events):
        t = time.process_time()
        done = screen([(raw, i) for i, raw in enumerate(lines[start:start + batch_events])],
                      pipeline.reject_reason)
        order = np.argsort(done.ts, kind="stable")
        events = [done.events[i] for i in order]
        screen_s += time.process_time() - t
        t = time.process_time()
        pipeline.process_inference(events, done.ts[order])
        judge_s += time.process_time() - t
        clients.append(len({e.client_id for e in events}))
    conn.send({"screen_s": screen_s, "judge_s": judge_s, "clients": float(np.mean(clients)),
               "events": len(lines)})
    conn.close()


def batches_part(profile: Path, log: Path, n_events: int, sizes: list[int],
                 runs: int) -> list[tuple[str, str, str]]:
    ctx = multiprocessing.get_context("spawn")
    results: dict[int, list[dict]] = {size: [] for size in sizes}
    for r in range(runs):  # interleaved: the machine's load hits all alike
        for size in sizes:
            parent, child = ctx.Pipe()
            process = ctx.Process(target=batches_child, args=(profile, log, n_events, size, child))
            process.start()
            results[size].append(parent.recv())
            process.join()
            got = results[size][-1]
            print(f"[batches {r + 1}] {size:,} events a batch: judged "
                  f"{got['events'] / got['judge_s']:,.0f}/CPU-s, screened "
                  f"{got['events'] / got['screen_s']:,.0f}/CPU-s", flush=True)
    rows = []
    for size in sizes:
        got = results[size]
        judged = statistics.median(g["events"] / g["judge_s"] for g in got)
        screened = statistics.median(g["events"] / g["screen_s"] for g in got)
        rows.append((f"judging in batches of {size:,} events (~{got[0]['clients']:,.0f} clients "
                     f"each), events per CPU-second", f"{judged:,.0f}",
                     f"median of {runs}; {judged / screened:.1%} of screening the same batches "
                     f"({screened:,.0f}/CPU-s); the day's first {got[0]['events']:,} events"))
    return rows


# --------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    """Resident memory after freed heap pages went back to the system (glibc keeps them
    otherwise, and a batch's temporaries would count as the clients' memory)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _arenas() -> int:
    """The interpreter's small-object allocator's arenas (1 MiB each) in use: they stay while
    one object in them lives, so a batch's decoded floats can leave them behind."""
    with tempfile.TemporaryFile() as out:
        saved = os.dup(2)
        os.dup2(out.fileno(), 2)  # sys._debugmallocstats writes to the C stderr
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        found = re.search(rb"# arenas allocated current\s*=\s*([\d,]+)", out.read())
    return int(found.group(1).replace(b",", b"")) if found else -1


def _templates(log: Path, n: int = 20_000) -> list[bytes]:
    """Honest queries of the day without their key, time and ids: the rest of each object."""
    kinds = json.loads(log.with_suffix(".kinds.json").read_text())
    out = []
    with open(log, "rb") as handle:
        for line in handle:
            event = msgspec.json.decode(line)
            if kinds.get(event["client_id"], "").startswith("attack"):
                continue
            for key in ("ts", "client_id", "request_id", "source_ip"):
                event.pop(key, None)
            out.append(msgspec.json.encode(event)[1:])
            if len(out) == n:
                break
    return out


def memory_growth(profile_path: Path, log: Path, n_clients: int, queries: int,
                  group: int, conn) -> None:
    """Child process: judge ``n_clients`` new clients of ``queries`` events each, ``group``
    clients a batch, and send back (clients tracked, RSS) after each batch."""
    from detectors.clients import state_bytes
    from detectors.config import load_thresholds
    from streams.files import load_profile
    from streams.pipeline import Pipeline
    from streams.records import format_ts, screen

    # Caps at the client count: under the default caps (10,000 per model) the longest idle
    # are evicted and the slope measures churn, not growth.
    caps = f"[state]\nmax_clients_per_model = {n_clients}\nmax_clients = {n_clients}\n"
    pipeline = Pipeline([load_profile(profile_path)], load_thresholds(caps))
    rest = _templates(log)
    rng = np.random.default_rng(0)
    t0, samples, k = 1.79e9, [], 0
    span = DAY_S / max(1, n_clients // group)  # each batch its own slice of the day
    for first in range(0, n_clients, group):
        clients = range(first, min(first + group, n_clients))
        n = len(clients) * queries
        ts = t0 + (first // group) * span + np.sort(rng.uniform(0, span, n))
        owner = rng.permutation(np.repeat(np.asarray(clients), queries))
        items = []
        for i in range(n):
            c = int(owner[i])
            head = b'{"ts":"%s","client_id":"m-%d","request_id":"m%d","source_ip":"10.%d.%d.%d",' % (
                format_ts(ts[i]).encode(), c, k, c >> 16 & 255, c >> 8 & 255, c & 255)
            items.append((head + rest[k % len(rest)], k))
            k += 1
        screened = screen(items, pipeline.reject_reason)
        del items
        pipeline.process_inference(screened.events, screened.ts)
        del screened
        gc.collect()
        samples.append((len(pipeline.clients), _rss_bytes(), _arenas()))
    arrays = statistics.median(state_bytes(s) for s in pipeline.clients.values())
    packed = getattr(pipeline.clients, "packed", None)  # replay holds idle states packed
    conn.send({"samples": samples, "arrays": arrays,
               "packed": statistics.median(map(len, packed.values())) if packed else None})
    conn.close()


def memory_part(profile: Path, log: Path, light: tuple[int, int],
                heavy: tuple[int, int], batches: int = 20) -> list[tuple[str, str, str]]:
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for kind, (n_clients, queries), target in (("light", light, 2), ("heavy", heavy, 16)):
        if not n_clients:
            continue
        parent, child = ctx.Pipe()
        started = time.perf_counter()
        group = max(1, n_clients // batches)  # clients a batch, an RSS sample after each
        proc = ctx.Process(target=memory_growth,
                           args=(profile, log, n_clients, queries, group, child))
        proc.start()
        result = parent.recv()
        proc.join()
        samples = np.array(result["samples"], dtype=float)
        arenas = samples[:, 2]
        # From the first batch on (start-up allocations are not per client): least squares.
        slope = np.polyfit(samples[:, 0], samples[:, 1], 1)[0] if len(samples) > 2 else float("nan")
        # Also over the later half: the interpreter's allocator keeps the arenas a batch's
        # decoded events used (bounded by a batch, not per client) while clients pin them.
        later = samples[len(samples) // 2:]
        late = np.polyfit(later[:, 0], later[:, 1], 1)[0] if len(later) > 2 else float("nan")
        print(f"[memory {kind}] {n_clients:,} clients x {queries} queries in "
              f"{time.perf_counter() - started:.0f} s; RSS {samples[0, 1] / 2**20:,.0f} MiB at "
              f"{samples[0, 0]:,.0f} clients -> {samples[-1, 1] / 2**20:,.0f} MiB at "
              f"{samples[-1, 0]:,.0f}; MiB per sample: "
              f"{', '.join(f'{v / 2**20:.0f}' for v in samples[:, 1])}; pymalloc arenas: "
              f"{', '.join(f'{v:.0f}' for v in arenas)}", flush=True)
        rows.append((f"RSS growth per {kind} client ({queries} queries), over {n_clients:,}",
                     f"{slope / 1024:,.1f} KiB",
                     f"target <= {target} KiB; state arrays {result['arrays'] / 1024:.1f} KiB "
                     + (f"({result['packed'] / 1024:.1f} KiB packed) " if result["packed"] else "")
                     + f"(median); least squares over {len(samples)} batches of {group:,} clients; "
                     f"over the later {len(later)}: {late / 1024:,.1f} KiB; pymalloc arenas "
                     f"{arenas[0]:.0f} -> {arenas[-1]:.0f}"))
    return rows


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="replay,batches,stream,memory")
    parser.add_argument("--traffic", default="realistic,zipf",
                        help="replay part: realistic (this day), zipf (bench/replay_speed.py's)")
    parser.add_argument("--runs", type=int, default=3,
                        help="replay, batches and workers runs (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=900, help="honest keys of the day")
    parser.add_argument("--zipf-events", type=int, default=500_000)
    parser.add_argument("--batch-sizes", type=lambda text: [int(v) for v in text.split(",")],
                        default=[250, 1000, 5000], help="batches part: events a batch")
    parser.add_argument("--batch-day-events", type=int, default=60_000)
    parser.add_argument("--light", type=int, default=100_000, help="memory part: light clients")
    parser.add_argument("--light-queries", type=int, default=10)
    parser.add_argument("--heavy", type=int, default=2_000, help="memory part: heavy clients")
    parser.add_argument("--heavy-queries", type=int, default=200)
    parser.add_argument("--memory-samples", type=int, default=20,
                        help="memory part: batches (one RSS sample each); more clients at "
                        "the same batch size need more (a batch's decoding sets the allocator's "
                        "high-water)")
    parser.add_argument("--workers", type=lambda text: [int(v) for v in text.split(",")],
                        default=[1, 2], help="workers part: workers in the group, per run")
    parser.add_argument("--stream-args", default="--worker-runs 1 --latency-s 20",
                        help="more arguments for bench/stream_speed.py")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    began = time.time()
    profile, log = make_day(args.seed, args.clients)
    print(f"realistic_speed: {describe(log)}; load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} cores", flush=True)
    rows: list[tuple[str, str, str]] = []

    if "replay" in parts:
        for traffic in args.traffic.split(","):
            if traffic == "realistic":
                rows += replay_part("realistic", profile, log, args.runs)
            elif traffic == "zipf":
                from bench.replay_speed import make_inputs

                zipf_profile, zipf_log = make_inputs(args.zipf_events)
                rows += replay_part(f"zipf {args.zipf_events // 1000}k", zipf_profile,
                                    zipf_log, args.runs)

    if "batches" in parts:
        rows += batches_part(profile, log, args.batch_day_events, args.batch_sizes, args.runs)

    if "memory" in parts:
        rows += memory_part(profile, log, (args.light, args.light_queries),
                            (args.heavy, args.heavy_queries), args.memory_samples)

    if "workers" in parts:
        from bench import stream_speed
        from bench.workers_speed import workers_part

        rows += workers_part(profile, log, args.workers, args.runs,
                             EVENTS_PER_RECORD * stream_speed.PARTITIONS)

    if "stream" in parts:  # it prints its own table of figures
        from bench import stream_speed

        stream_speed.main(["--log", str(log), "--profile", str(profile),
                           "--batch-events", str(EVENTS_PER_RECORD * stream_speed.PARTITIONS),
                           "--rates", "5000,20000", "--latency-modes", "batched",
                           "--linger-ms", "10",  # as a shipper with a 10 ms linger sends
                           *args.stream_args.split()])

    print(f"\nrealistic_speed figures ({time.time() - began:.0f} s in all; command: "
          f"{' '.join(sys.argv)}; load average {os.getloadavg()[0]:.2f})")
    width = max((len(r[0]) for r in rows), default=10)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>12}  {note}")


if __name__ == "__main__":
    main()
