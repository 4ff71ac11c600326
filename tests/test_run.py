"""``modelwatch run`` with the embedded broker: alerts on the terminal, a clean console,
warnings and dead-letter summaries, checks before anything starts, clean stop, and a
second run in the same folder that works like the first."""

from __future__ import annotations

import doctest
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import streams.cli.run
from tests.conftest import ROOT, run_cli
from tests.test_sinks import free_port

ALERT_LINE = r"^\S+Z  [a-z]+\.[a-z_]+ +(client|batch) "
DEADLINE_S = 240.0  # generous: the condition ends the wait, not the clock


def test_doctests():
    assert doctest.testmod(streams.cli.run).failed == 0


def one_line_error(done):
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "broker" not in done.stdout  # nothing was started
    return lines[0]


def _run_log(demo, tmp_path):
    """The demo log with events of a model that has no profile and bad lines among them."""
    folder, paths = demo
    lines = paths["inference.jsonl"].read_bytes().splitlines()
    first = json.loads(lines[0])
    stranger = [json.dumps({**first, "model": "fraud-v4", "client_id": f"s{i}",
                            "features": first["features"][:3]}).encode() for i in range(20)]
    short = [json.dumps({**first, "features": [1.0, 2.0]}).encode() for _ in range(30)]
    log = tmp_path / "inference.jsonl"
    log.write_bytes(b"\n".join(stranger + lines[:len(lines) // 2] + short + [b"not json"] * 5
                               + lines[len(lines) // 2:]) + b"\n")
    return log


def _start_run(folder, log, state, cwd, metrics_port):
    return subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "run", "--log", str(log),
         "--profiles", str(folder / "profiles"), "--state-dir", str(state),
         "--metrics-port", str(metrics_port)],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _read_until(runner, done) -> tuple[list[str], list[str]]:
    """stdout and stderr lines until ``done(out, err)`` holds or the deadline passes."""
    out, err = [], []
    os.set_blocking(runner.stdout.fileno(), False)
    os.set_blocking(runner.stderr.fileno(), False)
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline and not done(out, err) and runner.poll() is None:
        got = False
        for stream, lines in ((runner.stdout, out), (runner.stderr, err)):
            line = stream.readline()
            if line:
                lines.append(line.rstrip("\n"))
                got = True
        if not got:
            time.sleep(0.1)
    return out, err


def _stop(runner) -> None:
    try:
        runner.send_signal(signal.SIGINT)
        runner.wait(timeout=180)  # run stops its worker, tail and broker; slow on a busy machine
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)


def test_run_prints_alerts_warnings_and_dead_letters_and_runs_twice(demo, tmp_path):
    import re

    folder, _ = demo
    log = _run_log(demo, tmp_path)
    state = tmp_path / "state"

    def complete(out, err):
        alerts = [line for line in out if re.match(ALERT_LINE, line)]
        # Wait for the summary that counts the wrong-width events: summaries come every
        # 10 s, and the JSON ones can come first.
        return (len(alerts) >= 4 and any("'fraud-v4'" in line for line in err)
                and any("bad records" in line and "features" in line for line in err))

    for attempt in (1, 2):  # the same folder twice: the second run ships and judges again
        runner = _start_run(folder, log, state, tmp_path, free_port())
        try:
            out, err = _read_until(runner, complete)
            port = int(out[0].split("127.0.0.1:")[1].split(";")[0])
        finally:
            _stop(runner)
        assert complete(out, err), (attempt, out, err)
        # A clean console: alerts and run's own first line on stdout, run's lines on stderr.
        assert out[0].startswith("run: broker kafka://127.0.0.1:")
        assert all(re.match(ALERT_LINE, line) for line in out[1:]), out
        assert all(line.startswith("run: ") for line in err), err
        assert any(".adversarial" in line or "adversarial." in line for line in out)
        [warning] = [line for line in err if "'fraud-v4'" in line]
        assert "matches no profile" in warning and "PRADA" in warning
        summary = [line for line in err if "bad records" in line]
        assert all("-> topic modelwatch-deadletter" in line for line in summary)
        assert sum(int(re.search(r"run: (\d+) bad records", line).group(1))
                   for line in summary) <= 35
        assert any("features" in line for line in summary)
        # Nothing it started is left: no process in its group, the broker's port closed.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            leftover = subprocess.run(["pgrep", "-g", str(runner.pid)], capture_output=True,
                                      text=True).stdout.strip()
            if not leftover:
                break
            time.sleep(0.5)
        assert leftover == "", leftover
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0
        # The embedded broker's state went with it; what the children said is in run.log.
        assert [p.name for p in state.iterdir()] == ["run.log"]
        assert (state / "run.log").read_text().count("--- modelwatch run") == attempt


@pytest.mark.parametrize("case", ["profiles-missing", "profile-broken", "thresholds",
                                  "log-missing", "sinks", "metrics-port"])
def test_run_checks_everything_before_it_starts_anything(case, demo, tmp_path):
    folder, paths = demo
    argv = ["run", "--profiles", folder / "profiles", "--log", paths["inference.jsonl"],
            "--state-dir", tmp_path / "state", "--metrics-port", "0"]
    expect = {}
    if case == "profiles-missing":
        argv[2] = tmp_path / "nope"
        expect = {"nope", "--profiles"}
    elif case == "profile-broken":
        broken = tmp_path / "profiles"
        broken.mkdir()
        (broken / "bad.json").write_text('{"version": 1, "model": "m"}')
        argv[2] = broken
        expect = {"bad.json", "feature_names"}
    elif case == "thresholds":
        (tmp_path / "t.toml").write_text("[adversarial]\nknn_kk = 3\n")
        argv += ["--thresholds", tmp_path / "t.toml"]
        expect = {"t.toml", "adversarial.knn_kk"}
    elif case == "log-missing":
        argv[4] = tmp_path / "missing.jsonl"
        expect = {"missing.jsonl", "--log", "no such file"}
    elif case == "sinks":
        argv += ["--sinks", "gopher://siem:70"]
        expect = {"gopher"}
    elif case == "metrics-port":
        busy = socket.socket()
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        argv[-1] = busy.getsockname()[1]
        expect = {"--metrics-port", str(busy.getsockname()[1])}
    started = time.monotonic()
    done = run_cli(*argv)
    line = one_line_error(done)
    assert all(word in line for word in expect), line
    assert not (tmp_path / "state").exists() or case == "metrics-port" or \
        not any((tmp_path / "state").iterdir())
    assert time.monotonic() - started < 60  # no broker was started and waited on


def test_a_second_run_on_the_same_broker_and_state_folder_is_refused(demo, tmp_path):
    from streams.worker.broker import EmbeddedBroker

    folder, _ = demo
    state = tmp_path / "state"
    state.mkdir()
    with EmbeddedBroker() as broker, open(state / "run.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a first run holds it
        done = run_cli("run", "--broker", broker.url, "--profiles", folder / "profiles",
                       "--state-dir", state, "--metrics-port", "0")
    line = one_line_error(done)
    assert str(state) in line and "another modelwatch run" in line


def test_demo_plays_through_the_streaming_stack():
    done = subprocess.run([sys.executable, "-m", "streams.cli", "run", "--demo",
                           "--metrics-port", str(free_port())], cwd=ROOT,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "broker kafka://127.0.0.1:" in done.stderr
    summary = done.stdout.split("judged;")[1]
    assert summary.count("DETECTED") == 5 and "missed" not in summary
    assert "honest clients alerted: 0 of 30" in summary
    rules = {line.split()[1].split(".")[0] for line in done.stdout.splitlines() if "score" in line}
    assert rules == {"extraction", "adversarial", "poisoning"}
    # The worker's and tail's own messages stay off the console.
    assert all(line.startswith(("modelwatch demo:", "run: ")) for line in
               done.stderr.strip().splitlines()), done.stderr[-2000:]
