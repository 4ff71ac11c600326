"""Replay throughput: 32-feature events, 1,000 clients, all detectors on.

Writes a profile and an inference log under bench/out/speed (once), then runs
``replay`` in-process five times and prints the median events/s, plus the
memory held per tracked client. Usage: python bench/replay_speed.py [--events N]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # "one core": no BLAS threads either
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

from detectors.clients import state_bytes
from detectors.config import load_thresholds
from detectors.profile import build_profile
from detectors.state import dumps
from streams.files import load_profile, write_profile
from streams.records import format_ts
from streams.replay import replay

OUT = Path("bench/out/speed")
FEATURES, CLIENTS = 32, 1000


def make_inputs(n_events: int, seed: int = 0) -> tuple[Path, Path]:
    """The profile (rebuilt every run: it follows the code) and the log (cached)."""
    OUT.mkdir(parents=True, exist_ok=True)
    profile_path, log_path = OUT / "profile.json", OUT / f"log-{n_events}.jsonl"
    X, y = make_classification(n_samples=20_000, n_features=FEATURES, n_informative=12,
                               n_classes=4, random_state=seed)
    X = np.round(X, 3)
    write_profile(build_profile(X[:10_000], y[:10_000], [f"f{i}" for i in range(FEATURES)],
                                model="speed-lr", dataset="speed"), profile_path)
    if log_path.exists():
        return profile_path, log_path
    model = LogisticRegression(max_iter=500).fit(X[:10_000], y[:10_000])
    rng = np.random.default_rng(seed)
    pool = X[10_000:]
    rows = pool[rng.integers(len(pool), size=n_events)]
    proba = np.round(model.predict_proba(rows), 4)
    clients = rng.zipf(1.3, size=n_events) % CLIENTS  # a few heavy clients, a long tail
    ts = 1.79e9 + np.sort(rng.uniform(0, 3600, size=n_events))
    with open(log_path, "w") as out:
        for i in range(n_events):
            out.write(json.dumps({
                "ts": format_ts(ts[i]), "model": "speed-lr", "client_id": f"client-{clients[i]}",
                "features": rows[i].tolist(), "prediction": int(proba[i].argmax()),
                "probabilities": proba[i].tolist(), "request_id": f"r{i}",
                "source_ip": f"198.51.{clients[i] % 256}.{clients[i] // 256}"}) + "\n")
    return profile_path, log_path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    profile_path, log_path = make_inputs(args.events)
    profiles = [load_profile(profile_path)]
    rates = []
    for _ in range(args.runs):
        start = time.process_time()
        result = replay(profiles, load_thresholds(), inference_log=log_path,
                        training_stats=None, deadletter=None)
        rates.append(result.events / (time.process_time() - start))
    states = result.pipeline.clients
    fixed = statistics.median(state_bytes(s) for s in states.values())
    serialized = statistics.median(len(dumps(s)) for s in states.values())
    print(f"events: {result.events}, clients: {len(states)}, alerts: {len(result.alerts)}")
    print(f"replay events/s (CPU time, one core), median of {args.runs}: "
          f"{statistics.median(rates):,.0f}  (runs: {', '.join(f'{r:,.0f}' for r in rates)})")
    print(f"memory per tracked client: {fixed / 1024:.1f} KiB of arrays, "
          f"{serialized / 1024:.1f} KiB serialized")


if __name__ == "__main__":
    main()
