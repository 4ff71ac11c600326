"""Runs the query-side detectors (extraction, adversarial) for one client's batch.

The caller groups events by (model, client), keeps one :class:`ClientState`
per pair and one :class:`Population` per model, and calls
:meth:`QueryMonitor.update` with each batch in event-time order. Order of work
per batch: distances to the client's window, per-query flags, rate series, then
the rules; state is updated only after the batch has been judged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detectors import adversarial, extraction
from detectors.base import Candidate, Verdict, decayed_counts, select
from detectors.clients import (
    MAX_IDS_PER_IP,
    RATES,
    ClientState,
    Neighbours,
    Population,
    QueryBatch,
    neighbours,
    volume_bin,
)
from detectors.config import Thresholds
from detectors.profile import Profile


@dataclass
class ClientView:
    """What the rules of one family see of a client's batch."""

    key: str
    state: ClientState
    batch: QueryBatch
    neighbours: Neighbours
    profile: Profile | None
    population: Population
    series: dict

    def rate(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self.series[name]

    def events_at(self, index):
        """Events seen from this client once the event at ``index`` is counted."""
        if isinstance(index, np.ndarray):
            return self.state.events + index + 1
        return int(self.state.events + index + 1)

    def evidence_at(self, index: int) -> dict:
        out = {}
        if not np.isnan(self.batch.ood[index]):
            out["ood_score"] = round(float(self.batch.ood[index]), 3)
        if self.profile is not None:
            out["ood_threshold"] = round(self.profile.ood_threshold, 3)
        knn = self.neighbours.knn_mean[index]
        if not np.isnan(knn):
            out["knn_mean_distance"] = round(float(knn), 4)
        return out


class QueryMonitor:
    """Extraction and adversarial rules over per-client state."""

    def __init__(self, thresholds: Thresholds):
        self.history = thresholds.section("history")
        self.ext = thresholds.section("extraction")
        self.adv = thresholds.section("adversarial")
        self.cooldown = thresholds.section("alerts")["cooldown_s"]

    def new_state(self, n_classes: int, n_features: int) -> ClientState:
        return ClientState(n_classes=n_classes, n_features=n_features, size=self.history["size"])

    def update(self, key: str, state: ClientState, batch: QueryBatch,
               profile: Profile | None, population: Population,
               pending: Population | None = None) -> list[Verdict]:
        """Judge one client's batch against ``population`` (a snapshot taken before
        the batch's epoch); the batch's own contribution is added to ``pending``
        (the next snapshot), or to ``population`` if none is given."""
        pending = population if pending is None else pending
        nb = neighbours(state, batch, self.adv["knn_k"],
                        profile.step_unit if profile is not None else None)
        view = ClientView(key, state, batch, nb, profile, population, {})
        series = adversarial.flags(view, self.adv)
        if series:
            rows = [RATES.index(name) for name in series]
            columns = np.column_stack([a for pair in series.values() for a in
                                       (pair[0] & pair[1], pair[1])])
            before = state.rates[rows].reshape(-1)
            counts = decayed_counts(columns, before, self.history["decay"])
            for i, name in enumerate(series):
                view.series[name] = (counts[:, 2 * i], counts[:, 2 * i + 1])
            state.rates[rows] = counts[-1].reshape(-1, 2)
        candidates = adversarial.judge(view, self.adv) + extraction.judge(view, self.ext)
        candidates += self._pooled_by_ip(view, pending)
        verdicts = select(candidates, batch.ts, state.last_alert, self.cooldown)
        self._learn(view, pending)
        return verdicts

    def _pooled_by_ip(self, view: ClientView, pending: Population) -> list[Candidate]:
        """Several ids behind one IP: the snapshot's pooled counts plus this batch's.

        Counts are plain sums (added, so concurrent batches merge exactly); the
        batch's share goes to ``pending``. Bounded: MAX_IPS addresses, MAX_IDS_PER_IP ids.
        """
        if "ood" not in view.series:
            return []
        ips = [ip for ip in view.batch.source_ip if ip]
        if not ips:
            return []
        ip = ips[-1][:MAX_IP_LENGTH]
        client = view.key.split("/", 1)[-1]
        nb = view.neighbours
        per_event = np.column_stack([
            (view.batch.ood > view.profile.ood_threshold) & view.batch.has_features,
            view.batch.has_features, nb.sign_step & nb.has_nearest, nb.has_nearest,
            np.ones(len(view.batch), bool)]).astype(np.float64)
        seen = view.population.ips.get(ip, {"ids": [], "counts": [0.0] * 5})
        ids = seen["ids"] if client in seen["ids"] else [*seen["ids"], client][:MAX_IDS_PER_IP]
        # The snapshot, plus this client's own events of the epoch so far: other
        # ids' events of the epoch count from the next epoch on, in any batching.
        state = view.state
        if state.pooled_epoch != view.population.epoch:
            state.pooled_epoch, state.pooled_counts = view.population.epoch, np.zeros(5)
        counts = np.asarray(seen["counts"]) + state.pooled_counts + np.cumsum(per_event, axis=0)
        state.pooled_counts = counts[-1] - np.asarray(seen["counts"])
        batch_counts = per_event.sum(0)
        if state.ip != ip:  # an id that moves on leaves its share with the old address
            state.ip, state.ip_counts = ip, np.zeros(5)
        state.ip_counts = state.ip_counts + batch_counts
        pending.pool(state.ip, client, batch_counts)
        mask, score, kind = extraction.pooled_hits(len(ids), counts, self.ext,
                                                   2 * view.profile.sign_step_rate)

        def verdict_at(hit: int) -> Verdict:
            ood_k, ood_n, step_k, step_n, pooled = counts[hit]
            if kind[hit] == 0:
                threshold = self.ext["synthetic_min_share"]
                evidence = {"pooled_off_profile_share": round(float(ood_k / ood_n), 3)}
            else:
                threshold = self.ext["surprise"]
                evidence = {"pooled_step_queries": int(step_k), "pooled_of_recent": int(step_n)}
            return Verdict(
                detector="extraction", rule="extraction.collusion", key=view.key,
                score=float(score[hit]), threshold=float(threshold),
                events_seen=view.events_at(hit), trigger=hit, techniques=extraction.EXTRACT,
                description="several client ids behind one source IP together query like an "
                            "extraction attack",
                evidence={"ids_behind_ip": len(ids), "pooled_events": int(pooled), **evidence})

        return [Candidate("extraction", mask, verdict_at)]

    def _learn(self, view: ClientView, population: Population) -> None:
        state, batch = view.state, view.batch
        known = batch.label[batch.label >= 0]
        if len(known):
            counts = np.bincount(known, minlength=state.n_classes)
            state.class_counts += counts
            population.class_counts += counts
        if state.events:
            population.volume_hist[volume_bin(state.events)] -= 1
        state.events += len(batch)
        population.volume_hist[volume_bin(state.events)] += 1
        state.distinct += int((batch.has_features & ~view.neighbours.repeat).sum())
        if np.isnan(state.first_ts):
            state.first_ts = float(batch.ts[0])
        state.last_ts = float(batch.ts[-1])
        row = RATES.index("low_margin")
        seen = state.rates[row, 1]
        if seen >= 20:  # a client joins the margin baseline once it has a rate worth the name
            new_bin = int(round(100 * state.rates[row, 0] / seen))
            if state.margin_bin >= 0:
                population.margin_hist[state.margin_bin] -= 1
            population.margin_hist[new_bin] += 1
            state.margin_bin = new_bin


MAX_IP_LENGTH = 64  # source_ip is free text from the client: keep state bounded
