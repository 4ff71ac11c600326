"""The detection pipeline that ``replay`` and the worker both run.

Takes decoded, validated records; keeps detector state in mappings (plain dicts
offline, tables in the worker); returns alerts. Events of one batch are grouped
by model, turned into columns once (one vectorized pass computes scaled
features, out-of-distribution scores, margins and bound checks for every event,
see :mod:`detectors.features`), then split by client and handed to the detectors
in event-time order.
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import math
from collections import Counter, defaultdict
from collections.abc import MutableMapping
from dataclasses import dataclass, field, replace

import numpy as np

from detectors.base import Verdict
from detectors.clients import ClientState, Population, QueryBatch, split_key
from detectors.config import Thresholds
from detectors.features import Z_LIMIT, Featurizer
from detectors.monitor import QueryMonitor
from detectors.poisoning import BatchStats, PoisoningDetector, SourceState
from detectors.profile import Profile
from streams.alerts import build_alert
from streams.explain import Scores
from streams.metrics import EVICTION_REASONS, MAX_MODEL_LABELS
from streams.packed import PackedStates
from streams.records import (
    Alert,
    InferenceEvent,
    Rejected,
    TrainingStatsEvent,
    check_against,
    decode_stats,
)

UNPROFILED_CLASSES = 64  # labels tracked per model that has no profile
#: Key of a dataset's own batch count among the (dataset, source) states: no source key
#: ("dataset/source") ends in a NUL.
DATASET_TOTAL = "\x00"


def snapshot_key(model: str, shard: int, epoch: float) -> str:
    """Key of a shard's population snapshot of a model for an epoch (in ``shared``)."""
    return f"{model}/{shard}@{int(epoch)}"


def shard_mark(shard: int) -> str:
    """Key of a shard's mark in ``shared``: the epoch it has entered (no "/", unlike a
    snapshot key)."""
    return f"#{shard}"


def shard_of_key(key: str) -> int:
    """The shard of a snapshot key or of a shard's mark."""
    parsed = parse_snapshot_key(key)
    return int(key[1:]) if parsed is None else parsed[1]


def parse_snapshot_key(key: str) -> tuple[str, int, int | None] | None:
    """(model, shard, epoch) of a snapshot key, None for a shard's mark. Keys stored
    before snapshots were kept per epoch ("model/shard") have epoch None: the
    snapshot's own ``epoch`` says it."""
    if "/" not in key:
        return None
    model, tail = key.rsplit("/", 1)
    shard, _, epoch = tail.partition("@")
    return model, int(shard), int(epoch) if epoch else None


@dataclass
class Counters:
    events: int = 0
    batches: int = 0
    alerts: int = 0
    suppressed: int = 0      # poisoning rules that fired on a batch beside the strongest
    unprofiled_batches: int = 0
    evictions: dict = field(default_factory=lambda: dict.fromkeys(EVICTION_REASONS, 0))


class Tracked:
    """Tracked client keys per model with the event time of their last event, to find
    the longest idle: (last time, key) is the order, so replay and a worker that see the
    same batches evict the same keys. Times are kept per model and shard, one float per
    key: a (time, shard) tuple per key cost ~100 B more. Heaps with lazy deletion: a key's
    older entries are skipped when they come up, and the heaps are rebuilt once half
    stale. A heap is built when a cap first asks for the oldest key: below the caps it
    would be an entry per client for nothing."""

    def __init__(self):
        self.last: dict[str, dict[int, dict[str, float]]] = {}  # model -> shard -> key -> time
        self.heaps: dict[str, list] = {}   # model -> [(time, key)], once asked
        self.all: list | None = None       # [(time, key, model)], once asked
        self.count = 0

    def size(self, model: str) -> int:
        return sum(map(len, self.last.get(model, {}).values()))

    def keys(self, model: str) -> list[str]:
        return [key for keys in self.last.get(model, {}).values() for key in keys]

    def _time(self, model: str, key: str) -> float | None:
        for keys in self.last.get(model, {}).values():
            if key in keys:
                return keys[key]
        return None

    def touch(self, model: str, key: str, ts: float, shard: int) -> None:
        ts = ts if ts == ts else -math.inf  # a state without events: idle the longest
        shards = self.last.setdefault(model, {})
        keys = shards.get(shard)
        if keys is None:
            keys = shards[shard] = {}
        if key not in keys:
            moved = next((other for other in shards.values() if key in other), None)
            if moved is None:
                self.count += 1
            else:  # tracked under another shard before
                del moved[key]
        keys[key] = ts
        heap = self.heaps.get(model)
        if heap is not None:
            heapq.heappush(heap, (ts, key))
            if len(heap) > 2 * self.size(model) + 64:
                self.heaps[model] = self._heap(model)
        if self.all is not None:
            heapq.heappush(self.all, (ts, key, model))
            if len(self.all) > 2 * self.count + 64:
                self.all = self._heap(None)

    def _heap(self, model: str | None) -> list:
        if model is None:
            heap = [(t, k, m) for m, shards in self.last.items()
                    for keys in shards.values() for k, t in keys.items()]
        else:
            heap = [(t, k) for keys in self.last.get(model, {}).values() for k, t in keys.items()]
        heapq.heapify(heap)
        return heap

    def oldest(self, model: str | None = None) -> tuple[str, str] | None:
        """(model, key) of the longest idle key of ``model``, or of all models."""
        if model is None:
            if self.all is None:
                self.all = self._heap(None)
            heap = self.all
        else:
            heap = self.heaps.get(model)
            if heap is None:
                heap = self.heaps[model] = self._heap(model)
        while heap:
            entry = heap[0]
            owner = entry[2] if model is None else model
            if self._time(owner, entry[1]) == entry[0]:
                return owner, entry[1]
            heapq.heappop(heap)
        return None

    def drop(self, model: str, key: str) -> int:
        """Stop tracking a key; returns its shard."""
        for shard, keys in self.last[model].items():
            if keys.pop(key, None) is not None:
                self.count -= 1
                return shard
        raise KeyError(key)

    def forget(self, key: str) -> None:
        """Stop tracking a key of whichever model, if it is tracked."""
        for model, shards in self.last.items():
            if any(key in keys for keys in shards.values()):
                self.drop(model, key)
                return

    def forget_model(self, model: str) -> None:
        self.count -= self.size(model)
        self.last.pop(model, None)
        self.heaps.pop(model, None)


@dataclass
class GatheredClients:
    """A shard's restored clients summed per model, and what a restore reads of each:
    (model, key, origin, first event time, last event time)."""
    populations: dict[str, Population]
    clients: list[tuple[str, str, str, float, float]]


def gather_clients(clients) -> GatheredClients:
    """The part of a restore that reads only the clients' states ((key, state) pairs), so
    that it can run before the shard is assigned (see :meth:`Pipeline.restore_shard`)."""
    populations: dict[str, Population] = {}
    restored, by_model = [], defaultdict(list)
    for key, state in clients:
        model, client = split_key(key, state.model)
        if model not in populations:
            populations[model] = Population(state.n_classes)
        by_model[model].append((client, state))
        restored.append((model, key, state.origin, state.first_ts, state.last_ts))
    for model, members in by_model.items():
        populations[model].add_clients(members)
    return GatheredClients(populations, restored)


class Pipeline:
    def __init__(self, profiles: list[Profile], thresholds: Thresholds,
                 clients: MutableMapping | None = None, sources: MutableMapping | None = None,
                 shared: MutableMapping | None = None, scores: Scores | None = None,
                 shards: int = 1):
        self.profiles = {p.model: p for p in profiles}
        self.dataset_profiles = {p.dataset or p.model: p for p in profiles}
        self.thresholds = thresholds
        self.query = QueryMonitor(thresholds)
        self.poisoning = PoisoningDetector(thresholds)
        self.clients: MutableMapping[str, ClientState] = PackedStates() if clients is None else clients
        self.sources: MutableMapping[str, SourceState] = {} if sources is None else sources
        # Population baselines, per shard (a Kafka partition in the worker): each shard
        # sums its own clients in ``pending``; when its events enter a new epoch it
        # publishes a snapshot to ``shared`` (a global table in the worker), then its
        # mark. Events of epoch e are judged only once every one of ``shards`` shards has
        # entered e, against the sum of each shard's snapshot of everything before e
        # (:meth:`population_at`): the same whatever order the shards ran in.
        self.n_shards = shards
        self.pending: dict[int, dict[str, Population]] = {}
        self.shard_epochs: dict[int, float] = {}  # the epoch each local shard has entered
        self.shared: MutableMapping[str, Population] = {} if shared is None else shared
        self._published: dict[tuple[str, int], list[tuple[float, str]]] = {}  # kept snapshots
        self._merged: dict[float, dict[str, Population]] = {}  # per epoch judged, the last few
        self.epoch_s = thresholds.section("population")["epoch_s"]
        self.cooldown_s = thresholds.section("alerts")["cooldown_s"]
        self.labels: dict[str, dict[str, int]] = {}   # per unprofiled model
        tolerance = thresholds.section("adversarial")["bounds_tolerance"]
        self._featurizers = {m: Featurizer(p, tolerance) for m, p in self.profiles.items()}
        self._unprofiled = Featurizer(None, tolerance)
        self.counters = Counters()
        self.scores = scores  # rule scores per key, for replay --explain and near misses
        self._shapes = {m: (p.n_features, len(p.classes)) for m, p in self.profiles.items()}
        self._unprofiled_width: dict[str, int] = {}
        # Bounded state (README, *Bounded state*): client keys per model and in all, and
        # unprofiled model names (as many as the metrics label).
        caps = thresholds.section("state")
        self.max_per_model, self.max_clients = caps["max_clients_per_model"], caps["max_clients"]
        self.tracked = Tracked()
        self._unprofiled_last: dict[str, float] = {}  # unprofiled model -> its last event time

    # --- validation --------------------------------------------------------------
    def reject_reason(self, event: InferenceEvent) -> str | None:
        shape = self._shapes.get(event.model)
        if shape is None:
            # An unprofiled model's width is fixed by the first event that has features.
            if event.features is None:
                return None
            if len(self._unprofiled_width) >= 4 * MAX_MODEL_LABELS:  # names minted faster than judged
                self._unprofiled_width = {m: w for m, w in self._unprofiled_width.items()
                                          if m in self._unprofiled_last}
            width = self._unprofiled_width.setdefault(event.model, len(event.features))
            if len(event.features) != width:
                return (f"features: expected {width} values for model {event.model} "
                        f"(as its first events had), got {len(event.features)}")
            return None
        features, probabilities = event.features, event.probabilities
        if (features is not None and len(features) != shape[0]) or (
                probabilities is not None and len(probabilities) != shape[1]):
            return check_against(event, *shape)
        return None

    # --- inference ---------------------------------------------------------------
    def process_inference(self, events: list[InferenceEvent], ts: np.ndarray,
                          shard: int = 0) -> list[Alert]:
        """Judge a batch of valid events of one shard, given in event-time order.

        Population baselines advance by event-time epochs: events of an epoch are
        judged against the population as it stood when the epoch began, so an
        alert never depends on other clients' later events, and the result does
        not depend on how the stream was cut into batches. Every event must be of
        an epoch :meth:`ready` (:meth:`judgeable` tells which are).
        """
        self.counters.events += len(events)
        alerts: list[Alert] = []
        epochs = self._epochs_of(shard, ts)
        for epoch in np.unique(epochs):
            self._advance_to(shard, float(epoch))
            in_epoch = np.flatnonzero(epochs == epoch)
            by_model: dict[str, list[int]] = {}
            for i in in_epoch:
                by_model.setdefault(events[i].model, []).append(int(i))
            for model, rows in by_model.items():
                alerts += self._model_batch(model, [events[i] for i in rows], ts[rows], shard)
        if isinstance(self.clients, PackedStates):  # a worker's table keeps its own copies
            self.clients.settle()
        return alerts

    def _epochs_of(self, shard: int, ts: np.ndarray) -> np.ndarray:
        """Each event's epoch; a late event (before the shard's epoch) counts in it."""
        epochs = np.floor(ts / self.epoch_s)
        current = self.shard_epochs.get(shard)
        return epochs if current is None else np.maximum(epochs, current)

    def judgeable(self, shard: int, ts: np.ndarray) -> tuple[np.ndarray, float | None]:
        """Which of a shard's waiting events can be judged now: those of epochs every
        shard has entered. Also the first epoch that waits (None: none does), which
        the shard enters (:meth:`enter`) once it has judged the others."""
        epochs = self._epochs_of(shard, ts)
        for epoch in np.unique(epochs):
            if not self.ready(float(epoch)):
                return epochs < epoch, float(epoch)
        return np.ones(len(ts), bool), None

    def epoch_of(self, shard: int) -> float | None:
        """The epoch a shard has entered: a local one's, else its last mark in ``shared``."""
        epoch = self.shard_epochs.get(shard)
        if epoch is not None:
            return epoch
        mark = self.shared.get(shard_mark(shard))
        return None if mark is None else mark.epoch

    def ready(self, epoch: float) -> bool:
        """Whether every shard has entered ``epoch`` (so its events can be judged)."""
        for shard in range(self.n_shards):
            entered = self.epoch_of(shard)
            if entered is None or entered < epoch:
                return False
        return True

    def latest_epoch(self) -> float | None:
        """The latest epoch any shard has entered (what an idle shard enters, see
        :meth:`enter`), or None if none has."""
        entered = [e for s in range(self.n_shards) if (e := self.epoch_of(s)) is not None]
        return max(entered, default=None)

    def enter(self, shard: int, epoch: float) -> None:
        """A shard with nothing before ``epoch`` left to judge enters it, so the shards
        that wait for it go on. A later event of an earlier epoch is judged as late."""
        self._advance_to(shard, epoch)

    def forget_shard(self, shard: int) -> None:
        """A shard given away: its population and epoch are its next owner's."""
        self.pending.pop(shard, None)
        self.shard_epochs.pop(shard, None)
        for key in [k for k in self._published if k[1] == shard]:
            del self._published[key]

    def _advance_to(self, shard: int, epoch: float) -> None:
        """A shard's new epoch: what it learned so far becomes its snapshot for it."""
        current = self.shard_epochs.get(shard)
        if current is not None and epoch <= current:
            return
        self.shard_epochs[shard] = epoch
        cooling_after = epoch * self.epoch_s - self.cooldown_s
        for model, pending in self.pending.get(shard, {}).items():
            pending.close_epoch(cooling_after)
            self._publish(model, shard, epoch, pending.snapshot())
        mark = Population(0)
        mark.epoch = epoch
        self.shared[shard_mark(shard)] = mark  # after the snapshots: readers trust it

    def _publish(self, model: str, shard: int, epoch: float, snapshot: Population) -> None:
        """Store a shard's snapshot of a model for ``epoch``, keeping its last two: a
        shard is at most one epoch ahead of the slowest reader (:meth:`population_at`)."""
        snapshot.epoch = epoch
        key = snapshot_key(model, shard, epoch)
        self.shared[key] = snapshot
        kept = self._published.setdefault((model, shard), [])
        kept.append((epoch, key))
        while len(kept) > 2:
            _, old = kept.pop(0)
            with contextlib.suppress(KeyError):
                del self.shared[old]

    def population_at(self, model: str, epoch: float) -> Population | None:
        """What rules read for events of ``epoch``: the sum over shards (in shard order)
        of each one's snapshot of everything before ``epoch``, i.e. its earliest
        snapshot from ``epoch`` on (a shard publishes one at every epoch it enters,
        and one empty when a model's first client comes to it). Computed once per
        epoch: by then every shard has entered it, so the snapshots are final."""
        merged = self._merged.get(epoch)
        if merged is None:
            merged = self._merged[epoch] = self._merge_at(epoch)
            for old in sorted(self._merged)[:-3]:
                del self._merged[old]
        return merged.get(model)

    def _merge_at(self, epoch: float) -> dict[str, Population]:
        chosen: dict[tuple[str, int], tuple[float, str]] = {}
        for key, label in self._labelled_keys():
            model, shard, _ = parse_snapshot_key(key)
            if label >= epoch and ((model, shard) not in chosen or label < chosen[model, shard][0]):
                chosen[model, shard] = (label, key)
        merged: dict[str, Population] = {}
        shards = Counter(model for model, _ in chosen)
        for (model, _), (_, key) in sorted(chosen.items()):
            snapshot = self.shared.get(key)  # only the chosen ones are decoded
            if snapshot is None:
                continue
            if model in merged:
                merged[model].merge(snapshot)
            elif shards[model] == 1:  # rules only read it: share the snapshot's per-IP dict
                merged[model] = replace(snapshot)
            else:
                merged[model] = snapshot.snapshot()
        for population in merged.values():
            population.epoch = epoch
        return merged

    def _labelled_keys(self):
        """(key, epoch) of every snapshot in ``shared``; only a key stored before
        snapshots were kept per epoch is decoded for it."""
        for key in list(self.shared):
            parsed = parse_snapshot_key(key)
            if parsed is not None:
                yield key, self.shared[key].epoch if parsed[2] is None else parsed[2]

    def restore_shard(self, shard: int, clients) -> None:
        """After a restart or rebalance: a shard's population is the sum of its clients'
        restored states (``clients`` yields (key, ClientState) pairs, or is what
        :func:`gather_clients` made of them)."""
        gathered = clients if isinstance(clients, GatheredClients) else gather_clients(clients)
        pending, restored = gathered.populations, gathered.clients
        self.pending[shard] = pending
        # The snapshots this shard published before, oldest first, and its epoch.
        published: dict[str, list[tuple[float, str]]] = defaultdict(list)
        for key, label in self._labelled_keys():
            model, key_shard, _ = parse_snapshot_key(key)
            if key_shard == shard:
                published[model].append((label, key))
        for model, kept in published.items():
            self._published[model, shard] = sorted(kept)
        self.shard_epochs.pop(shard, None)
        epochs = [kept[-1][0] for kept in published.values()]
        mark = self.shared.get(shard_mark(shard))
        if mark is not None:
            epochs.append(mark.epoch)
        if epochs:
            self.shard_epochs[shard] = max(epochs)
        # Key minting: past epochs' counts from the shard's last snapshot, this epoch's
        # from the clients that came in during it (evicted ones are gone).
        epoch = self.shard_epochs.get(shard)
        for model, population in pending.items():
            kept = self._published.get((model, shard))
            snapshot = self.shared.get(kept[-1][1]) if kept else None
            if snapshot is not None:
                population.minting_hist = snapshot.minting_hist.copy()
                population.minting = copy.deepcopy(snapshot.minting)
        for model, key, origin, first_ts, last_ts in restored:
            if origin and epoch is not None and np.floor(first_ts / self.epoch_s) == epoch:
                pending[model].new_id(origin)
            self.tracked.touch(model, key, last_ts, shard)
            if model not in self.profiles:
                self._unprofiled_last[model] = max(self._unprofiled_last.get(model, -math.inf),
                                                   last_ts)
        self._evict_unprofiled(None)
        for model in list(self.tracked.last):
            self._make_room(model, 0)

    def forget_keys(self, keys) -> None:
        """Stop tracking keys of partitions given away (their next owner tracks them)."""
        for key in keys:
            self.tracked.forget(key)

    # --- bounded state ----------------------------------------------------------------
    def _make_room(self, model: str, incoming: int = 1) -> None:
        """Evict the longest idle keys until ``incoming`` more fit under both caps."""
        while self.tracked.size(model) + incoming > self.max_per_model:
            self._evict(*self.tracked.oldest(model), "model_cap")
        while self.tracked.count + incoming > self.max_clients:
            self._evict(*self.tracked.oldest(), "total_cap")

    def _evict(self, model: str, key: str, reason: str) -> None:
        """Drop a client key: its state (a tombstone in the worker's table) and its share
        of its shard's population, as if it had never been seen."""
        shard = self.tracked.drop(model, key)
        state = self.clients.get(key)
        if state is not None:
            population = self.pending.get(shard, {}).get(model)
            if population is not None:
                population.remove_client(key[len(model) + 1:], state)
            del self.clients[key]
        self.counters.evictions[reason] += 1

    def _evict_unprofiled(self, model: str | None) -> None:
        """Keep at most MAX_MODEL_LABELS unprofiled model names: past that, the longest idle
        other than ``model`` goes with all its clients, labels and population."""
        while len(self._unprofiled_last) > MAX_MODEL_LABELS:
            _, victim = min((t, m) for m, t in self._unprofiled_last.items() if m != model)
            for key in self.tracked.keys(victim):
                self._evict(victim, key, "model_evicted")
            self.tracked.forget_model(victim)
            del self._unprofiled_last[victim]
            self.labels.pop(victim, None)
            self._unprofiled_width.pop(victim, None)
            for merged in self._merged.values():
                merged.pop(victim, None)
            for shard_pending in self.pending.values():
                shard_pending.pop(victim, None)
            for model, shard in [k for k in self._published if k[0] == victim]:
                for _, key in self._published.pop((model, shard)):
                    with contextlib.suppress(KeyError):
                        del self.shared[key]

    def _model_batch(self, model: str, events: list[InferenceEvent], ts: np.ndarray,
                     shard: int) -> list[Alert]:
        profile = self.profiles.get(model)
        if profile is None:
            self._unprofiled_last[model] = max(self._unprofiled_last.get(model, -math.inf),
                                               float(ts.max()))
            self._evict_unprofiled(model)
        columns = self._columns(model, events, ts, profile)
        n_classes = len(profile.classes) if profile else UNPROFILED_CLASSES
        shard_pending = self.pending.setdefault(shard, {})
        epoch = self.shard_epochs[shard]
        pending = shard_pending.get(model)
        if pending is None:
            pending = shard_pending[model] = Population(n_classes)
            # This shard had none of the model's clients before this epoch: say so, or
            # readers of it would take the shard's next snapshot, with this epoch in it.
            self._publish(model, shard, epoch, Population(n_classes))
        population = self.population_at(model, epoch)
        if population is None:
            population = self._merged[epoch][model] = Population(n_classes)
            population.epoch = epoch
        codes: dict[str, int] = {}
        client_code = np.fromiter((codes.setdefault(e.client_id, len(codes)) for e in events),
                                  dtype=np.int64, count=len(events))
        expected = self.query.expected(population, profile)  # one snapshot for the whole batch
        order = np.argsort(client_code, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(client_code[order]) != 0])
        bounds = np.r_[starts, len(order)]
        # Columns in client order, so each client's batch is a slice of them.
        by_client = replace(
            columns, source_ip=np.array([e.source_ip for e in events], dtype=object)).rows(order)
        alerts = []
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            rows = order[a:b]
            client = events[rows[0]].client_id
            key = f"{model}/{client}"
            state = self.clients.get(key)
            new = state is None
            if new:
                self._make_room(model)
            if state is None or state.n_features != columns.Z.shape[1]:
                # New, or an unprofiled model whose width was unknown when the client
                # started (its first events had no features): start from its width now.
                state = self.query.new_state(n_classes, columns.Z.shape[1])
            state.model = model  # states stored before they kept it learn it here
            batch = by_client.rows(slice(a, b))
            trace = [] if self.scores is not None else None
            verdicts = self.query.update(key, state, batch, profile, population, pending, trace,
                                         new=new, expected=expected)
            if trace:
                self.scores.query(model, client, trace,
                                  [events[i].request_id or str(i) for i in rows], batch.ts)
            self.counters.alerts += len(verdicts)
            for verdict in verdicts:
                e = events[rows[verdict.trigger]]
                alerts.append(build_alert(
                    verdict, trigger_ts=float(batch.ts[verdict.trigger]), request_id=e.request_id,
                    model=model, client_id=client, source_ip=e.source_ip))
            self.clients[key] = state  # write back: a table persists on assignment
            self.tracked.touch(model, key, state.last_ts, shard)
        return alerts

    def _columns(self, model, events, ts, profile: Profile | None) -> QueryBatch:
        m = len(events)
        has_features = np.fromiter((e.features is not None for e in events), dtype=bool, count=m)
        width = profile.n_features if profile else (
            self._unprofiled_width.get(model)
            or next((len(e.features) for e in events if e.features is not None), 0))
        X = None
        if has_features.all():  # screened events have their model's width: one conversion
            with contextlib.suppress(ValueError):  # ragged rows: an unprofiled width changed
                X = np.array([e.features for e in events], dtype=np.float64)
            if X is not None and X.shape != (m, width):
                X = None
        if X is None:
            X = np.full((m, width), np.nan)
            for i in np.flatnonzero(has_features):
                if len(events[i].features) == width:
                    X[i] = events[i].features
                else:  # an unprofiled model whose width changed: treat as featureless
                    has_features[i] = False
        labels = None
        if profile is None:
            seen = self.labels.setdefault(model, {})
            labels = np.fromiter((self._label_code(seen, e.prediction) for e in events),
                                 dtype=np.int64, count=m)
        featurizer = self._featurizers.get(model, self._unprofiled)
        return featurizer.columns(X, (e.prediction for e in events),
                                  [e.probabilities for e in events], has_features, ts, labels)

    @staticmethod
    def _label_code(seen: dict, prediction) -> int:
        label = str(prediction)
        code = seen.get(label)
        if code is None:
            if len(seen) >= UNPROFILED_CLASSES:
                return -1
            code = seen[label] = len(seen)
        return code

    # --- training stats ----------------------------------------------------------
    def screen_stats(self, raw: bytes) -> tuple[TrainingStatsEvent | None, float, str | None]:
        """Decode and check one training-stats record: (event, time, None) or (None, nan, reason)."""
        record, ts = decode_stats(raw)
        if isinstance(record, Rejected):
            return None, ts, record.reason
        reason = self.stats_reject_reason(record)
        return (None, ts, reason) if reason is not None else (record, ts, None)

    def stats_reject_reason(self, event: TrainingStatsEvent) -> str | None:
        """Why a training-stats event cannot be judged against its profile, or None."""
        profile = self.dataset_profiles.get(event.dataset)
        if profile is None:
            return None
        index = {name: j for j, name in enumerate(profile.feature_names)}

        def absurd(name, value):
            j = index.get(name)
            if value is None or j is None:
                return False
            return not math.isfinite(value) or abs(value - profile.mean[j]) > Z_LIMIT * profile.scale[j]

        for name, f in event.features.items():
            for field_name in ("mean", "std", "min", "max"):
                if absurd(name, getattr(f, field_name)):
                    return f"features.{name}.{field_name}: {getattr(f, field_name)!r} is not a plausible value"
        for label, moments in (event.by_label or {}).items():
            for name, m in moments.items():
                for field_name in ("mean", "std"):
                    if absurd(name, getattr(m, field_name)):
                        return (f"by_label.{label}.{name}.{field_name}: "
                                f"{getattr(m, field_name)!r} is not a plausible value")
        return None

    def process_stats(self, event: TrainingStatsEvent, ts: float) -> list[Alert]:
        self.counters.batches += 1
        profile = self.dataset_profiles.get(event.dataset)
        if profile is None:
            self.counters.unprofiled_batches += 1
            return []
        key = f"{event.dataset}/{event.source}"
        state = self.sources.get(key)
        if state is None:
            state = self.poisoning.new_state()
        # The contract's events_seen: batches of the dataset (all sources), this one counted.
        total_key = event.dataset + DATASET_TOTAL
        total = self.sources.get(total_key) or self.poisoning.new_state()
        total.batches += 1
        self.sources[total_key] = total
        trace = {} if self.scores is not None else None
        verdicts = self.poisoning.update(key, state, batch_stats(event, profile), profile,
                                         dataset_batches=total.batches, trace=trace)
        if trace is not None:
            self.scores.batch(event.dataset, event.source, event.batch_id, trace, ts)
        alerts = [
            build_alert(v, trigger_ts=ts, dataset=event.dataset, batch_id=event.batch_id,
                        source=event.source)
            for v in self._admit_batch(verdicts, state, ts)
        ]
        self.sources[key] = state
        return alerts

    def _admit_batch(self, verdicts, state: SourceState, ts: float) -> list[Verdict]:
        # Every poisoned batch deserves its alert: one per batch, the strongest rule.
        if not verdicts:
            return []
        self.counters.alerts += 1
        self.counters.suppressed += len(verdicts) - 1
        best = max(verdicts, key=lambda v: v.score / v.threshold if v.threshold else v.score)
        others = [v.rule for v in verdicts if v is not best]
        if others:
            best.evidence["also"] = ",".join(others)
        state.last_alert["poisoning"] = ts
        return [best]


def batch_stats(event: TrainingStatsEvent, profile: Profile) -> BatchStats:
    """Align a training-stats event with a profile's features and classes."""
    d = profile.n_features
    count = np.zeros(d)
    beyond = np.zeros((2, d))  # below, above; both in the second row where not told apart
    sided = True
    far = np.full(d, np.nan)
    hist: list | None = []
    for j, name in enumerate(profile.feature_names):
        f = event.features.get(name)
        if f is None:
            hist = None
            continue
        count[j] = f.count
        h = f.hist
        edges_match = (h is not None and len(h.edges) == len(profile.edges[j])
                       and np.allclose(h.edges, profile.edges[j], rtol=1e-9, atol=1e-12)
                       and len(h.counts) == len(h.edges) - 1)
        if f.far is not None:
            far[j] = f.far
        if f.below is not None and f.above is not None:
            beyond[:, j] = f.below, f.above
        elif edges_match:
            beyond[1, j], sided = max(0, f.count - sum(h.counts)), False
        elif f.min is not None and f.max is not None:
            beyond[:, j] = float(f.min < profile.lower[j]), float(f.max > profile.upper[j])
        if hist is not None:
            if edges_match:
                hist.append(np.asarray(h.counts, dtype=np.float64))
            else:
                hist = None
    k = len(profile.classes)
    labels = np.zeros(k)
    for label, n in event.labels.items():
        i = profile.class_index(label)
        if i >= 0:
            labels[i] = n
    class_n = np.zeros(k)
    class_mean = np.full((k, d), np.nan)
    class_std = np.full((k, d), np.nan)
    for label, moments in (event.by_label or {}).items():
        i = profile.class_index(label)
        if i < 0:
            continue
        for j, name in enumerate(profile.feature_names):
            m = moments.get(name)
            if m is not None and m.mean is not None:
                class_mean[i, j] = m.mean
                class_std[i, j] = m.std if m.std is not None else np.nan
                class_n[i] = max(class_n[i], m.count)

    def class_matrix(per_label) -> np.ndarray | None:
        if per_label is None:
            return None
        out = np.zeros((k, k))
        for label, assigned in per_label.items():
            i = profile.class_index(label)
            for name, n in assigned.items():
                j = profile.class_index(name)
                if i >= 0 and j >= 0:
                    out[i, j] = n
        return out

    return BatchStats(n=event.n, count=count, hist=hist, beyond=beyond, far=far, sided=sided,
                      label_counts=labels,
                      class_n=class_n, class_mean=class_mean, class_std=class_std,
                      duplicates=event.duplicates,
                      reference_classes=class_matrix(event.reference_classes),
                      linear_classes=class_matrix(event.linear_classes))
