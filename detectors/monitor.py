"""Runs the query-side detectors (extraction, adversarial) for one client's batch.

The caller groups events by (model, client), keeps one :class:`ClientState`
per pair and one :class:`Population` per model, and calls
:meth:`QueryMonitor.update` with each batch in event-time order. Order of work
per batch: distances to the client's window, per-query flags, rate series, then
the rules; state is updated only after the batch has been judged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from detectors import adversarial, extraction
from detectors.base import Candidate, Verdict, decayed_counts, select
from detectors.clients import (
    MAX_IDS_PER_IP,
    RATE_BINS,
    RATE_MIN_ELIGIBLE,
    RATES,
    UNSEEN_IP,
    ClientState,
    Neighbours,
    Population,
    QueryBatch,
    neighbours,
    split_key,
    volume_bin,
)
from detectors.config import Thresholds
from detectors.features import own_calibrated_ood
from detectors.profile import Profile
from detectors.rules import RULES


@dataclass
class ClientView:
    """What the rules of one family see of a client's batch."""

    key: str
    state: ClientState
    batch: QueryBatch
    neighbours: Neighbours
    profile: Profile | None
    population: Population
    own_ood: np.ndarray | None = None
    flags: dict | None = None        # rate -> (flagged, eligible) per event
    columns: np.ndarray | None = None  # (events, rates in RATES order, 2): flagged & eligible, eligible
    counts: np.ndarray | None = None   # the same, decayed counts (the rate series)
    rate_names: dict | None = None     # rate -> its place in columns and counts
    expected: dict | None = None     # rate -> the share an honest client flags (expected_rate)

    def rate(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(flagged, eligible) decayed counts of one rate, per event."""
        i = self.rate_names[name]
        return self.counts[:, i, 0], self.counts[:, i, 1]

    def rates(self, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(flagged, eligible) decayed counts of several rates: (events, len(names)) each."""
        index = [self.rate_names[name] for name in names]
        return self.counts[:, index, 0], self.counts[:, index, 1]

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


def expected_rate(population: Population, rate: str, cfg, floor: float,
                  minimum: float | None = None) -> float:
    """The share of queries an honest client flags for ``rate``, calibrated from production.

    Until ``min_clients`` of the model's clients have a rate worth the name it is
    ``floor`` (the profile's calibrated value, or a configured one); from then on
    ``factor`` times the ``quantile`` of their per-client rates, never below
    ``minimum`` (default ``floor``). A shift that all honest traffic shares moves
    the baseline; attackers move it only once they are more than ``1 - quantile``
    of the clients (README, *Calibration*).

    >>> from detectors.config import load_thresholds
    >>> cfg = load_thresholds().section("population")
    >>> pop = Population(2)
    >>> expected_rate(pop, "ood", cfg, 0.01)
    0.01
    >>> pop.rate_hist[RATES.index("ood"), 5] = 100      # every client flags 5 %
    >>> expected_rate(pop, "ood", cfg, 0.01)
    0.1
    """
    baseline = population.baseline(rate, cfg["quantile"], cfg["min_clients"])
    if baseline is None:
        return floor
    lowest = floor if minimum is None else minimum
    return min(cfg["max_expected"], max(lowest, cfg["factor"] * baseline))


class QueryMonitor:
    """Extraction and adversarial rules over per-client state."""

    def __init__(self, thresholds: Thresholds):
        self.history = thresholds.section("history")
        self.ext = thresholds.section("extraction")
        self.adv = thresholds.section("adversarial")
        self.cooldown = thresholds.section("alerts")["cooldown_s"]
        self.calibration = thresholds.section("population")

    def new_state(self, n_classes: int, n_features: int) -> ClientState:
        return ClientState(n_classes=n_classes, n_features=n_features, size=self.history["size"])

    def update(self, key: str, state: ClientState, batch: QueryBatch,
               profile: Profile | None, population: Population,
               pending: Population | None = None, trace: list | None = None,
               new: bool = False, expected: dict | None = None) -> list[Verdict]:
        """Judge one client's batch against ``population`` (a snapshot taken before
        the batch's epoch); the batch's own contribution is added to ``pending``
        (the next snapshot), or to ``population`` if none is given. ``trace``, if
        given, receives each rule's candidate (its score per event and threshold).
        ``new``: the client id is new to the model (or was evicted), so its source
        brought one more id (``extraction.key_minting``). ``expected``: :meth:`expected` of
        this population and profile, when the caller judges many clients against them."""
        pending = population if pending is None else pending
        if profile is not None:
            nb = neighbours(state, batch, self.adv["knn_k"], profile.step_unit,
                            near=NEAR_REPEAT * profile.knn_quantiles["0.01"],
                            precision=profile.step_scaled)
            own = own_calibrated_ood(state, batch, profile)
        else:
            nb, own = neighbours(state, batch, self.adv["knn_k"]), None
        view = ClientView(key, state, batch, nb, profile, population, own)
        series = view.flags = adversarial.flags(view, self.adv)
        view.expected = expected or self.expected(population, profile)
        if series:
            names, rows, view.rate_names = _rate_rows(tuple(series))
            m = len(batch)
            flagged = np.array([series[name][0] for name in names])
            eligible = np.array([series[name][1] for name in names])
            # Per event and rate: flagged-and-eligible, eligible; filled in place (column_stack
            # of 14 short arrays cost more than the counting).
            view.columns = columns = np.empty((m, len(names), 2))
            np.logical_and(flagged, eligible, out=columns[:, :, 0].T)
            columns[:, :, 1] = eligible.T
            view.counts = counts = decayed_counts(
                columns.reshape(m, -1), state.rates[rows].reshape(-1),
                self.history["decay"]).reshape(m, len(names), 2)
            state.rates[rows] = counts[-1]
        candidates = adversarial.judge(view, self.adv) + extraction.judge(view, self.ext)
        candidates += self._pooled_by_ip(view, pending)
        if new:
            candidates += self._key_minting(view, pending)
        if trace is not None:
            trace.extend(c for c in candidates if c.score is not None)
        verdicts = select(candidates, batch.ts, state.last_alert, self.cooldown)
        self._learn(view, pending)
        return verdicts

    def expected(self, population: Population, profile: Profile | None) -> dict[str, float]:
        """Expected honest share per rate: the profile's (or configured) floor, then production's."""
        adv, cal = self.adv, self.calibration
        floors = {"low_margin": (adv["low_margin_floor"], adv["low_margin_min"])}
        if profile is not None:
            floors |= {
                "crowded": (adv["crowding_p0"], None),
                "ood": (max(adv["ood_p0"], profile.ood_rate), None),
                "bounds": (max(adv["bounds_p0"], profile.bounds_rate), None),
                "sign_step": (max(self.ext["step_p0"], 2 * profile.sign_step_rate), None),
                "axis_probe": (adv["probe_p0"], None),
                "line_step": (adv["line_p0"], None),
            }
        return {rate: expected_rate(population, rate, cal, floor, minimum)
                for rate, (floor, minimum) in floors.items()}

    def _pooled_by_ip(self, view: ClientView, pending: Population) -> list[Candidate]:
        """Several ids behind one IP: the snapshot's pooled counts plus this batch's.

        Counts are plain sums (added, so concurrent batches merge exactly); the
        batch's share goes to ``pending``. Bounded: MAX_IPS addresses, MAX_IDS_PER_IP ids.
        """
        if "ood" not in (view.rate_names or ()):
            return []
        ip = next((ip for ip in reversed(view.batch.source_ip) if ip), None)  # the latest
        if ip is None:
            return []
        ip = ip[:MAX_IP_LENGTH]
        client = split_key(view.key, view.state.model)[1]
        # Off-profile, with features, steps, with a nearest query (the rate columns), events.
        m = len(view.batch)
        per_event = np.empty((m, 5))
        per_event[:, :4] = view.columns[:, [view.rate_names["ood"], view.rate_names["sign_step"]]].reshape(m, 4)
        per_event[:, 4] = 1.0
        seen = view.population.ips.get(ip, UNSEEN_IP)
        ids = seen.ids if client in seen.ids else (*seen.ids, client)[:MAX_IDS_PER_IP]
        # The snapshot, plus this client's own events of the epoch so far: other
        # ids' events of the epoch count from the next epoch on, in any batching.
        state = view.state
        if state.pooled_epoch != view.population.epoch:
            state.pooled_epoch, state.pooled_counts = view.population.epoch, np.zeros(5)
        before = np.asarray(seen.counts)
        running = np.cumsum(per_event, axis=0)
        counts = before + state.pooled_counts + running
        state.pooled_counts = counts[-1] - before
        batch_counts = running[-1]  # sums of ones and zeros: exact in any order
        if state.ip != ip:  # an id that moves on leaves its share with the old address
            state.ip, state.ip_counts = ip, np.zeros(5)
        state.ip_counts = state.ip_counts + batch_counts
        pending.pool(state.ip, client, batch_counts)
        mask, score, kind = extraction.pooled_hits(len(ids), counts, self.ext, view.expected)

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
                events_seen=view.events_at(hit), trigger=hit,
                techniques=RULES["extraction.collusion"].techniques,
                description="several client ids behind one source IP together query like an "
                            "extraction attack",
                evidence={"ids_behind_ip": len(ids), "pooled_events": int(pooled), **evidence})

        return [Candidate("extraction", mask, verdict_at, "extraction.collusion", score,
                          np.where(kind == 0, self.ext["synthetic_min_share"], self.ext["surprise"]))]

    def _key_minting(self, view: ClientView, pending: Population) -> list[Candidate]:
        """One source IP bringing new client ids into a model faster than honest sources
        do: ``extraction.key_minting``, on the id that crossed the threshold.

        Sybil extraction spreads queries over many minted keys, each too short for the
        per-client rules. Counted per event-time epoch in the shard's own population
        (``pending``); the threshold calibrates from past epochs' counts of every
        source (``population``). One alert per source per cooldown.
        """
        ip = next((ip for ip in view.batch.source_ip if ip), None)
        if ip is None:
            return []  # a client id's own prefix is the attacker's choice: no source without an IP
        ip = view.state.origin = ip[:MAX_IP_LENGTH]
        entry = pending.new_id(ip)
        if entry is None:
            return []
        count, last = entry
        ext, cal = self.ext, self.calibration
        threshold = view.population.minting_expected(
            ext["minting_quantile"], cal["factor"], ext["minting_min_ids"], cal["min_clients"])
        ts = float(view.batch.ts[0])
        score = np.zeros(len(view.batch))
        score[0] = count
        mask = np.zeros(len(view.batch), bool)
        mask[0] = count > threshold and (last is None or ts >= last + self.cooldown)
        if mask[0]:
            entry[1] = ts

        def verdict_at(hit: int) -> Verdict:
            return Verdict(
                detector="extraction", rule="extraction.key_minting", key=view.key,
                score=float(count), threshold=float(threshold), events_seen=view.events_at(hit),
                trigger=hit, techniques=RULES["extraction.key_minting"].techniques,
                description="one source IP brings new client ids into the model faster than "
                            "honest sources do: keys minted for a distributed (sybil) extraction",
                evidence={"new_ids_from_source": int(count), "source_ip": ip})

        return [Candidate("extraction", mask, verdict_at, "extraction.key_minting", score,
                          float(threshold))]

    def _learn(self, view: ClientView, population: Population) -> None:
        state, batch = view.state, view.batch
        labels = batch.label
        known = labels[labels >= 0]
        if len(known):
            counts = np.bincount(known, minlength=state.n_classes)
            state.class_counts += counts
            population.class_counts += counts
        before = volume_bin(state.events) if state.events else None
        state.events += len(batch)
        after = volume_bin(state.events)
        if after != before:  # log2 bins: most batches leave a client in its bin
            if before is not None:
                population.volume_hist[before] -= 1
            population.volume_hist[after] += 1
        state.distinct += int(np.count_nonzero(batch.has_features & ~view.neighbours.repeat))
        if math.isnan(state.first_ts):
            state.first_ts = float(batch.ts[0])
        state.last_ts = float(batch.ts[-1])
        # A client joins each rate's baseline once it has a rate worth the name, and
        # leaves it for good once it was alerted on: suspects do not calibrate honesty.
        seen = state.rates[:, 1]
        rows = (seen >= RATE_MIN_ELIGIBLE).nonzero()[0]
        if state.last_alert:
            joined = (state.rate_bins >= 0).nonzero()[0]
            population.rate_hist[joined, state.rate_bins[joined]] -= 1
            state.rate_bins[joined] = -1
            rows = rows[:0]
        if len(rows):
            new_bins = np.rint((RATE_BINS - 1) * state.rates[rows, 0] / seen[rows]).astype(np.int16)
            old = state.rate_bins[rows]
            moving = new_bins != old  # whole percents: most batches leave the bins as they were
            if moving.any():
                rows, old, new_bins = rows[moving], old[moving], new_bins[moving]
                moved = old >= 0
                population.rate_hist[rows[moved], old[moved]] -= 1
                population.rate_hist[rows, new_bins] += 1
                state.rate_bins[rows] = new_bins


def _rate_rows(names: tuple[str, ...]) -> tuple[list[str], slice | list[int], dict]:
    """A batch's rate names in RATES order, their rows of ``ClientState.rates`` (a slice
    when contiguous, as with a profile and without: no fancy indexing), and each name's place."""
    found = _RATE_ROWS.get(names)
    if found is None:
        ordered = [name for name in RATES if name in names]
        rows = [RATES.index(name) for name in ordered]
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        found = _RATE_ROWS[names] = (ordered, slice(rows[0], rows[-1] + 1) if contiguous else rows,
                                     {name: i for i, name in enumerate(ordered)})
    return found


_RATE_ROWS: dict = {}
MAX_IP_LENGTH = 64  # source_ip is free text from the client: keep state bounded
#: A query nearer its nearest earlier one than this share of the distance at which honest
#: distinct records crowd (profile's 0.1 % k-NN quantile) re-sends one entity: PRADA skips it.
NEAR_REPEAT = 0.5
