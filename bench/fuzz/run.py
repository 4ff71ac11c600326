"""Fuzz ``replay`` with mutated records: no crash, every bad record dead-lettered
with a reason, and the alerts on the valid ones identical to a clean run.

Usage: python -m bench.fuzz.run [--records 1000000] [--seed 0] [--out bench/out/fuzz]

The demo scenario's inference log and training stats are the clean traffic;
mutants of its events (renamed to a second, profiled model, so valid ones never
touch the real model's state) are interleaved after the line each was made from,
as single records and as arrays mixing valid and bad elements. Checks:

1. ``replay`` returns (0 crashes);
2. every certainly-bad mutant (:mod:`bench.fuzz.mutants`) is in the dead-letter
   file, each dead letter with a reason;
3. the *clean run* — the same files with the dead-lettered lines and array
   elements taken out — has no dead letter, judges as many events, and gives
   identical alerts (all fields but ``event.created``);
4. the real model's alerts equal those of the demo's own clean files.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from bench.fuzz.mutants import (
    FUZZ_DATASET,
    FUZZ_MODEL,
    Line,
    Mutant,
    mutate_stats,
    records,
    renamed_stats,
)
from detectors.config import load_thresholds
from streams.files import load_profile
from streams.replay import replay

_ELEMENT = re.compile(r"^array element (\d+): ")


@dataclass
class Report:
    records: int = 0          # mutated records (lines) sent through replay
    bad: int = 0              # certainly-bad mutants (records or elements)
    dead_letters: int = 0
    events: int = 0           # valid events judged
    alerts: int = 0
    seconds: float = 0.0      # the fuzzed replay alone, wall clock
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per phase
    problems: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)


def _alert_docs(alerts) -> list[dict]:
    docs = [msgspec.to_builtins(a) for a in alerts]
    for d in docs:
        d["event"].pop("created", None)
    return sorted(docs, key=lambda d: (d["@timestamp"], d["event"]["id"]))


def _difference(fuzzed, clean) -> str:
    """The first alert that differs, field by field; and the events each judged late."""
    a = {d["event"]["id"]: d for d in _alert_docs(fuzzed.alerts)}
    b = {d["event"]["id"]: d for d in _alert_docs(clean.alerts)}
    out = [f"late events {fuzzed.late} / {clean.late}",
           f"only fuzzed {sorted(set(a) - set(b))[:3]}", f"only clean {sorted(set(b) - set(a))[:3]}"]
    for key in sorted(set(a) & set(b)):
        if a[key] != b[key]:
            fields = {k: (a[key]["modelwatch"][k], b[key]["modelwatch"].get(k))
                      for k in a[key]["modelwatch"] if a[key]["modelwatch"][k] != b[key]["modelwatch"].get(k)}
            out.append(f"{key}: {fields}")
            break
    return "; ".join(out)


def fuzz_profiles(profile_path: Path, folder: Path) -> list:
    """The real profile and a copy of it for the fuzz model and dataset."""
    doc = json.loads(profile_path.read_bytes())
    copy = folder / "fuzz-profile.json"
    copy.write_text(json.dumps({**doc, "model": FUZZ_MODEL, "dataset": FUZZ_DATASET}))
    return [load_profile(profile_path), load_profile(copy)]


def write_inputs(clean_log: Path, clean_stats: Path, folder: Path, n: int, seed: int,
                 rare_every: int) -> tuple[Path, Path, list, list]:
    """The fuzzed inference log and stats file; per line of each, the Line (None: clean)."""
    clean = clean_log.read_bytes().splitlines()
    events = [json.loads(line) for line in clean]
    after: list[list[Line]] = [[] for _ in clean]
    n_stats = max(1, n // 100)
    for base, line in records(events, n - n_stats, seed, rare_every=rare_every):
        after[base].append(line)
    log, log_lines = folder / "fuzz-inference.jsonl", []
    with open(log, "wb") as out:
        for line, extra in zip(clean, after, strict=True):
            out.write(line + b"\n")
            log_lines.append(None)
            for mutant_line in extra:
                out.write(mutant_line.raw + b"\n")
                log_lines.append(mutant_line)
    stats = clean_stats.read_bytes().splitlines()
    rng = random.Random(seed + 1)
    stats_file, stats_lines = folder / "fuzz-stats.jsonl", []
    with open(stats_file, "wb") as out:
        for line in stats:
            out.write(line + b"\n")
            stats_lines.append(None)
        base = [renamed_stats(json.loads(line)) for line in stats]
        for _ in range(n_stats):
            m = mutate_stats(rng.choice(base), rng)
            out.write(m.raw + b"\n")
            stats_lines.append(Line(m.raw, single=m))
    return log, stats_file, log_lines, stats_lines


def read_dead(path: Path) -> dict[tuple[str, int], list[tuple[int | None, str]]]:
    """(file name, line) → [(array element or None, reason)]."""
    out: dict[tuple[str, int], list] = {}
    decode = msgspec.json.Decoder(dict).decode
    with open(path, "rb") as handle:
        for raw in handle:
            letter = decode(raw)
            match = _ELEMENT.match(letter["reason"])
            element = int(match.group(1)) if match else None
            out.setdefault((Path(letter["file"]).name, letter["line"]), []).append(
                (element, letter["reason"]))
    return out


def clean_copy(path: Path, lines: list, dead: dict, target: Path) -> tuple[int, int]:
    """``path`` without its dead-lettered lines and array elements; (bad expected, missed)."""
    bad = missed = 0
    with open(path, "rb") as handle, open(target, "wb") as out:
        for number, (raw, line) in enumerate(zip(handle, lines, strict=True), start=1):
            letters = dead.get((path.name, number), [])
            whole = any(element is None for element, _ in letters)
            if line is None or line.single is not None:
                mutant: Mutant | None = line.single if line is not None else None
                if mutant is not None and mutant.bad:
                    bad += 1
                    missed += not letters
                if not letters:
                    out.write(raw)
                continue
            gone = {element for element, _ in letters}
            kept = []
            for k, m in enumerate(line.elements):
                if m.bad:
                    bad += 1
                    missed += not (whole or k in gone)
                if not whole and k not in gone:
                    kept.append(m.raw)
            if kept:
                out.write(b"[" + b", ".join(kept) + b"]\n")
    return bad, missed


def fuzz_replay(profile_path: Path, clean_log: Path, clean_stats: Path, folder: Path, *,
                n: int, seed: int = 0, rare_every: int = 20_000) -> Report:
    folder.mkdir(parents=True, exist_ok=True)
    clock = time.process_time()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.process_time()
        report.cpu[phase] = round(now - clock, 1)
        clock = now

    report = Report(records=n)
    thresholds = load_thresholds()
    profiles = fuzz_profiles(profile_path, folder)
    log, stats, log_lines, stats_lines = write_inputs(clean_log, clean_stats, folder, n, seed,
                                                      rare_every)
    lap("generate")
    for line in log_lines + stats_lines:
        if line is not None:
            for m in ([line.single] if line.single else line.elements):
                report.kinds[m.kind] = report.kinds.get(m.kind, 0) + 1
    dead_path = folder / "fuzz-deadletter.jsonl"
    started = time.perf_counter()
    try:
        fuzzed = replay(profiles, thresholds, inference_log=log, training_stats=stats,
                        deadletter=dead_path)
    except Exception as exc:  # the one thing that must never happen
        report.problems.append(f"replay crashed: {exc!r}")
        return report
    report.seconds = time.perf_counter() - started
    lap("fuzzed replay")
    report.events, report.alerts = fuzzed.events + fuzzed.batches, len(fuzzed.alerts)
    dead = read_dead(dead_path)
    report.dead_letters = sum(len(v) for v in dead.values())
    empty = [k for k, v in dead.items() if any(not reason.strip() for _, reason in v)]
    if empty:
        report.problems.append(f"{len(empty)} dead letters without a reason, e.g. {empty[0]}")
    clean_log_copy, clean_stats_copy = folder / "clean-inference.jsonl", folder / "clean-stats.jsonl"
    bad_i, missed_i = clean_copy(log, log_lines, dead, clean_log_copy)
    bad_s, missed_s = clean_copy(stats, stats_lines, dead, clean_stats_copy)
    report.bad = bad_i + bad_s
    if missed_i or missed_s:
        report.problems.append(f"{missed_i + missed_s} bad records not dead-lettered")
    lap("check dead letters")
    again = replay(profiles, thresholds, inference_log=clean_log_copy,
                   training_stats=clean_stats_copy, deadletter=None)
    lap("clean replay")
    if again.rejected:
        report.problems.append(f"the clean run dead-lettered {again.rejected} records")
    if (again.events, again.batches) != (fuzzed.events, fuzzed.batches):
        report.problems.append(f"events judged: fuzzed {fuzzed.events}+{fuzzed.batches}, "
                               f"clean {again.events}+{again.batches}")
    if _alert_docs(again.alerts) != _alert_docs(fuzzed.alerts):
        report.problems.append(f"alerts differ from the clean run: {len(fuzzed.alerts)} "
                               f"against {len(again.alerts)}; {_difference(fuzzed, again)}")
    demo = replay(profiles[:1], thresholds, inference_log=clean_log, training_stats=clean_stats,
                  deadletter=None)
    lap("demo replay")
    real = [a for a in fuzzed.alerts if a.modelwatch.model != FUZZ_MODEL
            and a.modelwatch.dataset != FUZZ_DATASET]
    if _alert_docs(real) != _alert_docs(demo.alerts):
        report.problems.append(f"the real model's alerts changed: {len(real)} against "
                               f"{len(demo.alerts)} on the demo's own files")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/fuzz"))
    args = parser.parse_args(argv)
    from streams.demo.play import prepare

    args.out.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.out / "demo")
    started = time.perf_counter()
    report = fuzz_replay(paths["profile"], paths["inference.jsonl"], paths["stats"], args.out,
                         n=args.records, seed=args.seed)
    total = time.perf_counter() - started
    print(json.dumps({**vars(report), "total_seconds": round(total, 1),
                      "seconds": round(report.seconds, 1)}, indent=1))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
