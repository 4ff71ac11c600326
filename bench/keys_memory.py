"""Peak memory of ``replay`` when clients mint keys: N distinct client ids, 1-3 events each.

Without a cap every id keeps ~40 KiB of state (64 features) for good; with the
default caps (``[state]`` in ``detectors/thresholds.toml``) the longest idle are
evicted. Writes the log under ``--work`` (once per size), then runs ``replay`` in a
child process, since generation must not count, and prints that child's peak RSS
(``ru_maxrss``), its time and what it evicted, as one JSON line.

    python bench/keys_memory.py --ids 1000000
    python bench/keys_memory.py --ids 100000
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FEATURES = 64          # the digits model's width
MODEL = "keys-bench"   # unprofiled: the same per-client state, no profile to build
SOURCES = 1000         # source IPs the ids come from
T0 = 1_790_000_000.0


def make_log(path: Path, ids: int, seed: int = 0) -> int:
    """Every id's 1-3 events, ids in turn (one every 20 ms of event time); returns events."""
    rng = np.random.default_rng(seed)
    rows = [",".join(map(str, r)) for r in rng.integers(0, 17, size=(4096, FEATURES))]
    per_id = rng.integers(1, 4, size=ids)
    n = int(per_id.sum())
    owner = np.repeat(np.arange(ids), per_id)
    ts = T0 + owner * 0.02 + np.concatenate([np.arange(k) for k in per_id]) * 0.005
    row = rng.integers(0, len(rows), size=n)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as out:
        for i in range(n):
            client = int(owner[i])
            out.write(f'{{"ts":{ts[i]:.3f},"model":"{MODEL}","client_id":"key-{client}",'
                      f'"features":[{rows[row[i]]}],"prediction":{row[i] % 10},'
                      f'"request_id":"r{i}","source_ip":"198.51.{client % SOURCES // 250}.'
                      f'{client % 250}"}}\n')
    tmp.rename(path)
    return n


def child(log: Path) -> None:
    """Replay ``log`` with the default thresholds; print what the parent reports."""
    from detectors.config import load_thresholds
    from streams.replay import replay

    started = time.perf_counter()
    result = replay([], load_thresholds(), inference_log=log, training_stats=None,
                    deadletter=None)
    print(json.dumps({
        "events": result.events, "seconds": round(time.perf_counter() - started, 1),
        "tracked": len(result.pipeline.clients), "evictions": result.pipeline.counters.evictions,
        "alerts": len(result.alerts),
        "key_minting_alerts": sum(a.rule.name == "extraction.key_minting" for a in result.alerts),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "keys")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / f"keys-{args.ids}.jsonl"
    if not log.exists():
        print(f"writing {log} ...", file=sys.stderr)
        make_log(log, args.ids)
    done = subprocess.run([sys.executable, __file__, "--child", str(log)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"keys_memory.py: replay failed:\n{done.stderr.strip()}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    report = {"ids": args.ids, **json.loads(done.stdout.splitlines()[-1]),
              "peak_rss_kib": peak_kib, "peak_rss_gib": round(peak_kib / 2**20, 3)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
