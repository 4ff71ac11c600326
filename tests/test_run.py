"""``modelwatch run`` with the embedded broker: alerts on the terminal, clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from tests.conftest import ROOT


def test_run_follows_a_log_prints_alerts_and_stops_everything(demo, tmp_path):
    folder, paths = demo
    runner = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "run", "--log", str(paths["inference.jsonl"]),
         "--profiles", str(folder / "profiles"), "--state-dir", str(tmp_path / "state")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True)
    lines, deadline = [], time.monotonic() + 90
    try:
        os.set_blocking(runner.stdout.fileno(), False)
        while time.monotonic() < deadline and sum("client" in line for line in lines) < 4:
            chunk = runner.stdout.readline()
            if chunk:
                lines.append(chunk)
            else:
                time.sleep(0.1)
        port = int(lines[0].split("127.0.0.1:")[1].split(";")[0])
        runner.send_signal(signal.SIGINT)
        runner.wait(timeout=30)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    alerts = [line for line in lines if "score" in line]
    assert len(alerts) >= 4, lines
    assert any("adversarial." in line for line in alerts) and any("extraction." in line
                                                                  for line in alerts)
    # Nothing it started is left: no process in its group, the broker's port closed.
    time.sleep(1.0)
    leftover = subprocess.run(["pgrep", "-g", str(runner.pid)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", leftover.stdout
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_demo_plays_through_the_streaming_stack():
    done = subprocess.run([sys.executable, "-m", "streams.cli", "run", "--demo"], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "broker kafka://127.0.0.1:" in done.stderr
    summary = done.stdout.split("judged;")[1]
    assert summary.count("DETECTED") == 5 and "missed" not in summary
    assert "honest clients alerted: 0 of 30" in summary
    rules = {line.split()[1].split(".")[0] for line in done.stdout.splitlines() if "score" in line}
    assert rules == {"extraction", "adversarial", "poisoning"}
