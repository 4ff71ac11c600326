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
               profile: Profile | None, population: Population) -> list[Verdict]:
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
        candidates += self._pooled_by_ip(view)
        verdicts = select(candidates, batch.ts, state.last_alert, self.cooldown)
        self._learn(view, population)
        return verdicts

    def _pooled_by_ip(self, view: ClientView) -> list[Candidate]:
        """Several ids behind one IP: pool their rate counts (bounded per IP)."""
        if "ood" not in view.series:
            return []
        ips = [ip for ip in view.batch.source_ip if ip]
        if not ips:
            return []
        ip = ips[-1]
        entry = view.population.ips.get(ip)
        if entry is None:
            if len(view.population.ips) >= MAX_IPS:
                return []
            entry = view.population.ips[ip] = {"ids": [], "counts": [0.0] * 4, "events": 0}
        client = view.key.split("/", 1)[-1]
        if client not in entry["ids"] and len(entry["ids"]) < MAX_IDS_PER_IP:
            entry["ids"].append(client)
        nb = view.neighbours
        flags = np.column_stack([
            (view.batch.ood > view.profile.ood_threshold) & view.batch.has_features,
            view.batch.has_features, nb.sign_step & nb.has_nearest, nb.has_nearest])
        counts = decayed_counts(flags, entry["counts"], self.history["decay"])[-1]
        entry["counts"] = [float(c) for c in counts]
        entry["events"] += len(view.batch)
        found = extraction.judge_pooled(entry["ids"], counts, entry["events"], self.ext,
                                        2 * view.profile.sign_step_rate)
        if found is None:
            return []
        score, threshold, evidence = found
        last = len(view.batch) - 1
        mask = np.zeros(len(view.batch), dtype=bool)
        mask[last] = True  # pooled counts are known at the batch's end
        verdict = Verdict(
            detector="extraction", rule="extraction.collusion", key=view.key,
            score=float(score), threshold=float(threshold), events_seen=view.events_at(last),
            trigger=last, techniques=extraction.EXTRACT,
            description="several client ids behind one source IP together query like an extraction attack",
            evidence={"ids_behind_ip": len(entry["ids"]), "pooled_events": entry["events"],
                      **evidence},
        )
        return [Candidate("extraction", mask, lambda _: verdict)]

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


MAX_IPS = 100_000
MAX_IDS_PER_IP = 32
