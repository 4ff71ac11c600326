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

# Per data set and pooled (issue 10).
TARGETS = {
    "honest_rate": 0.005,  # honest clients with any alert, all kinds together
    "honest_kind_rate": 0.02,  # within every honest kind
    "attack_detection_rate": 0.95,  # per attack kind, any alert on any of the actor's ids
    "evasion_median_queries": 20,  # query-based evasion
    "extraction_median_queries": 150,
    "poisoned_batch_rate": 0.95,  # per poisoning kind; subtle kinds are reported only
    "quiet_batch_rate": 0.01,  # clean and benign_drift batches
}
# One-shot transfer queries are not a query-based attack: reported, no target.
ONE_SHOT_VARIANTS = {"adv_transfer"}
BATCH_ORDER = ("clean", "benign_drift", "label_flip", "backdoor", "outliers", "duplicates",
               "label_flip_subtle", "backdoor_subtle")


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


def code_version() -> dict:
    """The commit measured, and the files under detectors/ and streams/ that differ from it
    (the detectors change while people work: say what was measured)."""
    def git(*args):
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return done.stdout.rstrip("\n") if done.returncode == 0 else None

    status = git("status", "--porcelain", "--", "detectors", "streams")
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "modified": [line[3:] for line in status.splitlines()] if status else []}


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
    features: list[float] | None = None


def natural_rows(truth: dict) -> dict[str, tuple]:
    """Per data set, its victim's rounding and the set of its data's rows as sent (bytes)."""
    from streams.demo import scenario

    out = {}
    for dataset in sorted({c["dataset"] for c in truth["clients"].values()}):
        victim = scenario.load_victim(dataset, seed=truth["seed"])
        X = np.vstack([victim.X_train, victim.X_benign, victim.X_attacker, victim.X_batches])
        out[dataset] = (victim.round, {row.tobytes() for row in victim.round(X)})
    return out


def group_order(inference_log: Path, truth: dict) -> tuple[dict[str, int], dict[str, int]]:
    """request_id -> 1-based position among all requests of its attacker (ids of one
    attacker counted together), in time order, and per attacker the position of its
    first crafted query: the first that is not a row of the data set (decision-based
    attackers first ask about natural rows to find starting points). Honest clients
    are left out."""
    attackers = {cid: c for cid, c in truth["clients"].items() if c["kind"] == "attack"}
    natural = natural_rows(truth)
    decoder = msgspec.json.Decoder(_Request)
    counts: Counter = Counter()
    position, crafted = {}, {}
    with open(inference_log, "rb") as lines:
        for line in lines:
            event = decoder.decode(line)
            client = attackers.get(event.client_id)
            if client is not None:
                group = client["group"]
                counts[group] += 1
                position[event.request_id] = counts[group]
                if group not in crafted and event.features is not None:
                    rounding, rows = natural[client["dataset"]]
                    if rounding(np.array(event.features)).tobytes() not in rows:
                        crafted[group] = counts[group]
    return position, crafted


def read_alerts(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, "rb") as lines:
        return [msgspec.json.decode(line) for line in lines if line.strip()]


def _rate(hits: int, total: int) -> float | None:
    return round(hits / total, 4) if total else None


def _quantiles(values: list[float]) -> dict:
    """Median and p90 over every attacker; one never detected counts as infinitely many
    queries, so a quantile that falls on one is None ("never")."""
    if not values:
        return {"median": None, "p90": None}
    out = {}
    for name, q in (("median", 50), ("p90", 90)):
        value = float(np.percentile(values, q, method="higher"))
        out[name] = None if np.isinf(value) else value
    return out


def query_kind(variant: str, family: str) -> str:
    """Which queries-to-detection target applies: extraction, evasion or none (one-shot)."""
    if variant in ONE_SHOT_VARIANTS:
        return "one_shot"
    return "extraction" if family == "extraction" else "evasion"


def score(truth: dict, alerts: list[dict], position: dict[str, int],
          crafted: dict[str, int] | None = None) -> dict:
    """Detection numbers from ground truth, alerts and each attacker request's position.

    Parameters
    ----------
    truth : dict
        ``truth.json``.
    alerts : list of dict
        ECS alerts as ``modelwatch replay`` writes them.
    position : dict
        request_id -> 1-based index among its attacker's requests (see ``group_order``).
    crafted : dict, optional
        attacker group -> position of its first crafted query (see ``group_order``).

    Returns
    -------
    dict
        ``datasets``: per data set and ``all`` pooled, the honest kinds, attack kinds and
        batch kinds; ``attackers``, ``honest_alerted`` and ``batches``: one record each.
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

    # Attackers: one record per group (the ids of one actor are one attacker).
    groups: dict[str, dict] = {}
    for cid, c in clients.items():
        if c["kind"] != "attack":
            continue
        group = groups.setdefault(c["group"], {**c, "alerts": [], "ids": 0})
        group["alerts"] += client_alerts.get(cid, [])
        group["ids"] += 1
    attackers = []
    for name, g in groups.items():
        right = [a for a in g["alerts"] if a["modelwatch"].get("detector") == g["family"]]
        attackers.append({
            "group": name, "dataset": g["dataset"], "variant": g["variant"],
            "family": g["family"], "ids": g["ids"], "detected": bool(g["alerts"]),
            "right_family": bool(right),
            "queries_to_detection": _first_query(g["alerts"], position),
            "queries_to_right_family": _first_query(right, position),
            "crafted_queries_to_detection": _after(_first_query(g["alerts"], position),
                                                   (crafted or {}).get(name)),
            "rules": sorted({a["rule"]["name"] for a in g["alerts"]}),
        })

    honest = []
    for cid, c in clients.items():
        if c["kind"] == "benign":
            mine = client_alerts.get(cid, [])
            honest.append({"client_id": cid, "dataset": c["dataset"],
                           "behaviour": c.get("behaviour", "benign"), "site": c.get("site"),
                           "alerted": bool(mine),
                           "rules": sorted({a["rule"]["name"] for a in mine})})

    batches = [{**b, "alerted": bool(batch_alerts.get(b["batch_id"])),
                "rules": sorted({a["rule"]["name"] for a in batch_alerts.get(b["batch_id"], [])})}
               for b in truth["batches"]]

    datasets = {}
    for dataset in [*sorted({c["dataset"] for c in clients.values()}), "all"]:
        def mine(rows, dataset=dataset):
            return [r for r in rows if dataset == "all" or r["dataset"] == dataset]
        datasets[dataset] = {"honest": _honest(mine(honest)),
                             "attacks": _by_variant(mine(attackers)),
                             "batches": _by_kind(mine(batches))}
    return {
        "datasets": datasets,
        "unmatched_alerts": unmatched,
        "attackers": attackers,
        "honest_alerted": [h for h in honest if h["alerted"]],
        "batches": [{k: b[k] for k in ("dataset", "batch_id", "kind", "alerted", "rules")}
                    for b in batches],
    }


def _first_query(alerts: list[dict], position: dict[str, int]) -> int | None:
    """Position of the earliest trigger among an attacker's alerts."""
    found = [position[a["modelwatch"]["trigger"]["request_id"]] for a in alerts
             if (a["modelwatch"].get("trigger") or {}).get("request_id") in position]
    return min(found) if found else None


def _after(detected_at: int | None, first_crafted: int | None) -> int | None:
    """Crafted queries sent up to the detection (1 when detected before any)."""
    if detected_at is None or first_crafted is None:
        return None
    return max(1, detected_at - first_crafted + 1)


def _honest(rows: list[dict]) -> dict:
    def summary(group):
        alerted = [r for r in group if r["alerted"]]
        rules = Counter(rule for r in alerted for rule in r["rules"])
        return {"clients": len(group), "alerted": len(alerted),
                "rate": _rate(len(alerted), len(group)), "rules": dict(rules.most_common())}

    kinds: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        kinds[r["behaviour"]].append(r)
    return {**summary(rows), "kinds": {k: summary(g) for k, g in sorted(kinds.items())}}


def _by_variant(attackers: list[dict]) -> dict:
    rows: dict[str, list[dict]] = defaultdict(list)
    for a in attackers:
        rows[a["variant"]].append(a)
    out = {}
    for name, group in sorted(rows.items()):
        def queries(key, group=group):
            return [a[key] if a[key] else np.inf for a in group]
        out[name] = {
            "family": group[0]["family"], "query_kind": query_kind(name, group[0]["family"]),
            "attackers": len(group), "ids_per_attacker": group[0]["ids"],
            "detected": sum(a["detected"] for a in group),
            "detection_rate": _rate(sum(a["detected"] for a in group), len(group)),
            "right_family_rate": _rate(sum(a["right_family"] for a in group), len(group)),
            "queries_to_detection": _quantiles(queries("queries_to_detection")),
            "queries_to_right_family": _quantiles(queries("queries_to_right_family")),
            "crafted_queries_to_detection": _quantiles(queries("crafted_queries_to_detection")),
            "rules": dict(Counter(r for a in group for r in a["rules"]).most_common()),
        }
    return out


def _by_kind(batches: list[dict]) -> dict:
    kinds: dict[str, list[dict]] = defaultdict(list)
    for b in batches:
        kinds[b["kind"]].append(b)
    order = {k: i for i, k in enumerate(BATCH_ORDER)}
    return {
        kind: {"batches": len(group), "poisoned": group[0]["poisoned"],
               "subtle": group[0].get("subtle", False),
               "alerted": sum(b["alerted"] for b in group),
               "alerted_rate": _rate(sum(b["alerted"] for b in group), len(group)),
               "rules": dict(Counter(r for b in group for r in b["rules"]).most_common())}
        for kind, group in sorted(kinds.items(), key=lambda kv: order.get(kv[0], 99))
    }


def check_targets(result: dict) -> list[dict]:
    """Each target per data set (and pooled as ``all``) with its value and whether it is
    met; report-only rows have ``met`` None."""
    checks = []

    def check(dataset, name, value, limit, at_least, report_only=False):
        if report_only:
            met, text = None, "report"
        else:
            met = value is not None and (value >= limit if at_least else value <= limit)
            shown = f"{limit:g}" if name.endswith("median queries") else f"{100 * limit:g}%"
            text = f"{'>=' if at_least else '<='} {shown}"
        checks.append({"dataset": dataset, "target": name, "value": value, "limit": text,
                       "met": met})

    for dataset, table in result["datasets"].items():
        honest = table["honest"]
        check(dataset, "honest: all kinds", honest["rate"], TARGETS["honest_rate"], False)
        for kind, row in honest["kinds"].items():
            check(dataset, f"honest: {kind}", row["rate"], TARGETS["honest_kind_rate"], False)
        for variant, row in table["attacks"].items():
            one_shot = row["query_kind"] == "one_shot"
            check(dataset, f"{variant}: detected", row["detection_rate"],
                  TARGETS["attack_detection_rate"], True, report_only=one_shot)
            if not one_shot:
                limit = TARGETS[f"{row['query_kind']}_median_queries"]
                check(dataset, f"{variant}: median queries",
                      row["queries_to_detection"]["median"], limit, False)
        for kind, row in table["batches"].items():
            if row["poisoned"]:
                check(dataset, f"batches {kind}: alerted", row["alerted_rate"],
                      TARGETS["poisoned_batch_rate"], True, report_only=row["subtle"])
            else:
                check(dataset, f"batches {kind}: alerted", row["alerted_rate"],
                      TARGETS["quiet_batch_rate"], False)
    return checks


# --------------------------------------------------------------------------- printing


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value) -> str:
    return "never" if value is None else f"{value:g}"


def _rules(rules: dict, top: int = 3) -> str:
    shown = [f"{r} {n}" for r, n in list(rules.items())[:top]]
    return ", ".join(shown) + (" …" if len(rules) > top else "") if shown else ""


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
        Console(width=200).print(table)
        return
    widths = [max(len(str(x)) for x in [c, *(r[i] for r in rows)]) for i, c in enumerate(columns)]
    print(f"\n{title}")
    for line in [columns, *rows]:
        cells = [str(x).ljust(w) if i in (0, len(line) - 1) else str(x).rjust(w)
                 for i, (x, w) in enumerate(zip(line, widths, strict=True))]
        print("  ".join(cells).rstrip())


def print_report(result: dict) -> None:
    for dataset, table in result["datasets"].items():
        name = "all data sets pooled" if dataset == "all" else dataset
        honest = table["honest"]
        render(f"[{name}] honest clients by kind (target <= 2 % per kind, <= 0.5 % overall)",
               ["kind", "clients", "alerted", "rate", "rules fired (clients)"],
               [[kind, str(r["clients"]), str(r["alerted"]), _pct(r["rate"]), _rules(r["rules"])]
                for kind, r in honest["kinds"].items()]
               + [["ALL", str(honest["clients"]), str(honest["alerted"]), _pct(honest["rate"]),
                   _rules(honest["rules"])]])
        render(f"[{name}] attackers by kind (queries: 1-based over all the actor's ids; "
               "median/p90 over every attacker, 'never' = not reached)",
               ["kind", "family", "n", "ids", "detected", "right fam", "median q", "p90 q",
                "median q right", "median crafted", "rules fired (attackers)"],
               [[v, r["family"], str(r["attackers"]), str(r["ids_per_attacker"]),
                 _pct(r["detection_rate"]), _pct(r["right_family_rate"]),
                 _num(r["queries_to_detection"]["median"]), _num(r["queries_to_detection"]["p90"]),
                 _num(r["queries_to_right_family"]["median"]),
                 _num(r["crafted_queries_to_detection"]["median"]), _rules(r["rules"])]
                for v, r in table["attacks"].items()])
        render(f"[{name}] training batches (poisoned: detection rate; clean, drift: alert rate)",
               ["kind", "batches", "poisoned", "alerted", "rate", "rules fired (batches)"],
               [[k, str(r["batches"]),
                 ("subtle" if r["subtle"] else "yes") if r["poisoned"] else "no",
                 str(r["alerted"]), _pct(r["alerted_rate"]), _rules(r["rules"])]
                for k, r in table["batches"].items()])
    datasets = list(result["datasets"])
    cells: dict[str, dict[str, dict]] = defaultdict(dict)
    limits = {}
    for c in result["targets"]:
        cells[c["target"]][c["dataset"]] = c
        limits[c["target"]] = c["limit"]

    def cell(c):
        if c is None:
            return ""
        queries = c["target"].endswith("median queries")
        value = _num(c["value"]) if queries else _pct(c["value"])
        return value + ("" if c["met"] in (True, None) else " ✗")

    def order(target):
        section = 0 if target.startswith("honest") else 2 if target.startswith("batches") else 1
        kind = target.split(":")[0].removeprefix("batches ")
        return (section, BATCH_ORDER.index(kind) if kind in BATCH_ORDER else 0, target)

    render("Targets per data set (✗ = missed; 'report' = no target)",
           ["target", "limit", *datasets],
           [[t, limits[t], *(cell(cells[t].get(d)) for d in datasets)]
            for t in sorted(cells, key=order)])
    missed = [c for c in result["targets"] if c["met"] is False]
    scored = [c for c in result["targets"] if c["met"] is not None]
    print(f"\n{len(scored) - len(missed)} of {len(scored)} targets met")
    if result.get("unmatched_alerts"):
        print(f"{result['unmatched_alerts']} alerts named no known client or batch")


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
    result = {"data": str(args.data), "seed": truth.get("seed"), "scale": truth.get("scale"),
              "code": code_version()}
    result.update(score(truth, alerts, *group_order(args.data / "inference.jsonl", truth)))
    result["targets"] = check_targets(result)
    result["alerts"] = len(alerts)
    result["deadletter"] = len(read_alerts(ran["deadletter"]))
    result["timings"] = ran["timings"]
    print_report(result)
    print(f"\n{len(alerts)} alerts, {result['deadletter']} dead letters; timings {ran['timings']}")
    print(f"measured: commit {result['code']['commit']}, modified under detectors/ and "
          f"streams/: {', '.join(result['code']['modified']) or 'none'}")
    (args.work / "quality.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.work / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
