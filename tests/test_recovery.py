"""Kill -9 and rebalance against the real embedded broker: nothing lost, nothing counted twice."""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter

import pytest

from detectors.clients import ClientState
from detectors.poisoning import SourceState
from streams.records import partition_of
from streams.worker.broker import EmbeddedBroker
from streams.worker.tables import _APPLIED
from tests.conftest import run_cli
from tests.streaming import (
    PARTITIONS,
    create_topics,
    kill9,
    latest_states,
    read_topic,
    send_stats,
    start_worker,
    state_differences,
    stop,
    wait_for_alerts,
)

pytestmark = pytest.mark.integration




def ship(broker, lines: list[bytes], log, checkpoint) -> None:
    with open(log, "ab") as out:
        out.write(b"".join(line + b"\n" for line in lines))
    shipped = run_cli("tail", log, "--once", "--broker", broker.url, "--checkpoint", checkpoint)
    assert shipped.returncode == 0, shipped.stderr


def state_mismatch(broker, pipeline) -> str | None:
    """How the worker's stored state differs from replay's uninterrupted run, or None."""
    for table, cls, reference in (("clients", ClientState, pipeline.clients),
                                  ("sources", SourceState, pipeline.sources)):
        stored = latest_states(broker, table, cls)
        if set(stored) != set(reference):
            missing = sorted(set(reference) - set(stored))
            # Which partitions they hash to, and how far each changelog partition goes:
            # enough to tell a write never made from a read that stopped short.
            where = {k: partition_of(k.rsplit("/", 1)[-1], PARTITIONS) for k in missing[:5]}
            ends = Counter(r.partition for r in read_topic(broker, f"modelwatch-{table}-changelog"))
            return (f"{table}: {len(missing)} keys missing, {len(set(stored) - set(reference))} "
                    f"extra; missing (partition): {where}; changelog records per partition: "
                    f"{dict(sorted(ends.items()))}")
        differing = {k: d for k in stored if (d := state_differences(stored[k], reference[k]))}
        if differing:
            counts = {k: (getattr(stored[k], "events", None), getattr(reference[k], "events", None))
                      for k in differing}
            # The (partition, offset) each stored state says it applied last, against
            # each input partition's end: a stale state loaded, or judging stopped short.
            applied = {r.key.decode(): _APPLIED.unpack_from(r.value) for r
                       in read_topic(broker, f"modelwatch-{table}-changelog") if r.value}
            topic = "inference-logs" if table == "clients" else "training-stats"
            ends = Counter(r.partition for r in read_topic(broker, topic))
            return (f"{table}: {len(differing)} keys differ, e.g. {next(iter(differing.items()))};"
                    f" events stored/expected: {counts}; applied (partition, offset): "
                    f"{ {k: applied.get(k) for k in differing} }; input records per partition: "
                    f"{dict(sorted(ends.items()))}")
    return None


def wait_for_state(broker, pipeline, timeout_s: float = 300.0) -> str | None:
    """Poll the changelogs until the stored state equals replay's (None) or time runs out."""
    deadline = time.monotonic() + timeout_s
    while (mismatch := state_mismatch(broker, pipeline)) and time.monotonic() < deadline:
        time.sleep(1)
    return mismatch


def stacks_to_log(worker) -> None:
    """Have a live worker print every task's and thread's stack to its log (SIGUSR1)."""
    if worker.poll() is None:
        os.kill(worker.pid, signal.SIGUSR1)
        time.sleep(2)


def assert_alerts_once_each(alerts: list[dict], expected_ids: set[str]) -> None:
    assert {a["event"]["id"] for a in alerts} == expected_ids
    by_id: dict[str, dict] = {}
    for alert in alerts:  # a repeat after a restart is the same alert, made again
        alert["event"].pop("created")
        assert by_id.setdefault(alert["event"]["id"], alert) == alert


@pytest.mark.parametrize("disk", ["kept", "lost"])
def test_kill_9_mid_stream_loses_nothing_and_state_is_exact(demo, expected, tmp_path, disk):
    """Restarted on the same disk (RocksDB plus the changelog's tail), or on a new one
    (the whole changelog: where an early stop lost updates)."""
    folder, paths = demo
    expected_ids = {a.event.id for a in expected.alerts}
    lines = paths["inference.jsonl"].read_bytes().splitlines()
    log, checkpoint, state = tmp_path / "inference.jsonl", tmp_path / "tail.json", tmp_path / "state"
    with EmbeddedBroker() as broker:
        create_topics(broker)
        ship(broker, lines[: len(lines) // 2], log, checkpoint)
        send_stats(broker, paths["stats"])
        worker = start_worker(broker, folder / "profiles", state, tmp_path / "worker.log")
        try:
            first = wait_for_alerts(broker, lambda alerts: len(alerts) >= 1, timeout_s=60)
            assert first, (tmp_path / "worker.log").read_text()[-3000:]
            kill9(worker)  # mid-stream: the second half is not even shipped yet
            ship(broker, lines[len(lines) // 2:], log, checkpoint)
            if disk == "lost":
                state = tmp_path / "new-state"
            worker = start_worker(broker, folder / "profiles", state, tmp_path / "worker.log")
            mismatch = wait_for_state(broker, expected.pipeline)
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            if mismatch:
                stacks_to_log(worker)
        finally:
            stop(worker)
        assert mismatch is None, mismatch
        assert_alerts_once_each(wait_for_alerts(broker, lambda _: True), expected_ids)


def assigned_partitions(log) -> list[list[int]]:
    """The inference partitions a worker was given, at each rebalance (from its log)."""
    found = re.findall(r"inference-logs partitions \[([\d, ]*)\]", log.read_text(errors="replace"))
    return [[int(p) for p in text.split(",") if p.strip()] for text in found]


def test_two_workers_split_partitions_and_survive_one_leaving(demo, expected, tmp_path):
    folder, paths = demo
    expected_ids = {a.event.id for a in expected.alerts}
    lines = paths["inference.jsonl"].read_bytes().splitlines()
    log, checkpoint = tmp_path / "inference.jsonl", tmp_path / "tail.json"
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    with EmbeddedBroker() as broker:
        create_topics(broker)
        workers = [start_worker(broker, folder / "profiles", tmp_path / f"state-{i}", logs[i])
                   for i in range(2)]
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(
                    (a := assigned_partitions(x)) and 0 < len(a[-1]) < 8 for x in logs):
                time.sleep(0.5)
            split = [assigned_partitions(x)[-1] for x in logs]
            assert sorted(split[0] + split[1]) == list(range(8)), split
            ship(broker, lines[: len(lines) // 2], log, checkpoint)
            send_stats(broker, paths["stats"])
            wait_for_alerts(broker, lambda alerts: len(alerts) >= 1, timeout_s=60)
            stop(workers[1])  # leaves the group: its partitions move to the other worker
            ship(broker, lines[len(lines) // 2:], log, checkpoint)
            mismatch = wait_for_state(broker, expected.pipeline)
            assert workers[0].poll() is None, logs[0].read_text()[-3000:]
            if mismatch:
                stacks_to_log(workers[0])
            assert assigned_partitions(logs[0])[-1] == list(range(8))
        finally:
            for worker in workers:
                stop(worker)
        assert mismatch is None, mismatch
        alerts = wait_for_alerts(broker, lambda _: True)
        assert_alerts_once_each(alerts, expected_ids)
        per_attacker = {}
        for alert in alerts:
            per_attacker.setdefault(alert["modelwatch"]["client_id"], set()).add(alert["event"]["id"])
        for alert in expected.alerts:  # once per attacker: the same alerts, not more
            assert alert.event.id in per_attacker[alert.modelwatch.client_id]
