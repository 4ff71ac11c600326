"""One contract for every detector: state round-trips, fixed memory, determinism,
and per-client results that do not depend on how a stream is cut into batches."""

from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest

from detectors.clients import ClientState, Population, QueryBatch, state_bytes
from detectors.config import load_thresholds
from detectors.monitor import QueryMonitor
from detectors.poisoning import PoisoningDetector, SourceState
from detectors.state import dumps, loads, split
from streams.packed import PackedStates, pack, preset, unpack
from streams.pipeline import batch_stats
from streams.records import TrainingStatsEvent
from streams.stats import stats_event


def query_batch(digits, X):
    p = digits.profile
    proba = digits.model.predict_proba(X)
    top = -np.sort(-proba, axis=1)
    Z = p.scaled(X)
    return QueryBatch(
        ts=np.arange(len(X), dtype=float), Z=Z, has_features=np.ones(len(X), bool),
        label=np.array([p.class_index(c) for c in proba.argmax(1)]),
        margin=top[:, 0] - top[:, 1], ood=p.mahalanobis(Z),
        out_of_bounds=((X < p.lower) | (X > p.upper)).any(1), source_ip=["192.0.2.1"] * len(X))


def sliced(batch: QueryBatch, a: int, b: int) -> QueryBatch:
    return QueryBatch(ts=batch.ts[a:b], Z=batch.Z[a:b], has_features=batch.has_features[a:b],
                      label=batch.label[a:b], margin=batch.margin[a:b], ood=batch.ood[a:b],
                      out_of_bounds=batch.out_of_bounds[a:b], source_ip=batch.source_ip[a:b])


def walk(digits, n, seed=0):
    """Honest-looking start, then a crowded walk along the decision boundary between two
    rows of different classes (a decision-based attack's shape)."""
    rng = np.random.default_rng(seed)
    honest = digits.X_pool[rng.permutation(len(digits.X_pool))[:n // 2]]
    labels = digits.model.predict(digits.X_pool)
    a, b = digits.X_pool[0], digits.X_pool[np.flatnonzero(labels != labels[0])[0]]
    low, high = 0.0, 1.0  # bisect to where the answer changes
    for _ in range(20):
        mid = (low + high) / 2
        low, high = (mid, high) if digits.model.predict([a + mid * (b - a)])[0] == labels[0] else (
            low, mid)
    t = high + rng.normal(0, 0.01, size=(n - n // 2, 1))
    steps = np.clip(a + t * (b - a) + rng.normal(0, 0.05, size=(n - n // 2, 64)), 0, 16)
    return np.vstack([honest, steps])


#: Every rule's hits, not one per family per hour: the rules themselves are under test.
NO_COOLDOWN = load_thresholds("[alerts]\ncooldown_s = 0.0")


def run(digits, X, cuts, state=None, restore_at=None, codec=(dumps, loads)):
    monitor = QueryMonitor(NO_COOLDOWN)
    state = state or monitor.new_state(10, 64)
    population = Population(10)
    batch = query_batch(digits, X)
    first = {}
    bounds = [0, *cuts, len(X)]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if restore_at is not None and a == restore_at:
            state = codec[1](ClientState, codec[0](state))
        for v in monitor.update("digits/c", state, sliced(batch, a, b), digits.profile, population):
            first.setdefault(v.rule, a + v.trigger)
    return first, state


def test_query_rules_fire_on_the_attack_part(digits):
    first, _ = run(digits, walk(digits, 600), [])
    assert "adversarial.query_crowding" in first
    assert first["adversarial.query_crowding"] >= 300  # not on the honest half


@pytest.mark.parametrize("cuts", [[1, 2, 3, 50, 333, 334, 500], list(range(7, 600, 7))])
def test_batching_does_not_change_per_client_results(digits, cuts):
    X = walk(digits, 600)
    whole, state_whole = run(digits, X, [])
    parts, state_parts = run(digits, X, cuts)
    per_client = {r: t for r, t in whole.items() if r != "extraction.query_coverage"}
    assert {r: parts[r] for r in per_client} == per_client
    assert np.array_equal(state_whole.window, state_parts.window)
    assert state_whole.prada_count == state_parts.prada_count
    assert np.allclose(state_whole.rates, state_parts.rates)


def test_state_round_trip_gives_the_same_verdicts(digits):
    X = walk(digits, 600, seed=3)
    cuts = list(range(50, 600, 50))
    plain, _ = run(digits, X, cuts)
    restored, _ = run(digits, X, cuts, restore_at=300)
    assert plain == restored


def test_packed_state_gives_the_same_verdicts_and_state(digits):
    """pack/unpack (idle states in replay's memory) keep every number, as dumps/loads do."""
    X = walk(digits, 600, seed=3)
    cuts = list(range(50, 600, 50))
    plain, whole = run(digits, X, cuts)
    packed, restored = run(digits, X, cuts, restore_at=300, codec=(pack, unpack))
    assert plain == packed
    assert dumps(unpack(ClientState, pack(whole))) == dumps(whole) == dumps(restored)
    assert len(pack(whole)) < len(dumps(whole))  # noisy features deflate little: not by half
    whole.class_counts = whole.class_counts.astype(">i4")  # a dtype packed by its name
    assert dumps(unpack(ClientState, pack(whole))) == dumps(whole)


def test_packed_windows_on_the_preset_grid_and_off_it_come_back_whole():
    """A window of values the preset holds packs as their indices; one with a value it
    does not hold, or of another width, packs as floats: every bit comes back."""
    rng = np.random.default_rng(2)
    grid = np.vstack([rng.normal(size=(4, 8)), np.zeros(8), -np.zeros(8)]).astype(np.float32)

    def state(rows, width=8):
        s = ClientState(3, width, 16)
        s.window = grid[rng.integers(0, len(grid), (rows, width)), np.arange(width)]
        s.events = rows
        return s

    learned = preset([state(16) for _ in range(8)])
    on, off, wider = state(10), state(10), ClientState(3, 9, 16)
    off.window[4, 2] = 0.123
    wider.window = np.ones((3, 9), np.float32)
    for s in (on, off, wider, state(0)):
        assert dumps(unpack(ClientState, pack(s, learned), learned)) == dumps(s)
    assert len(pack(on, learned)) < len(pack(off, learned))  # 225 against 284 B


def test_population_snapshot_is_unchanged_by_later_pooling():
    population = Population(3)
    population.pool("192.0.2.1", "a", np.ones(5))
    snapshot = population.snapshot()
    before = dumps(snapshot)
    population.pool("192.0.2.1", "b", np.ones(5))
    population.pool("192.0.2.2", "c", np.ones(5))
    population.class_counts += 1
    gone = ClientState(3, 4, 8, ip="192.0.2.1")
    gone.ip_counts = np.ones(5)
    population.remove_client("a", gone)
    assert dumps(snapshot) == before
    entry = population.ips["192.0.2.1"]
    assert entry.ids == ("b",) and entry.counts == (1.0,) * 5


def test_population_entries_are_stored_as_before():
    """Per-IP entries are tuples in memory; stored, they keep the form older code wrote
    and reads ({"ids", "counts"}), and that form loads back into the same entries."""
    population = Population(3)
    population.pool("192.0.2.1", "a", np.ones(5))
    population.pool("192.0.2.1", "b", np.array([0.0, 2.0, 0.5, 1.0, 3.0]))
    blob = dumps(population)
    header = json.loads(bytes(split(blob)[0]))
    assert header["s"]["ips"] == {"192.0.2.1": {"ids": ["a", "b"], "counts": [1.0, 3.0, 1.5, 2.0, 4.0]}}
    restored = loads(Population, blob)
    assert restored.ips == population.ips and dumps(restored) == blob
    assert restored.ips["192.0.2.1"].ids == ("a", "b")


def test_adding_clients_in_bulk_is_removing_them_undone():
    """A restore adds clients in bulk; eviction takes them out one by one: every count
    returns to zero, whatever the mix (quiet clients, old states with fewer rate rows)."""
    rng = np.random.default_rng(5)
    clients = []
    for i in range(40):
        state = ClientState(3, 4, 8, ip=f"192.0.2.{i % 7}")
        state.events = int(rng.integers(0, 500))
        state.class_counts = rng.integers(0, 9, 3)
        state.rate_bins = rng.integers(-1, 101, len(state.rate_bins)).astype(np.int16)
        if i % 5 == 0:  # stored before the last rate test was added
            state.rate_bins = state.rate_bins[:-1]
        state.ip_counts = rng.integers(0, 4, 5).astype(float)
        clients.append((f"c{i}", state))
    population = Population(3)
    population.add_clients(clients)
    assert population.volume_hist.sum() == sum(s.events > 0 for _, s in clients)
    assert population.rate_hist.sum() == sum(int((s.rate_bins >= 0).sum()) for _, s in clients)
    for client, state in clients:
        population.remove_client(client, state)
    assert not population.class_counts.any() and not population.volume_hist.any()
    assert not population.rate_hist.any() and not population.ips


def test_client_memory_is_bounded_and_grows_with_use(digits):
    _, few = run(digits, walk(digits, 5), [])
    _, full = run(digits, np.vstack([walk(digits, 600, seed=s) for s in range(3)]), [300, 900])
    _, large = run(digits, np.vstack([walk(digits, 600, seed=s) for s in range(5)]),
                   list(range(100, 3000, 100)))
    assert state_bytes(full) == state_bytes(large)
    assert abs(len(dumps(full)) - len(dumps(large))) < 256  # header digits only
    assert state_bytes(few) * 10 < state_bytes(large)  # a light client holds its few queries


def test_deterministic(digits):
    X = walk(digits, 600, seed=5)
    assert run(digits, X, [100, 200])[0] == run(digits, X, [100, 200])[0]


def poisoning_run(digits, batches, restore_at=None):
    detector = PoisoningDetector(load_thresholds())
    state = detector.new_state()
    fired = []
    for i, (X, y) in enumerate(batches):
        if restore_at == i:
            state = loads(SourceState, dumps(state))
        raw = stats_event(X, y, digits.profile, dataset="d", source="s", batch_id=str(i), ts=0.0)
        event = msgspec.convert(raw, TrainingStatsEvent)
        fired += [(i, v.rule) for v in detector.update("d/s", state, batch_stats(event, digits.profile),
                                                        digits.profile)]
    return fired, state


def test_poisoning_state_round_trip_and_fixed_size(digits):
    rng = np.random.default_rng(0)
    batches = []
    for i in range(12):
        rows = rng.permutation(len(digits.X_train))[:300]
        X, y = digits.X_train[rows].copy(), digits.y_train[rows].copy()
        if i in (5, 9):
            X[:30, 0] = 16  # a corner pixel that is always 0: a backdoor trigger
        batches.append((X, y))
    plain, state = poisoning_run(digits, batches)
    restored, _ = poisoning_run(digits, batches, restore_at=6)
    assert plain == restored
    assert [i for i, _ in plain] == [5, 9]
    assert len(dumps(state)) < 64 * 1024


def test_states_stored_before_a_rate_was_added_restore_with_it():
    """A client or population snapshot from before ``axis_probe`` joined RATES gets the
    new rate's row empty: counts from zero, not joined to the baseline."""
    from detectors.clients import RATES

    old = ClientState(n_classes=3, n_features=4, size=8)
    old.rates, old.rate_bins = old.rates[:5] + 1.0, old.rate_bins[:5] + 2
    client = loads(ClientState, dumps(old))
    assert client.rates.shape == (len(RATES), 2) and client.rates[:5].min() == 1.0
    assert not client.rates[5:].any() and (client.rate_bins[5:] == -1).all()
    population = Population(3)
    population.rate_hist = population.rate_hist[:5] + 1
    restored = loads(Population, dumps(population))
    assert restored.rate_hist.shape[0] == len(RATES) and not restored.rate_hist[5:].any()


def alerts_in_steps(profile, raw_events, step, clients=None):
    """(rule, client, id) of the alerts when events reach the pipeline ``step`` at a time
    (``clients``: the pipeline's state mapping; by default replay's)."""
    import json

    from streams.pipeline import Pipeline
    from streams.records import decode_inference, event_times

    events = [decode_inference(json.dumps(e).encode())[0] for e in raw_events]
    ts = event_times([e.ts for e in events])
    pipeline = Pipeline([profile], load_thresholds(), clients=clients)
    alerts = []
    for a in range(0, len(events), step):
        alerts += pipeline.process_inference(events[a:a + step], ts[a:a + step])
    return sorted((a.rule.name, a.modelwatch.client_id, a.event.id) for a in alerts)


def test_alerts_do_not_depend_on_batch_length(digits):
    """A long attack gives one alert per family per cooldown hour, in any batching."""


    rng = np.random.default_rng(9)
    X = np.round(rng.uniform(0, 16, size=(360, 64)))
    raw = digits.events("mallory", X, gap=30.0)  # three hours
    whole = alerts_in_steps(digits.profile, raw, len(raw))
    assert whole == alerts_in_steps(digits.profile, raw, 1) == alerts_in_steps(digits.profile, raw, 7)
    assert sum(name.startswith("adversarial.") for name, _, _ in whole) == 3


def test_alerts_across_clients_do_not_depend_on_batching(digits):
    """Population baselines and IP pooling are cross-client: still batching-invariant."""


    rng = np.random.default_rng(11)
    raw = []
    for n, client in enumerate(("s1", "s2", "s3")):  # one attacker, three ids, one address
        X = np.round(rng.uniform(0, 16, size=(30, 64)))
        raw += digits.events(client, X, t0=1.79e9 + n * 7, gap=180.0, ip="198.51.100.9")
    for n in range(12):
        rows = digits.X_pool[rng.permutation(len(digits.X_pool))[:60]]
        raw += digits.events(f"honest{n}", rows, t0=1.79e9 + n * 11, gap=90.0)
    raw.sort(key=lambda e: e["ts"])
    whole = alerts_in_steps(digits.profile, raw, len(raw))
    assert whole == alerts_in_steps(digits.profile, raw, 1) == alerts_in_steps(digits.profile, raw, 7)
    assert {c for _, c, _ in whole} == {"s1", "s2", "s3"}
    # States packed after every batch, or kept as objects: the same alerts.
    assert whole == alerts_in_steps(digits.profile, raw, 7, clients={}) == alerts_in_steps(
        digits.profile, raw, 7, clients=PackedStates(hot_bytes=0))


def test_replay_restores_time_order_within_its_buffer(digits, tmp_path, monkeypatch):
    import json

    import streams.replay as replay_module
    from streams.replay import replay

    monkeypatch.setattr(replay_module, "CHUNK", 40)
    rng = np.random.default_rng(5)
    raw = []
    for n in range(4):
        raw += digits.events(f"u{n}", np.round(rng.uniform(0, 16, size=(60, 64))),
                             t0=1.79e9 + n, gap=4.0)
    raw += digits.events("honest", digits.X_pool[:100], t0=1.79e9, gap=2.5)
    raw.sort(key=lambda e: e["ts"])
    shuffled = list(raw)
    for start in range(0, len(shuffled), 10):  # local disorder, as merged log files have
        block = shuffled[start:start + 10]
        rng.shuffle(block)
        shuffled[start:start + 10] = block

    def run(records, name):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        result = replay([digits.profile], load_thresholds(), inference_log=path,
                        training_stats=None, deadletter=None)
        return sorted(a.event.id for a in result.alerts), result.late

    in_order, late = run(raw, "sorted.jsonl")
    assert in_order and late == 0
    assert run(shuffled, "shuffled.jsonl") == (in_order, 0)
    stray = raw[:5] + raw[6:200] + [raw[5]] + raw[200:]  # one event 195 places late
    assert run(stray, "stray.jsonl")[1] == 1


def test_packed_states_keep_the_latest_under_their_budget():
    states = PackedStates(hot_bytes=10_000)
    for n in range(4):
        state = ClientState(3, 64, 8)
        state.window, state.events = np.full((4, 64), n, np.float32), n  # ~5 KiB each, counted
        states[f"m/{n}"] = state
    assert len(states.live) == 4  # nothing is packed during a batch...
    states.settle()
    assert len(states.live) == 4  # ...nor what the batch wrote
    states["m/3"] = states["m/3"]
    states.settle()
    assert list(states.live) == ["m/3"] and sorted(states.packed) == ["m/0", "m/1", "m/2"]
    assert [states[f"m/{n}"].events for n in range(4)] == [0, 1, 2, 3] and len(states) == 4
    assert float(states["m/1"].window[3, 63]) == 1.0
    del states["m/1"], states["m/3"]
    assert sorted(states) == ["m/0", "m/2"] and states.live_bytes == 0
