"""The broker goes away (issue 11, item 4), against the real broker.

A durable broker (Tansu on S3 storage: this build has no PostgreSQL engine) is
stopped for 30 s mid-stream and started again: the worker and tail ride it out,
every event is judged once and the alerts are replay's. A memory broker that
restarts has lost every topic: a worker whose state folder is ahead of it says
so in one line and starts clean, instead of crash-looping on Faust's
ConsistencyError (or reusing state that marks the new broker's records as
already judged).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streams.broker import EmbeddedBroker, free_port
from tests.conftest import ROOT, need
from tests.streaming import (
    S3Store,
    create_topics,
    send_stats,
    start_worker,
    stop,
    terminate,
    wait_for_alerts,
)
from tests.test_recovery import assert_alerts_once_each, ship, wait_for_state

pytestmark = pytest.mark.integration

STARTING_CLEAN = "starting clean from the broker's changelogs"


ASSIGNED = "inference-logs partitions ["


def wait_for_text(log, text: str, count: int = 1, timeout_s: float = 120.0) -> None:
    """Until ``text`` appears ``count`` times in ``log``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and \
            log.read_text(errors="replace").count(text) < count:
        time.sleep(0.5)


def wait_for_checkpoint(state, timeout_s: float = 120.0) -> None:
    """Until the worker has table databases on disk (its first checkpoint)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not list(state.glob("v1/tables/clients-*.db")):
        time.sleep(0.5)


def test_worker_ahead_of_a_fresh_memory_broker_starts_clean(demo, expected, tmp_path):
    folder, paths = demo
    lines = paths["inference.jsonl"].read_bytes().splitlines()
    state, worker_log = tmp_path / "state", tmp_path / "worker.log"
    with EmbeddedBroker() as broker:
        create_topics(broker)
        ship(broker, lines[: len(lines) // 2], tmp_path / "first.jsonl", tmp_path / "first.json")
        send_stats(broker, paths["stats"])
        worker = start_worker(broker, folder / "profiles", state, worker_log)
        try:
            assert wait_for_alerts(broker, lambda alerts: len(alerts) >= 1, timeout_s=120), \
                worker_log.read_text()[-3000:]
            wait_for_checkpoint(state)
        finally:
            stop(worker)
    assert list(state.glob("v1/tables/clients-*.db")), "no state on disk to be ahead with"
    # A new memory broker: no topics, no changelogs, no committed offsets. The whole log
    # again, so what the worker should make of it is replay's uninterrupted run.
    with EmbeddedBroker() as broker:
        create_topics(broker)
        ship(broker, lines, tmp_path / "second.jsonl", tmp_path / "second.json")
        send_stats(broker, paths["stats"])
        worker = start_worker(broker, folder / "profiles", state, worker_log)
        try:
            # Reading a changelog before the worker created it would create it, with the
            # broker's 4 partitions instead of 8: wait for the worker's partitions first.
            wait_for_text(worker_log, ASSIGNED, count=2)
            mismatch = wait_for_state(broker, expected.pipeline)
            assert worker.poll() is None, worker_log.read_text()[-3000:]
        finally:
            stop(worker)
        said = worker_log.read_text(errors="replace")
        assert "Traceback" not in said and "ConsistencyError" not in said, said[-3000:]
        told = [line for line in said.splitlines() if STARTING_CLEAN in line]
        assert len(told) == 1, said[-3000:]
        assert str(state) in told[0] and "modelwatch-" in told[0], told[0]
        assert mismatch is None, mismatch
        assert_alerts_once_each(wait_for_alerts(broker, lambda _: True),
                                {a.event.id for a in expected.alerts})


OUTAGE_S = 30.0


def test_a_durable_broker_stopped_30_s_mid_stream_loses_nothing(demo, expected, tmp_path):
    server = need(shutil.which("moto_server") and Path(shutil.which("moto_server")),
                  "moto_server (pip install 'moto[server]')")
    folder, paths = demo
    lines = paths["inference.jsonl"].read_bytes().splitlines()
    thirds = [lines[: len(lines) // 3], lines[len(lines) // 3: 2 * len(lines) // 3],
              lines[2 * len(lines) // 3:]]
    log, worker_log, tail_log = (tmp_path / n for n in ("inference.jsonl", "worker.log",
                                                        "tail.log"))
    log.write_bytes(b"")

    def append(part: list[bytes]) -> None:
        with open(log, "ab") as out:
            out.write(b"".join(line + b"\n" for line in part))

    with S3Store(str(server), tmp_path / "s3.log") as store:
        broker = EmbeddedBroker(free_port(), storage=store.storage, environ=store.environ)
        broker.start()
        worker = tail = None
        try:
            create_topics(broker)
            send_stats(broker, paths["stats"])
            with open(tail_log, "ab") as out:  # follows the log, as in production
                tail = subprocess.Popen(
                    [sys.executable, "-m", "streams.cli", "tail", str(log), "--broker",
                     broker.url, "--checkpoint", str(tmp_path / "tail.json")], cwd=ROOT,
                    stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
            worker = start_worker(broker, folder / "profiles", tmp_path / "state", worker_log)
            append(thirds[0])
            assert wait_for_alerts(broker, lambda alerts: len(alerts) >= 1, timeout_s=180), \
                worker_log.read_text()[-3000:]
            append(thirds[1])
            broker.stop()  # while tail ships the second third and the worker judges it
            append(thirds[2])
            time.sleep(OUTAGE_S)
            broker.start()  # same port, same storage
            mismatch = wait_for_state(broker, expected.pipeline, timeout_s=600)
            assert worker.poll() is None, worker_log.read_text()[-3000:]
            assert tail.poll() is None, tail_log.read_text()[-3000:]
            alerts = wait_for_alerts(broker, lambda _: True)
        finally:
            if worker is not None:
                stop(worker)
            if tail is not None:
                terminate(tail)
            broker.stop()
    assert mismatch is None, mismatch
    assert_alerts_once_each(alerts, {a.event.id for a in expected.alerts})
