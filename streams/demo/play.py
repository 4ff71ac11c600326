"""``modelwatch run --demo``: the built-in scenario, judged, alerts on the terminal.

The scenario (``streams.demo.scenario.demo_scenario``) is made fresh in a temporary
folder: a digits model, thirty honest clients, a uniform-random extraction
attacker, a Jacobian-augmentation extraction attacker, a decision-based evasion
attacker, and training batches of which one has 40 % of a class relabelled and
one a backdoor trigger. No attack library is needed: the attackers are small numpy
implementations.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import msgspec

from detectors.profile import build_profile
from streams.alerts import alert_line
from streams.files import read_thresholds, write_profile
from streams.replay import replay
from streams.stats import stats_event_from_csv
from streams.tabular import read_table


def prepare(folder: Path) -> dict[str, Path]:
    """Scenario files, profile and training-stats events in ``folder``."""
    from streams.demo.scenario import demo_scenario

    paths = demo_scenario(folder)
    truth = json.loads(paths["truth.json"].read_text())
    model = next(iter(truth["clients"].values()))["model"]
    dataset = truth["batches"][0]["dataset"]
    X, y, names = read_table(paths["train.csv"], "y")
    profile = build_profile(X, y, names, model=model, dataset=dataset)
    paths["profile"] = folder / "profile.json"
    write_profile(profile, paths["profile"])
    paths["stats"] = folder / "stats.jsonl"
    with open(paths["stats"], "wb") as out:
        for batch in sorted(truth["batches"], key=lambda b: b["ts"]):
            event = stats_event_from_csv(None, folder / batch["path"], dataset=dataset,
                                         source=batch["source"], batch_id=batch["batch_id"],
                                         ts=batch["ts"], profile=profile)
            out.write(msgspec.json.encode(event) + b"\n")
    return paths


def summary(truth: dict, caught: set[str], n_events: int, n_batches: int, n_alerts: int) -> str:
    """Which of the scenario's attacks were caught, and how many honest clients alerted."""
    attackers = {c: t["variant"] for c, t in truth["clients"].items() if t["kind"] == "attack"}
    poisoned = {b["batch_id"]: b["kind"] for b in truth["batches"] if b["poisoned"]}
    honest = [c for c, t in truth["clients"].items() if t["kind"] == "benign"]
    lines = [f"\n{n_events} events and {n_batches} training batches judged; {n_alerts} alerts."]
    lines += [f"  {kind:<18} {name:<16} {'DETECTED' if name in caught else 'missed'}"
              for name, kind in {**attackers, **poisoned}.items()]
    lines.append(f"  honest clients alerted: {sum(c in caught for c in honest)} of {len(honest)}")
    return "\n".join(lines)


def expected_detections(truth: dict) -> set[str]:
    """The scenario's attacker ids and poisoned batch ids."""
    return ({c for c, t in truth["clients"].items() if t["kind"] == "attack"}
            | {b["batch_id"] for b in truth["batches"] if b["poisoned"]})


def play_demo_offline(thresholds_path: Path | None = None) -> int:
    """The demo through ``replay``: no broker, a few seconds."""
    from streams.files import load_profile

    thresholds = read_thresholds(thresholds_path)
    with tempfile.TemporaryDirectory(prefix="modelwatch-demo-") as tmp:
        folder = Path(tmp)
        print(GENERATING, file=sys.stderr)
        paths = prepare(folder)
        result = replay([load_profile(paths["profile"])], thresholds,
                        inference_log=paths["inference.jsonl"], training_stats=paths["stats"],
                        deadletter=None)
        for alert in result.alerts:
            print(alert_line(alert))
        truth = json.loads(paths["truth.json"].read_text())
        caught = {a.modelwatch.client_id for a in result.alerts} | {
            a.modelwatch.batch_id for a in result.alerts}
        print(summary(truth, caught, result.events, result.batches, len(result.alerts)))
    return 0


GENERATING = ("modelwatch demo: generating the scenario (digits model, 30 honest clients, "
              "3 attackers, 6 training batches)...")
