"""Judging again after a restart, with many tracked clients (issues 11 and 12).

Against the embedded broker (Tansu, memory storage; 8 partitions):

1. ``--clients`` light clients (``--queries`` each, events from the realistic day's
   honest queries under new ids and times) are shipped as ``tail`` ships them, and one
   worker judges them all (state caps raised so that none is evicted).
2. The worker is killed with SIGKILL once everything is committed, and ``--fresh``
   events of the same clients are shipped.
3. **Warm restart**: a worker on the same state folder (RocksDB kept). Measured: seconds
   from spawn until its consumer group has committed past the new events, i.e. judged
   them (the first checkpoint after an assignment comes at once).
4. **Cold restart**: killed again, more fresh events, and a worker on an empty state
   folder: the tables come back from their changelog topics.

Two more with ``--phases``, for the group's session timeout (a successor "on another
host" runs in its own UTS namespace under another host name, with ``unshare``, so it
cannot tell that the killed worker is gone):

* ``kill-away``: kill -9, fresh events, then a warm restart on "another host": the group
  waits for the dead member's session to expire (timed from the kill as well).
* ``term-away``: SIGTERM (the worker leaves its group after its last commit), fresh events
  once it exited, then a successor on "another host" (timed from the SIGTERM as well).

Beside the restarts, the same run's first start: spawn to its first commit, with no
state to restore (the worker's own start-up and group join, on this machine now).

Usage: .venv/bin/python bench/restart_speed.py [--clients 100000] [--queries 3]
       [--phases warm,cold,kill-away,term-away] [--worker-code TREE]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import datetime  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import ExitStack, suppress  # noqa: E402

import numpy as np  # noqa: E402

from bench import realistic_speed, stream_speed  # noqa: E402
from streams.records import format_ts  # noqa: E402


def light_events(templates: list[bytes], first_client: int, n_clients: int, queries: int,
                 t0: float, span_s: float, seed: int) -> tuple[list[bytes], list[str]]:
    """``queries`` events for each of ``n_clients`` ids, at random times within ``span_s``."""
    rng = np.random.default_rng(seed)
    owners = rng.permutation(np.repeat(np.arange(first_client, first_client + n_clients), queries))
    ts = t0 + np.sort(rng.uniform(0, span_s, len(owners)))
    lines, clients = [], []
    for i, (c, t) in enumerate(zip(owners.tolist(), ts.tolist(), strict=True)):
        client = f"r-{c}"
        lines.append(b'{"ts":"%s","client_id":"%s","request_id":"r%d-%d","source_ip":"10.%d.%d.%d",'
                     % (format_ts(t).encode(), client.encode(), seed, i, c >> 16 & 255,
                        c >> 8 & 255, c & 255) + templates[i % len(templates)].rstrip(b"\n"))
        clients.append(client)
    return lines, clients


PHASES = {  # name: (how the worker before stops, state folder, successor's host)
    "warm": ("kill", "kept", "same"),
    "cold": ("kill", "empty", "same"),
    "kill-away": ("kill", "kept", "away"),
    "term-away": ("term", "kept", "away"),
}
TITLES = {"warm": "warm restart (state folder kept)",
          "cold": "cold restart (empty state folder, tables from changelogs)",
          "kill-away": "kill -9, warm restart on another host (dead session must expire)",
          "term-away": "SIGTERM, successor on another host (it left the group)"}
worker_code = ROOT  # the tree the worker runs from (--worker-code)


def spawn(url: str, profiles: Path, state: Path, thresholds: Path, log,
          away: bool = False) -> subprocess.Popen:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    # "Another host": another host name, so its client id does not match the dead one's.
    host = ["unshare", "--uts", "--", "sh", "-c", 'hostname modelwatch-away && exec "$@"',
            "sh"] if away else []
    return subprocess.Popen(
        [*host, sys.executable, "-m", "streams.cli", "worker", "--broker", url, "--profiles",
         str(profiles), "--state-dir", str(state), "--thresholds", str(thresholds),
         "--metrics-port", "0"],
        cwd=worker_code, env=env, stdout=subprocess.DEVNULL, stderr=log,
        start_new_session=True)


def kill9(process: subprocess.Popen) -> None:
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def term(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM and wait for the exit (status 0: its last commit made, the group left)."""
    os.killpg(process.pid, signal.SIGTERM)
    if process.wait(timeout=timeout_s) != 0:
        raise RuntimeError(f"worker exited with status {process.returncode} after SIGTERM")


def until_committed(commits: stream_speed.Commits, ends: dict[int, int], process,
                    timeout_s: float) -> tuple[float, float]:
    """Seconds (from now) until the group's committed offsets first move, and until they
    reach ``ends``."""
    started, before, first = time.monotonic(), commits.get(), float("nan")
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with status {process.returncode}")
        offsets = commits.get()
        if first != first and offsets and offsets != before:
            first = time.monotonic() - started
        if offsets and all(offsets.get(p, 0) >= end for p, end in ends.items()):
            return first, time.monotonic() - started
        time.sleep(stream_speed.POLL_S)
    raise RuntimeError(f"not committed within {timeout_s:.0f} s")


def phases(log: Path, since: int, spawned: float, stopped: float | None = None) -> str:
    """From the worker's log (written after byte ``since``): seconds from spawn (and from
    the predecessor's kill or SIGTERM, ``stopped``) until its partitions were assigned,
    and the restores' seconds summed."""
    text = log.read_bytes()[since:].decode(errors="replace")
    assigned = re.search(r"^\[([\d-]+ [\d:,]+)\] .*worker: \S+ partitions \[", text, re.M)
    restores = [float(s) for s in re.findall(r"clients restored in ([\d.]+) s", text)]
    clients = sum(int(n.replace(",", "")) for n in re.findall(r"(\S+) clients restored in", text))
    if assigned is None:
        return "no assignment in the log"
    at = datetime.datetime.strptime(assigned.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    since_stop = "" if stopped is None else f", {at - stopped:.1f} s after the stop"
    return (f"assigned {at - spawned:.1f} s after spawn{since_stop}; {clients:,} clients "
            f"restored in {sum(restores):.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=3, help="events per client at first")
    parser.add_argument("--fresh", type=int, default=2_000, help="events shipped before each restart")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--phases", default="warm,cold",
                        help=f"comma-separated, in order: {', '.join(PHASES)}")
    parser.add_argument("--worker-code", type=Path, default=ROOT,
                        help="run the worker from this source tree (python -m from there "
                             "imports its packages): other code measured by the same bench")
    args = parser.parse_args()
    wanted = args.phases.split(",")
    if not set(wanted) <= set(PHASES):
        parser.error(f"--phases: one of {', '.join(PHASES)}")
    global worker_code
    worker_code = args.worker_code.resolve()

    profile, log = realistic_speed.make_day(0, 900)
    templates = realistic_speed._templates(log)
    out = ROOT / "bench" / "out" / "restart"  # absolute: the worker may run elsewhere
    out.mkdir(parents=True, exist_ok=True)
    profiles = out / "profiles"
    profiles.mkdir(exist_ok=True)
    (profiles / "digits.json").write_bytes(profile.read_bytes())
    thresholds = out / "thresholds.toml"
    caps = max(args.clients, 20_000)
    thresholds.write_text(f"[state]\nmax_clients_per_model = {caps}\nmax_clients = {caps}\n")
    t0 = 1.79e9
    rows = []
    with ExitStack() as stack:
        broker = stream_speed.fresh_broker(stack)
        commits = stream_speed.Commits(broker.address)
        stack.callback(commits.close)
        state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="restart-state-")))
        worker_log = stack.enter_context(open(out / "worker.log", "wb"))
        lines, clients = light_events(templates, 0, args.clients, args.queries, t0, 3600.0, 1)
        ends, records = stream_speed.produce_batched(broker.address, lines, clients, 800)
        print(f"restart_speed: {len(lines):,} events of {args.clients:,} clients in {records:,} "
              f"records", flush=True)
        del lines, clients
        worker = spawn(broker.url, profiles, state, thresholds, worker_log)
        first, took = until_committed(commits, ends, worker, args.timeout_s)
        rss = stream_speed.peak_rss_mib(worker.pid)
        print(f"  judged all in {took:.0f} s, peak RSS {rss:,.0f} MiB", flush=True)
        rows.append(("first start: spawn to first commit", f"{first:.1f} s",
                     "no state to restore, but its first checkpoint writes every new client"))
        rows.append(("first start: spawn to everything committed", f"{took:.1f} s",
                     f"{args.clients * args.queries / took:,.0f} events/s; peak RSS {rss:,.0f} MiB"))
        for seed, name in enumerate(wanted, start=2):
            phase = TITLES[name]
            how, folder, host = PHASES[name]
            stopped = time.time()
            kill9(worker) if how == "kill" else term(worker)
            if folder == "empty":
                state = Path(tempfile.mkdtemp(prefix="restart-cold-"))
                stack.callback(shutil.rmtree, state, True)
            fresh, fresh_clients = light_events(
                templates, 0, args.fresh, 1, t0 + 3600.0 * (seed - 1), 60.0, seed)
            new_ends, _ = stream_speed.produce_batched(broker.address, fresh, fresh_clients, 800)
            ends = {p: max(ends.get(p, 0), new_ends.get(p, 0)) for p in set(ends) | set(new_ends)}
            worker_log.flush()
            since, spawned = (out / "worker.log").stat().st_size, time.time()
            worker = spawn(broker.url, profiles, state, thresholds, worker_log, host == "away")
            first, took = until_committed(commits, ends, worker, args.timeout_s)
            where = phases(out / "worker.log", since, spawned, stopped)
            print(f"  {phase}: first commit {first:.1f} s, new events judged {took:.1f} s "
                  f"after spawn ({where}); peak RSS "
                  f"{stream_speed.peak_rss_mib(worker.pid):,.0f} MiB", flush=True)
            rows.append((phase, f"{took:.1f} s",
                         f"spawn to {args.fresh:,} new events judged and committed "
                         f"(first commit {first:.1f} s; {where})"))
        kill9(worker)

    print(f"\nrestart_speed figures (command: {' '.join(sys.argv)}; load average "
          f"{os.getloadavg()[0]:.2f})")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>8}  {note}")


if __name__ == "__main__":
    main()
