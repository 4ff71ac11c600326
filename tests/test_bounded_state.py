"""Bounded state (issue 11, item 3): caps on tracked client keys and unprofiled model
names, longest-idle eviction, and the key-minting rule; the worker against the real
broker with a small cap."""

from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import pytest

from detectors.config import ConfigError, load_thresholds
from streams.files import load_profile
from streams.pipeline import parse_snapshot_key
from streams.records import format_ts
from streams.replay import replay
from streams.worker.broker import EmbeddedBroker, free_port
from tests.conftest import T0, run_cli, write_jsonl
from tests.streaming import create_topics, read_topic, start_worker, stop, wait_for_alerts


def event(model: str, client: str, ts: float, ip: str | None = None, i: int = 0) -> dict:
    return {"ts": format_ts(ts), "model": model, "client_id": client,
            "features": [float(i % 7), 1.0, 2.0, float(i % 3)], "prediction": i % 2,
            "request_id": f"{client}-{i}", "source_ip": ip}


def replay_events(tmp_path, events, thresholds: str = "", profiles=()):
    events = sorted(events, key=lambda e: e["ts"])
    path = write_jsonl(tmp_path / "inference.jsonl", events)
    return replay(list(profiles), load_thresholds(thresholds), inference_log=path,
                  training_stats=None, deadletter=None)


def test_eviction_keeps_the_cap_and_drops_the_longest_idle(tmp_path):
    # k0..k9 arrive one a second; "busy" came second but is active last: least idle.
    events = [event("m", f"k{i}", T0 + i) for i in range(10)]
    events += [event("m", "busy", T0 + 0.5), event("m", "busy", T0 + 100, i=1)]
    result = replay_events(tmp_path, events, "[state]\nmax_clients_per_model = 5")
    pipeline = result.pipeline
    assert sorted(pipeline.clients) == ["m/busy", "m/k6", "m/k7", "m/k8", "m/k9"]
    assert pipeline.counters.evictions == {"model_cap": 6, "total_cap": 0, "model_evicted": 0}
    # The population forgets evicted clients, as a restart would rebuild it.
    assert pipeline.pending[0]["m"].volume_hist.sum() == 5


def test_the_overall_cap_evicts_across_models(tmp_path):
    events = [event("a", f"a{i}", T0 + i) for i in range(4)]
    events += [event("b", f"b{i}", T0 + 10 + i) for i in range(4)]
    result = replay_events(tmp_path, events,
                           "[state]\nmax_clients_per_model = 5\nmax_clients = 6")
    assert sorted(result.pipeline.clients) == ["a/a2", "a/a3", "b/b0", "b/b1", "b/b2", "b/b3"]
    assert result.pipeline.counters.evictions["total_cap"] == 2


def test_unprofiled_model_names_are_bounded_like_the_metric_labels(tmp_path):
    from streams.metrics import MAX_MODEL_LABELS

    events = [event(f"minted-{i}", "c", T0 + i) for i in range(MAX_MODEL_LABELS + 6)]
    pipeline = replay_events(tmp_path, events).pipeline
    models = {key.split("/", 1)[0] for key in pipeline.clients}
    assert models == {f"minted-{i}" for i in range(6, MAX_MODEL_LABELS + 6)}
    assert len(pipeline.labels) == MAX_MODEL_LABELS
    snapshots = {parsed[0] for key in pipeline.shared
                 if (parsed := parse_snapshot_key(key)) is not None}
    assert snapshots and snapshots <= models
    assert {m for merged in pipeline._merged.values() for m in merged} <= models
    assert pipeline.counters.evictions["model_evicted"] == 6


def test_caps_are_range_checked():
    with pytest.raises(ConfigError, match="state.max_clients must be at least 1"):
        load_thresholds("[state]\nmax_clients = 0")


def test_a_key_minting_source_is_alerted_and_a_nat_office_is_not(digits, tmp_path):
    rng = np.random.default_rng(4)
    pool = digits.X_pool
    events = []
    for i in range(40):  # ordinary clients, one address each
        rows = pool[rng.integers(0, len(pool), 30)]
        events += digits.events(f"user-{i}", rows, T0 + 20 * i, gap=30.0, ip=f"203.0.113.{i}")
    for i in range(30):  # an office: 30 honest users behind one NAT address
        rows = pool[rng.integers(0, len(pool), 40)]
        events += digits.events(f"office-{i}", rows, T0 + 60 * i, gap=20.0, ip="192.0.2.7")
    for i in range(150):  # a minting source: a new key every 20 s, two queries each
        rows = pool[rng.integers(0, len(pool), 2)]
        events += digits.events(f"sybil-{i}", rows, T0 + 20 * i + 5, gap=1.0,
                                ip="198.51.100.66")
    result = replay_events(tmp_path, events, profiles=[digits.profile])
    minting = [a for a in result.alerts if a.rule.name == "extraction.key_minting"]
    assert len(minting) == 1, [a.modelwatch.client_id for a in minting]  # then the cooldown
    (alert,) = minting
    assert alert.source.ip == "198.51.100.66"
    assert alert.modelwatch.evidence["new_ids_from_source"] == 51
    assert alert.modelwatch.threshold == 50
    assert not [a for a in result.alerts if a.source and a.source.ip == "192.0.2.7"]


def metric(port: int, name: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            labels, value = line[len(name):].rsplit(" ", 1)
            out[labels] = float(value)
    return out


def test_worker_under_a_key_flood_stays_at_its_cap_and_still_alerts(demo, tmp_path):
    folder, paths = demo
    cap = 60
    thresholds = tmp_path / "thresholds.toml"
    thresholds.write_text(f"[state]\nmax_clients_per_model = {cap}\nmax_clients = {cap}\n")
    honest = [json.loads(line) for line in paths["inference.jsonl"].read_text().splitlines()]
    truth = json.loads(paths["truth.json"].read_text())
    attackers = {c for c, t in truth["clients"].items() if t["kind"] == "attack"}
    # 600 minted keys, one query each, spread over the demo's half hour.
    times = sorted(e["ts"] for e in honest)
    flood = [{**honest[i % len(honest)], "client_id": f"flood-{i}", "request_id": f"flood-{i}",
              "source_ip": "198.51.100.66", "ts": times[(i * 12) % len(times)]}
             for i in range(600)]
    log = write_jsonl(tmp_path / "inference.jsonl", sorted(honest + flood, key=lambda e: e["ts"]))

    expected = replay([load_profile(paths["profile"])], load_thresholds(thresholds.read_text()),
                      inference_log=log, training_stats=None, deadletter=None)
    assert len(expected.pipeline.clients) == cap
    assert sum(expected.pipeline.counters.evictions.values()) >= 600 + 33 - cap
    alerted = {a.modelwatch.client_id for a in expected.alerts}
    assert attackers <= alerted  # eviction spares the active attackers in replay

    port = free_port()
    worker_log = tmp_path / "worker.log"
    with EmbeddedBroker() as broker:
        create_topics(broker)
        worker = start_worker(broker, folder / "profiles", tmp_path / "state", worker_log,
                              "--metrics-port", str(port), "--thresholds", str(thresholds))
        try:
            shipped = run_cli("tail", log, "--once", "--broker", broker.url,
                              "--checkpoint", tmp_path / "cp.json")
            assert shipped.returncode == 0, shipped.stderr

            def every_attacker(alerts):
                return attackers <= {a["modelwatch"]["client_id"] for a in alerts}

            def minting(alerts):  # spans partitions: it may come after the attackers' alerts
                return any(a["rule"]["name"] == "extraction.key_minting"
                           and a.get("source", {}).get("ip") == "198.51.100.66" for a in alerts)

            got = wait_for_alerts(broker, lambda alerts: every_attacker(alerts)
                                  and minting(alerts), 240)
            assert every_attacker(got), sorted({a["modelwatch"]["client_id"] for a in got})
            # Every event judged, and the evictions checkpointed as tombstones: what a
            # restart restores (the changelog's last value per key) holds the cap.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                consumed = metric(port, "modelwatch_records_consumed_total")
                stored = latest_values(broker)
                if (sum(consumed.values()) >= len(honest) + len(flood)
                        and sum(v is not None for v in stored.values()) <= cap):
                    break
                time.sleep(1)
            assert worker.poll() is None, worker_log.read_text()[-3000:]
            tracked = metric(port, "modelwatch_tracked_keys")
            evicted = metric(port, "modelwatch_state_evictions_total")
        finally:
            stop(worker)
    assert sum(consumed.values()) == len(honest) + len(flood)
    assert tracked['{kind="client"}'] == cap
    assert evicted['{reason="model_cap"}'] >= 600 + 33 - cap
    live = {k for k, v in stored.items() if v is not None}
    assert len(live) <= cap
    assert sum(v is None for v in stored.values()) > 0  # evicted keys' tombstones
    assert minting(got)


def latest_values(broker) -> dict[str, bytes | None]:
    """The last value of every key of the client table's changelog (None: a tombstone)."""
    return {r.key.decode(): r.value for r in read_topic(broker, "modelwatch-clients-changelog")}



def test_a_model_name_with_a_slash_is_restored_under_its_own_name(tmp_path):
    """A restart rebuilds a shard's population from "model/client" keys: a model named
    "team/m" must come back as itself."""
    from streams.pipeline import Pipeline

    events = [event("team/m", f"k{i}", T0 + i, ip="10.0.0.1", i=i) for i in range(6)]
    before = replay_events(tmp_path, events).pipeline
    restarted = Pipeline([], load_thresholds())
    restarted.restore_shard(0, before.clients.items())
    assert set(restarted.pending[0]) == {"team/m"}
    assert restarted.pending[0]["team/m"].volume_hist.sum() == 6
    assert set(restarted.tracked.last) == {"team/m"}
    restarted.forget_keys(list(before.clients))
    assert restarted.tracked.count == 0
