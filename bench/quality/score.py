"""Detection quality of modelwatch on the benchmark traffic.

    python bench/quality/score.py --data bench/quality/data [--work bench/out/quality]

Generates the data if it is missing, then runs the real command line (``modelwatch
profile``, ``modelwatch replay``) and ``streams.stats.stats_event_from_csv`` on it,
matches the alerts against ``truth.json`` and prints detection rates, queries to
detection and false-positive rates, with the targets and whether each is met. The same
numbers go to ``<work>/quality.json``. Exits 0 when targets are missed: it measures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import msgspec
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TARGETS = {
    "attack_detection_rate": 0.95,  # per variant, any alert on any of the attacker's ids
    "adversarial_median_queries": 50,  # query-based adversarial attacks
    "poisoned_batch_detection_rate": 0.95,
    "benign_client_fp_rate": 0.005,
    "clean_batch_fp_rate": 0.01,  # and the same for benign_drift batches
}
# One-shot transfer queries are not a query-based attack: no queries-to-detection target.
ONE_SHOT_VARIANTS = {"adv_transfer"}


# --------------------------------------------------------------------------- running modelwatch


def modelwatch_command() -> str:
    """The ``modelwatch`` console script next to this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "modelwatch"
    found = str(beside) if beside.exists() else shutil.which("modelwatch")
    if not found:
        sys.exit("score.py: no 'modelwatch' command: install the package (pip install -e .)")
    return found


def run(command: list[str]) -> float:
    """Run a command; stop with its stderr if it fails. Returns the wall time in seconds."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"score.py: {' '.join(command[:2])} failed ({done.returncode}):\n"
                 f"{done.stderr.strip()}")
    return time.perf_counter() - started


def ensure_data(data: Path, seed: int, scale: float) -> None:
    if (data / "truth.json").exists() and (data / "inference.jsonl").exists():
        return
    print(f"no benchmark data in {data}: generating it", flush=True)
    generator = Path(__file__).with_name("generate.py")
    subprocess.run([sys.executable, str(generator), "--out", str(data), "--seed", str(seed),
                    "--scale", str(scale)], check=True)


def write_stats(truth: dict, data: Path, profiles: dict[str, Path], out: Path) -> None:
    """One training-stats event per batch, in time order."""
    from streams.stats import stats_event_from_csv

    events = [
        stats_event_from_csv(profiles[b["dataset"]], data / b["path"], dataset=b["dataset"],
                             source=b["source"], batch_id=b["batch_id"], ts=b["ts"])
        for b in truth["batches"]
    ]
    events.sort(key=lambda e: e["ts"])
    with open(out, "wb") as stream:
        for event in events:
            stream.write(msgspec.json.encode(event) + b"\n")


def run_modelwatch(data: Path, work: Path, truth: dict) -> dict:
    """Profile, stats, replay; returns timings and the alert/dead-letter file paths."""
    work.mkdir(parents=True, exist_ok=True)
    modelwatch = modelwatch_command()
    models = {c["dataset"]: c["model"] for c in truth["clients"].values()}
    profiles, timings = {}, {}
    for dataset, model in sorted(models.items()):
        profiles[dataset] = work / f"{dataset}.profile.json"
        timings[f"profile_{dataset}_s"] = run([
            modelwatch, "profile", "--model", model, "--data", str(data / dataset / "train.csv"),
            "--label-column", "y", "--dataset", dataset, "--out", str(profiles[dataset]),
        ])
    started = time.perf_counter()
    write_stats(truth, data, profiles, work / "stats.jsonl")
    timings["stats_s"] = time.perf_counter() - started
    paths = {"alerts": work / "alerts.jsonl", "deadletter": work / "deadletter.jsonl"}
    for path in paths.values():
        path.unlink(missing_ok=True)
    replay = [modelwatch, "replay"]
    for path in profiles.values():
        replay += ["--profile", str(path)]
    replay += ["--inference-log", str(data / "inference.jsonl"),
               "--training-stats", str(work / "stats.jsonl"),
               "--alerts-out", str(paths["alerts"]), "--deadletter", str(paths["deadletter"])]
    timings["replay_s"] = run(replay)
    return {"timings": {k: round(v, 2) for k, v in timings.items()}, **paths}


# --------------------------------------------------------------------------- scoring


class _Request(msgspec.Struct):
    client_id: str
    request_id: str | None = None


def group_order(inference_log: Path, truth: dict) -> dict[str, int]:
    """request_id -> 1-based position among all requests of its attacker (sybil ids
    counted together), in time order. Benign clients are left out."""
    group_of = {cid: c["group"] for cid, c in truth["clients"].items() if c["kind"] == "attack"}
    decoder = msgspec.json.Decoder(_Request)
    counts: Counter = Counter()
    position = {}
    with open(inference_log, "rb") as lines:
        for line in lines:
            event = decoder.decode(line)
            group = group_of.get(event.client_id)
            if group is not None:
                counts[group] += 1
                position[event.request_id] = counts[group]
    return position


def read_alerts(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, "rb") as lines:
        return [msgspec.json.decode(line) for line in lines if line.strip()]


def _rate(hits: int, total: int) -> float | None:
    return round(hits / total, 4) if total else None


def _quantiles(values: list[int]) -> dict:
    if not values:
        return {"median": None, "p90": None}
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90))}


def score(truth: dict, alerts: list[dict], position: dict[str, int]) -> dict:
    """Detection numbers from ground truth, alerts and each attacker request's position.

    Parameters
    ----------
    truth : dict
        ``truth.json``.
    alerts : list of dict
        ECS alerts as ``modelwatch replay`` writes them.
    position : dict
        request_id -> 1-based index among its attacker's requests (see ``group_order``).
    """
    clients = truth["clients"]
    client_alerts: dict[str, list[dict]] = defaultdict(list)
    batch_alerts: dict[str, list[dict]] = defaultdict(list)
    known_batches = {b["batch_id"] for b in truth["batches"]}
    unmatched = 0
    for alert in alerts:
        mw = alert.get("modelwatch", {})
        if mw.get("batch_id") in known_batches:
            batch_alerts[mw["batch_id"]].append(alert)
        elif mw.get("client_id") in clients:
            client_alerts[mw["client_id"]].append(alert)
        else:
            unmatched += 1

    # Attackers: one record per group (the five ids of a sybil are one attacker).
    groups: dict[str, dict] = {}
    for cid, c in clients.items():
        if c["kind"] != "attack":
            continue
        group = groups.setdefault(c["group"], {**c, "alerts": []})
        group["alerts"] += client_alerts.get(cid, [])
    attackers = []
    for name, g in groups.items():
        right = [a for a in g["alerts"] if a["modelwatch"].get("detector") == g["family"]]
        attackers.append({
            "group": name, "dataset": g["dataset"], "variant": g["variant"],
            "family": g["family"], "detected": bool(g["alerts"]), "right_family": bool(right),
            "queries_to_detection": _first_query(g["alerts"], position),
            "queries_to_right_family": _first_query(right, position),
            "rules": sorted({a["rule"]["name"] for a in g["alerts"]}),
        })

    benign = [cid for cid, c in clients.items() if c["kind"] == "benign"]
    flagged = [cid for cid in benign if client_alerts.get(cid)]
    benign_rules = Counter(rule for cid in flagged
                           for rule in {a["rule"]["name"] for a in client_alerts[cid]})
    by_behaviour: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for cid in benign:
        counts = by_behaviour[clients[cid].get("behaviour", "benign")]
        counts[0] += bool(client_alerts.get(cid))
        counts[1] += 1

    batches = [{**b, "alerted": bool(batch_alerts.get(b["batch_id"])),
                "rules": sorted({a["rule"]["name"] for a in batch_alerts.get(b["batch_id"], [])})}
               for b in truth["batches"]]
    return {
        "variants": _by_variant(attackers, key=lambda a: a["variant"]),
        "dataset_variants": _by_variant(attackers, key=lambda a: f"{a['dataset']}/{a['variant']}"),
        "benign": {
            "clients": len(benign), "alerted": len(flagged),
            "fp_rate": _rate(len(flagged), len(benign)),
            "rules": dict(benign_rules.most_common()),
            "by_behaviour": {b: {"alerted": a, "clients": n, "fp_rate": _rate(a, n)}
                             for b, (a, n) in sorted(by_behaviour.items())},
        },
        "batches": _by_kind(batches),
        "dataset_batches": {d: _by_kind([b for b in batches if b["dataset"] == d])
                            for d in sorted({b["dataset"] for b in batches})},
        "unmatched_alerts": unmatched,
        "attackers": attackers,
    }


def _first_query(alerts: list[dict], position: dict[str, int]) -> int | None:
    """Position of the earliest trigger among an attacker's alerts."""
    found = [position[a["modelwatch"]["trigger"]["request_id"]] for a in alerts
             if (a["modelwatch"].get("trigger") or {}).get("request_id") in position]
    return min(found) if found else None


def _by_variant(attackers: list[dict], key) -> dict:
    rows: dict[str, list[dict]] = defaultdict(list)
    for a in attackers:
        rows[key(a)].append(a)
    return {
        name: {
            "family": group[0]["family"], "attackers": len(group),
            "detection_rate": _rate(sum(a["detected"] for a in group), len(group)),
            "right_family_rate": _rate(sum(a["right_family"] for a in group), len(group)),
            "queries_to_detection": _quantiles(
                [a["queries_to_detection"] for a in group if a["queries_to_detection"]]),
            "queries_to_right_family": _quantiles(
                [a["queries_to_right_family"] for a in group if a["queries_to_right_family"]]),
        }
        for name, group in sorted(rows.items())
    }


def _by_kind(batches: list[dict]) -> dict:
    kinds: dict[str, list[dict]] = defaultdict(list)
    for b in batches:
        kinds[b["kind"]].append(b)
    out = {kind: {"batches": len(group), "poisoned": group[0]["poisoned"],
                  "alerted_rate": _rate(sum(b["alerted"] for b in group), len(group))}
           for kind, group in sorted(kinds.items())}
    poisoned = [b for b in batches if b["poisoned"]]
    out["all_poisoned"] = {"batches": len(poisoned), "poisoned": True,
                           "alerted_rate": _rate(sum(b["alerted"] for b in poisoned),
                                                 len(poisoned))}
    return out


def check_targets(result: dict) -> list[dict]:
    """Each target with its measured value and whether it is met."""
    checks = []

    def check(name, value, limit, at_least):
        met = value is not None and (value >= limit if at_least else value <= limit)
        checks.append({"target": name, "value": value,
                       "limit": f"{'>=' if at_least else '<='} {limit}", "met": met})

    for variant, row in result["variants"].items():
        check(f"{variant}: detection rate", row["detection_rate"],
              TARGETS["attack_detection_rate"], True)
        if row["family"] == "adversarial" and variant not in ONE_SHOT_VARIANTS:
            check(f"{variant}: median queries to detection",
                  row["queries_to_detection"]["median"],
                  TARGETS["adversarial_median_queries"], False)
    batches = result["batches"]
    check("poisoned batches: detection rate", batches["all_poisoned"]["alerted_rate"],
          TARGETS["poisoned_batch_detection_rate"], True)
    check("benign clients: false-positive rate", result["benign"]["fp_rate"],
          TARGETS["benign_client_fp_rate"], False)
    for kind in ("clean", "benign_drift"):
        if kind in batches:
            check(f"{kind} batches: false-positive rate", batches[kind]["alerted_rate"],
                  TARGETS["clean_batch_fp_rate"], False)
    return checks


# --------------------------------------------------------------------------- printing


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value) -> str:
    return "-" if value is None else f"{value:g}"


def render(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A table: rich on a terminal, aligned plain text otherwise (logs, CI)."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        table.add_column(columns[0], no_wrap=True)  # names stay whole on narrow terminals
        for column in columns[1:]:
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max(len(str(x)) for x in [c, *(r[i] for r in rows)]) for i, c in enumerate(columns)]
    print(f"\n{title}")
    for line in [columns, *rows]:
        print("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)
                        for i, (x, w) in enumerate(zip(line, widths, strict=True))))


def print_report(result: dict) -> None:
    columns = ["variant", "family", "attackers", "detected", "right family",
               "median q", "p90 q"]

    def variant_rows(table):
        return [[name, row["family"], str(row["attackers"]), _pct(row["detection_rate"]),
                 _pct(row["right_family_rate"]), _num(row["queries_to_detection"]["median"]),
                 _num(row["queries_to_detection"]["p90"])] for name, row in table.items()]

    benign = result["benign"]
    rules = ", ".join(f"{r} ({n})" for r, n in benign["rules"].items()) or "none"
    render("Attackers by variant (queries to detection: 1-based, sybil ids counted together)",
           columns, variant_rows(result["variants"]))
    render("Attackers by dataset and variant", columns, variant_rows(result["dataset_variants"]))
    render("Benign clients", ["clients", "alerted", "false-positive rate", "rules fired"],
           [[str(benign["clients"]), str(benign["alerted"]), _pct(benign["fp_rate"]), rules]])
    render("Benign clients by behaviour", ["behaviour", "clients", "alerted", "rate"],
           [[b, str(r["clients"]), str(r["alerted"]), _pct(r["fp_rate"])]
            for b, r in benign["by_behaviour"].items()])
    render("Training batches (poisoned kinds: detection rate; others: false-positive rate)",
           ["kind", "batches", "poisoned", "alerted"],
           [[kind, str(r["batches"]), "yes" if r["poisoned"] else "no", _pct(r["alerted_rate"])]
            for kind, r in result["batches"].items()])
    render("Targets", ["target", "value", "limit", "met"],
           [[c["target"], _num(c["value"]), c["limit"], "yes" if c["met"] else "NO"]
            for c in result["targets"]])
    if result.get("unmatched_alerts"):
        print(f"\n{result['unmatched_alerts']} alerts named no known client or batch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("bench/quality/data"))
    parser.add_argument("--work", type=Path, default=Path("bench/out/quality"))
    parser.add_argument("--seed", type=int, default=0, help="for generating missing data")
    parser.add_argument("--scale", type=float, default=1.0, help="for generating missing data")
    args = parser.parse_args(argv)

    ensure_data(args.data, args.seed, args.scale)
    truth = json.loads((args.data / "truth.json").read_text())
    ran = run_modelwatch(args.data, args.work, truth)
    alerts = read_alerts(ran["alerts"])
    result = score(truth, alerts, group_order(args.data / "inference.jsonl", truth))
    result["targets"] = check_targets(result)
    result["alerts"] = len(alerts)
    result["deadletter"] = len(read_alerts(ran["deadletter"]))
    result["timings"] = ran["timings"]
    print_report(result)
    print(f"\n{len(alerts)} alerts, {result['deadletter']} dead letters; timings {ran['timings']}")
    (args.work / "quality.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.work / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
