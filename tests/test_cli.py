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
    huge = digits.events("mallory", np.full((12, 64), 1e300))
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
