"""``modelwatch stats`` wall time on a 2,000-row batch of digits (64 features), beside
its ceilings, in one run (issue 12: ≤ 0.5 s).

Makes a profile with ``modelwatch profile`` (1,000 training rows) and a 2,000-row batch
under bench/out/stats (once), then times, interleaved, ``--runs`` times each:

- ``python -c pass``: the interpreter alone;
- ``python -c "import numpy; numpy.loadtxt(batch)"``: reading the CSV with numpy alone,
  the least any numpy-based ``stats`` can take;
- ``modelwatch stats`` (``python -m streams.cli stats ...``), output to /dev/null.

With ``--before DIR`` (a checkout of older code, e.g. ``git archive <commit> | tar -x
-C DIR``) the same command from that tree is timed too. Prints the median wall of each
and the ratio to the numpy ceiling. Commands run as from an installed package: with
their bytecode written (one untimed run of each first), whatever PYTHONDONTWRITEBYTECODE
says. Usage:
    .venv/bin/python bench/stats_speed.py [--runs 10] [--before DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench/out/stats"
ROWS, TRAIN_ROWS = 2000, 1000


def make_inputs() -> tuple[Path, Path]:
    """The profile (rebuilt: it follows the code) and the batch (cached)."""
    from sklearn.datasets import load_digits

    OUT.mkdir(parents=True, exist_ok=True)
    train, batch, profile = OUT / "train.csv", OUT / f"batch-{ROWS}.csv", OUT / "profile.json"
    data = load_digits()
    names = [*data.feature_names, "label"]
    if not batch.exists():
        import numpy as np

        rng = np.random.default_rng(0)
        for path, index in ((train, np.arange(TRAIN_ROWS)),
                            (batch, rng.integers(TRAIN_ROWS, len(data.data), ROWS))):
            with open(path, "w", newline="") as out:
                writer = csv.writer(out)
                writer.writerow(names)
                writer.writerows([*map(int, data.data[i]), int(data.target[i])] for i in index)
    subprocess.run([sys.executable, "-m", "streams.cli", "profile", "--model", "digits-mlp",
                    "--data", str(train), "--label-column", "label", "--out", str(profile)],
                   cwd=ROOT, check=True, capture_output=True)
    return profile, batch


# An installed package has its bytecode compiled; an editable checkout gets it at its
# first import, unless the environment forbids it (as some sandboxes do).
AS_INSTALLED = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def wall_and_cpu(command: list[str], cwd: Path = ROOT) -> tuple[float, float]:
    """Wall seconds and the child's CPU seconds (user + system: steadier on a busy machine)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, env=AS_INSTALLED)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--before", type=Path, help="older code's tree, timed beside")
    args = parser.parse_args()
    profile, batch = make_inputs()
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "numpy.loadtxt of the batch (ceiling)": [
            sys.executable, "-c",
            f"import numpy; numpy.loadtxt({str(batch)!r}, delimiter=',', skiprows=1)"],
        "modelwatch stats": [sys.executable, "-m", "streams.cli", "stats", "--profile",
                             str(profile), "--source", "bench", "--batch-id", "b1",
                             "--ts", "2026-12-07T00:00:00Z", str(batch)],
    }
    where = dict.fromkeys(commands, ROOT)
    if args.before:  # python -m from that tree imports its packages, not ours
        name = f"modelwatch stats, code in {args.before}"
        commands[name], where[name] = commands["modelwatch stats"], args.before.resolve()
    times: dict[str, list[float]] = {name: [] for name in commands}
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    for name, command in commands.items():  # untimed: writes the bytecode
        wall_and_cpu(command, where[name])
    for _ in range(args.runs):  # interleaved: load changes hit every command alike
        for name, command in commands.items():
            seconds, used = wall_and_cpu(command, where[name])
            times[name].append(seconds)
            cpu[name].append(used)
    median = {name: statistics.median(t) for name, t in times.items()}
    ceiling = median["numpy.loadtxt of the batch (ceiling)"]
    print(f"stats_speed: {ROWS:,}-row batch, 64 features (digits), median wall of {args.runs} "
          f"runs each, interleaved")
    for name, m in median.items():
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"  {name:<40} {m:6.3f} s  ({m / ceiling:.2f} x ceiling; CPU "
              f"{statistics.median(cpu[name]):.3f} s; runs {runs})")
    target = median["modelwatch stats"]
    print(f"  target <= 0.5 s: {'met' if target <= 0.5 else 'missed'}; modelwatch stats beyond "
          f"the ceiling: {target - ceiling:.3f} s")


if __name__ == "__main__":
    main()
