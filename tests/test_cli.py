"""The command line: help, one-line errors naming file/line/field, dead letters."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streams.records import TrainingStatsEvent, decode_stats
from tests.conftest import run_cli, write_jsonl


def write_csv(path, names, X, y):
    with open(path, "w") as out:
        out.write(",".join([*names, "y"]) + "\n")
        for row, label in zip(X, y, strict=True):
            out.write(",".join(f"{v:g}" for v in row) + f",{label}\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):
    folder = tmp_path_factory.mktemp("cli")
    train = write_csv(folder / "train.csv", digits.names, digits.X_train, digits.y_train)
    profile = folder / "profile.json"
    done = run_cli("profile", "--model", "digits", "--data", train, "--label-column", "y",
                   "--dataset", "digits-train", "--out", profile)
    assert done.returncode == 0, done.stderr
    return folder, train, profile


def one_line_error(done):
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["profile", "stats", "replay", "run"])
def test_every_command_has_help(command):
    done = run_cli(command, "--help")
    assert done.returncode == 0 and "usage:" in done.stdout


def test_bad_flags_give_one_line(files):
    assert "--alerts-out" in one_line_error(run_cli("replay", "--inference-log", "x.jsonl"))
    assert "invalid choice" in one_line_error(run_cli("frobnicate"))


def test_missing_file_names_the_file(files, tmp_path):
    folder, _, profile = files
    line = one_line_error(run_cli("replay", "--profile", profile, "--inference-log",
                                  tmp_path / "nope.jsonl", "--alerts-out", tmp_path / "a.jsonl"))
    assert "nope.jsonl" in line and "cannot read" in line


def test_bad_csv_cell_names_file_line_and_field(files, tmp_path):
    _, train, _ = files
    lines = train.read_text().splitlines()
    cells = lines[7].split(",")
    cells[3] = "twelve"
    lines[7] = ",".join(cells)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    line = one_line_error(run_cli("profile", "--model", "m", "--data", bad, "--label-column", "y",
                                  "--out", tmp_path / "p.json"))
    assert f"{bad}:8: field 'px3': not a number: 'twelve'" in line


def test_bad_profile_file(files, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": 1, "model": "m"}')
    log = write_jsonl(tmp_path / "log.jsonl", [])
    line = one_line_error(run_cli("replay", "--profile", broken, "--inference-log", log,
                                  "--alerts-out", tmp_path / "a.jsonl"))
    assert "broken.json" in line and "feature_names" in line


@pytest.mark.parametrize(("content", "message"), [
    ("[adversarial]\nknn_kk = 3\n", "adversarial.knn_kk"),
    ("[adversarial]\ncrowding_quantile = 0.002\n", "crowding_quantile must be one of"),
])
def test_bad_thresholds_file(files, tmp_path, content, message):
    _, _, profile = files
    thresholds = tmp_path / "t.toml"
    thresholds.write_text(content)
    log = write_jsonl(tmp_path / "log.jsonl", [])
    line = one_line_error(run_cli("replay", "--profile", profile, "--inference-log", log,
                                  "--alerts-out", tmp_path / "a.jsonl", "--thresholds", thresholds))
    assert message in line


def test_replay_sends_bad_lines_to_the_dead_letter_file_and_goes_on(files, digits, tmp_path):
    _, _, profile = files
    good = digits.events("alice", digits.X_pool[:20])
    lines = [json.dumps(e) for e in good[:10]]
    lines += ["{not json", json.dumps({**good[0], "features": [1, 2, 3]}),
              json.dumps({**good[0], "ts": "last tuesday"}), json.dumps([good[10], {"ts": 1}])]
    lines += [json.dumps(e) for e in good[11:]]
    log = write_jsonl(tmp_path / "log.jsonl", lines)
    dead, alerts = tmp_path / "dead.jsonl", tmp_path / "alerts.jsonl"
    done = run_cli("replay", "--profile", profile, "--inference-log", log,
                   "--alerts-out", alerts, "--deadletter", dead)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "4 bad records" in done.stderr and "20 events" in done.stderr
    letters = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [d["line"] for d in letters] == [11, 12, 13, 14]
    assert "malformed" in letters[0]["reason"]
    assert "features: expected 64" in letters[1]["reason"]
    assert letters[2]["reason"].startswith("ts:")
    assert "array element 1" in letters[3]["reason"]
    assert letters[3]["record"] == '{"ts": 1}'  # the element's own bytes, not its array


def stats_via_cli(profile, digits, tmp_path):
    """``modelwatch stats`` on 200 pool rows labelled 0."""
    batch = write_csv(tmp_path / "batch.csv", digits.names, digits.X_pool[:200],
                      np.zeros(200, dtype=int))
    return run_cli("stats", "--profile", profile, "--dataset", "digits-train", "--source", "s1",
                   "--batch-id", "b1", "--ts", "2026-11-21T10:00:00Z", batch)


def test_stats_writes_one_training_stats_event(files, digits, tmp_path):
    done = stats_via_cli(files[2], digits, tmp_path)
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    event, ts = decode_stats(line.encode())
    assert isinstance(event, TrainingStatsEvent)
    assert event.n == 200 and event.labels == {"0": 200}
    assert set(event.features) == set(digits.names)
    px = event.features["px10"]
    assert sum(px.hist.counts) + px.below + px.above == px.count == 200
    assert event.by_label["0"]["px10"].mean == pytest.approx(digits.X_pool[:200, 10].mean())


def test_inputs_that_used_to_crash_replay_are_dead_lettered(files, digits, tmp_path):
    _, _, profile = files
    good = digits.events("alice", digits.X_pool[:5])
    # Twelve distinct absurd rows: an exact repeat counts once in the rate tests, and
    # 1e300 and 2e300 are both clipped to the same bound, so one pixel tells them apart.
    absurd = np.full((12, 64), 1e300)
    absurd[:, 0] = np.arange(12)
    huge = digits.events("mallory", absurd)
    lines = [json.dumps(e) for e in good]
    lines += [json.dumps({**good[0], "ts": 3e11}), json.dumps({**good[0], "ts": "20000-01-01T00:00:00Z"}),
              json.dumps({**good[0], "ts": "NaTZ"})]
    lines += [json.dumps({**good[0], "model": "other", "features": [1.0, 2.0]}),
              json.dumps({**good[1], "model": "other", "features": [1.0, 2.0, 3.0]})]
    lines += [json.dumps(e) for e in huge]
    log = write_jsonl(tmp_path / "log.jsonl", lines)
    dead, alerts = tmp_path / "dead.jsonl", tmp_path / "alerts.jsonl"
    done = run_cli("replay", "--profile", profile, "--inference-log", log, "--alerts-out", alerts,
                   "--deadletter", dead)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    reasons = [json.loads(line)["reason"] for line in dead.read_text().splitlines()]
    assert len(reasons) == 4
    assert sum(r.startswith("ts:") for r in reasons) == 3
    assert "expected 2 values for model other" in reasons[3]
    fired = [json.loads(line) for line in alerts.read_text().splitlines()]
    mallory = [a for a in fired if a["modelwatch"]["client_id"] == "mallory"]
    assert mallory
    assert all(v is not None for a in mallory for v in a["modelwatch"]["evidence"].values())


def test_implausible_training_stats_are_dead_lettered(files, digits, tmp_path):
    _, _, profile = files
    event = json.loads(stats_via_cli(profile, digits, tmp_path).stdout)
    event["by_label"]["0"]["px3"]["mean"] = 1e308
    stats = write_jsonl(tmp_path / "stats.jsonl", [event])
    dead = tmp_path / "dead.jsonl"
    done = run_cli("replay", "--profile", profile, "--training-stats", stats,
                   "--alerts-out", tmp_path / "a.jsonl", "--deadletter", dead)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    [letter] = [json.loads(line) for line in dead.read_text().splitlines()]
    assert letter["reason"].startswith("by_label.0.px3.mean")


def test_dead_letters_keep_the_original_bytes(files, digits, tmp_path):
    _, _, profile = files
    good = digits.events("alice", digits.X_pool[:3])
    odd = '{"ts": "never",   "model": "digits", "client_id": "bob", "prediction": 1}'
    log = write_jsonl(tmp_path / "log.jsonl", [json.dumps(e) for e in good] + [odd])
    dead = tmp_path / "dead.jsonl"
    done = run_cli("replay", "--profile", profile, "--inference-log", log,
                   "--alerts-out", tmp_path / "a.jsonl", "--deadletter", dead)
    assert done.returncode == 0, done.stderr
    [letter] = [json.loads(line) for line in dead.read_text().splitlines()]
    assert letter["line"] == 4 and letter["record"] == odd


# --- help: each command lists its own flags ------------------------------------------------

def _subparser(*path):
    from streams.cli.main import build_parser

    parser = build_parser()
    for name in path:
        parser = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"
                      ).choices[name]
    return parser


def _flags(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


WORKER_ONLY = {"--profiles", "--thresholds", "--metrics-port", "--sinks", "--log-level"}


@pytest.mark.parametrize(("path", "has", "lacks"), [
    (("stats",), {"--broker", "--topic-stats", "--tls-ca", "--sasl-password", "--kafka"},
     WORKER_ONLY | {"--state-dir", "--topic-alerts", "--topic-inference", "--topic-deadletter"}),
    (("tail",), {"--broker", "--state-dir", "--topic-inference", "--topic-deadletter"},
     WORKER_ONLY | {"--topic-alerts", "--topic-stats"}),
    (("alerts", "forward"), {"--sink", "--broker", "--topic-alerts", "--from-time"},
     WORKER_ONLY | {"--state-dir", "--topic-inference", "--topic-stats", "--topic-deadletter"}),
    (("worker",), WORKER_ONLY | {"--state-dir", "--topic-alerts", "--broker"}, set()),
    (("run",), WORKER_ONLY - {"--log-level"} | {"--log", "--demo"}, {"--log-level"}),
])
def test_each_command_help_lists_only_its_own_flags(path, has, lacks):
    flags = _flags(_subparser(*path))
    assert has <= flags, has - flags
    assert not flags & lacks, flags & lacks


def test_alerts_forward_has_one_sink_flag():
    flags = _flags(_subparser("alerts", "forward"))
    assert "--sink" in flags and "--sinks" not in flags


@pytest.mark.parametrize("path", [("profile",), ("stats",), ("replay",), ("tail",), ("run",),
                                  ("worker",)])
def test_every_flag_has_help(path):
    parser = _subparser(*path)
    missing = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert not missing, missing


def test_tail_and_stats_help_in_a_terminal_lists_no_worker_settings():
    for command in ("stats", "tail"):
        done = run_cli(command, "--help")
        assert done.returncode == 0
        assert "MODELWATCH_PROFILES" not in done.stdout and "--sinks" not in done.stdout


# --- stats --dataset -----------------------------------------------------------------------

def test_stats_dataset_defaults_to_the_profiles(files, digits, tmp_path):
    _, _, profile = files
    batch = write_csv(tmp_path / "batch.csv", digits.names, digits.X_pool[:50],
                      np.zeros(50, dtype=int))
    done = run_cli("stats", "--profile", profile, "--source", "s1", "--batch-id", "b1", batch)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["dataset"] == "digits-train"


def test_stats_dataset_that_disagrees_with_the_profile_is_one_error(files, digits, tmp_path):
    _, _, profile = files
    batch = write_csv(tmp_path / "batch.csv", digits.names, digits.X_pool[:50],
                      np.zeros(50, dtype=int))
    line = one_line_error(run_cli("stats", "--profile", profile, "--dataset", "digits",
                                  "--source", "s1", "--batch-id", "b1", batch))
    assert str(profile) in line and "'dataset'" in line and "'digits-train'" in line
    assert "--dataset" in line


# --- replay: models and datasets that match no profile -------------------------------------

def test_replay_warns_once_per_model_and_dataset_without_a_profile(files, digits, tmp_path):
    _, _, profile = files
    good = digits.events("alice", digits.X_pool[:20])
    stranger = [{**e, "model": "fraud-v4", "features": e["features"][:3]} for e in good]
    log = write_jsonl(tmp_path / "log.jsonl", good + stranger)
    stats = json.loads(stats_via_cli(profile, digits, tmp_path).stdout)
    stats_file = write_jsonl(tmp_path / "stats.jsonl",
                             [stats, {**stats, "dataset": "other-train", "batch_id": "b2"},
                              {**stats, "dataset": "other-train", "batch_id": "b3"}])
    done = run_cli("replay", "--profile", profile, "--inference-log", log,
                   "--training-stats", stats_file, "--alerts-out", tmp_path / "a.jsonl")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 2, done.stderr
    assert warnings[0].startswith("replay: warning: model 'fraud-v4' matches no profile")
    assert "PRADA" in warnings[0]
    assert warnings[1].startswith("replay: warning: dataset 'other-train' matches no profile")


def test_replay_names_a_bounded_number_of_unknown_models(files, digits, tmp_path):
    from streams.cli.run import MAX_UNKNOWN_NAMES

    _, _, profile = files
    [event] = digits.events("alice", digits.X_pool[:1])
    log = write_jsonl(tmp_path / "log.jsonl", [{**event, "model": f"m{i:02d}"}
                                                for i in range(MAX_UNKNOWN_NAMES + 5)])
    done = run_cli("replay", "--profile", profile, "--inference-log", log,
                   "--alerts-out", tmp_path / "a.jsonl")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warnings) == MAX_UNKNOWN_NAMES + 1
    assert warnings[-1] == "replay: warning: 5 more models or datasets match no profile"


def test_replay_of_profiled_models_says_nothing_about_profiles(files, digits, tmp_path):
    _, _, profile = files
    log = write_jsonl(tmp_path / "log.jsonl", digits.events("alice", digits.X_pool[:5]))
    done = run_cli("replay", "--profile", profile, "--inference-log", log,
                   "--alerts-out", tmp_path / "a.jsonl")
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr


# --- the contract in the repository, and what run time needs --------------------------------

def test_docs_contract_has_an_example_event_that_decodes():
    import re

    from streams.records import InferenceEvent, decode_inference
    from tests.conftest import ROOT

    text = (ROOT / "docs" / "contract.md").read_text()
    assert "mirrors the project's fixed wire contract" in text
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, re.S)]
    profile = next(b for b in blocks if "feature_names" in b)
    events = [b for b in blocks if "client_id" in b and "modelwatch" not in b]
    assert len(events) == 2  # the contract's own, and the worked example
    example = events[-1]
    [decoded] = decode_inference(json.dumps(example).encode())
    assert isinstance(decoded, InferenceEvent)
    assert example["model"] == profile["model"]
    assert len(example["features"]) == len(profile["feature_names"])
    assert len(example["probabilities"]) == len(profile["classes"])
    assert str(example["prediction"]) in profile["classes"]


def test_docs_contract_mirrors_the_shared_contract():
    from tests.conftest import ROOT, SHARED_CONTRACT, need

    shared = need(SHARED_CONTRACT, "the shared contract (shared/spec/contract.md)")
    text = (ROOT / "docs" / "contract.md").read_text().split("\n## A worked example")[0]
    text = "\n".join(line for line in text.splitlines() if not line.startswith(">"))
    assert text.split() == shared.read_text().split()  # word for word


def test_every_library_the_package_imports_is_a_run_time_dependency():
    """``make run`` installs only these (``python -m streams.dashboards build`` needs yaml)."""
    import ast
    import re
    import sys
    import tomllib
    from importlib.metadata import packages_distributions

    from tests.conftest import ROOT

    optional = {"pyarrow"}  # Parquet input, if installed
    declared = {re.split(r"[<>=!~ \[]", d)[0].lower().replace("_", "-") for d in
                tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    distributions = packages_distributions()
    for path in [*(ROOT / "streams").rglob("*.py"), *(ROOT / "detectors").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("streams", "detectors") or \
                        top in optional:
                    continue
                dists = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
                assert dists & declared, f"{path.relative_to(ROOT)} imports {top}: not in " \
                                         "[project] dependencies"


def test_profile_of_a_small_training_set_says_what_it_cannot_calibrate(digits, tmp_path):
    small = write_csv(tmp_path / "small.csv", digits.names, digits.X_train[:150],
                      digits.y_train[:150])
    done = run_cli("profile", "--model", "m", "--data", small, "--label-column", "y",
                   "--out", tmp_path / "p.json")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning:" in line]
    assert any("adversarial.query_crowding" in w and "too few" in w for w in warnings), done.stderr
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["calibration"]["notes"]


def test_replay_explain_shows_each_rules_score_against_its_threshold(files, digits, tmp_path):
    _, _, profile = files
    rng = np.random.default_rng(3)
    events = digits.events("honest", digits.X_pool[:200])
    attack = digits.events("thief", np.round(rng.uniform(0, 16, size=(120, 64))))
    log = write_jsonl(tmp_path / "log.jsonl", events + attack)
    done = run_cli("replay", "--profile", profile, "--inference-log", log, "--alerts-out",
                   tmp_path / "a.jsonl", "--explain", "thief", "--explain", "honest",
                   "--explain", "nobody", "--report", tmp_path / "r.html")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    thief = out.split("digits/thief:")[1]
    assert thief.startswith(" 2 alert(s)"), out
    assert "ALERT adversarial." in thief and "ALERT extraction.synthetic_queries" in thief
    row = next(line for line in thief.splitlines() if "adversarial.out_of_distribution " in line)
    best, threshold = float(row.split()[1]), float(row.split()[2])
    assert best >= threshold
    honest = out.split("digits/honest:")[1].split("digits/thief:")[0]
    assert honest.startswith(" 0 alert(s)"), out
    assert "nobody: not seen" in out
    assert "Near misses" in (tmp_path / "r.html").read_text()
