"""Each rule's score against its threshold, per key: ``replay --explain`` and near misses.

A key is a client (``client_id`` or ``model/client_id``) or a training batch
(``dataset``, ``dataset/source`` or ``batch_id``). For the keys asked about,
every rule's scores are summed up over the key's events: the highest score and
where it came, how many events reached the threshold. For every key, the
closest each rule came to its threshold is kept, so a report can show the keys
that nearly alerted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streams.records import format_ts

#: A key "came close" when a rule's score reached this share of its threshold.
NEAR_MISS = 0.7


@dataclass
class RuleScores:
    rule: str
    scored: int = 0              # events (or batches) the rule scored
    best: float = -np.inf        # highest score
    best_ratio: float = -np.inf  # highest score / threshold
    threshold: float = float("nan")
    at: str = ""                 # request id (or batch id) of the highest score
    at_ts: float = float("nan")
    reached: int = 0             # events whose score reached the threshold

    def add(self, score: np.ndarray, threshold: np.ndarray, ratio: np.ndarray,
            ids: list[str], ts: np.ndarray) -> None:
        known = np.isfinite(score)
        if not known.any():
            return
        i = int(np.argmax(np.where(known, score, -np.inf)))
        self.scored += int(known.sum())
        self.reached += int((known & (score >= threshold)).sum())
        if score[i] > self.best:
            self.best, self.threshold, self.at, self.at_ts = (
                float(score[i]), float(threshold[i]), ids[i], float(ts[i]))
        self.best_ratio = max(self.best_ratio, float(ratio.max()))


class Scores:
    """Collects rule scores while the pipeline judges (replay only)."""

    def __init__(self, explain: set[str] | None = None):
        self.explain = set(explain or ())
        self.detail: dict[str, dict[str, RuleScores]] = {}   # key -> rule -> scores
        self.closest: dict[str, dict[str, float]] = {}       # key -> rule -> best ratio

    def _wanted(self, *names: str) -> str | None:
        return next((n for n in names if n in self.explain), None)

    def query(self, model: str, client: str, candidates, request_ids: list[str],
              ts: np.ndarray) -> None:
        key = f"{model}/{client}"
        wanted = self._wanted(client, key)
        for c in candidates:
            self._record(key, c.rule, c.score, c.threshold, request_ids, ts, wanted)

    def batch(self, dataset: str, source: str, batch_id: str, trace: dict, ts: float) -> None:
        key = f"{dataset}/{source}"
        wanted = self._wanted(dataset, key, batch_id)
        for rule, (score, threshold) in trace.items():
            self._record(key, rule, [score], threshold, [batch_id], np.array([ts]), wanted)

    def _record(self, key: str, rule: str, score, threshold, ids: list[str], ts: np.ndarray,
                wanted: str | None) -> None:
        """One rule's scores at some events of ``key``: its closest approach, and the
        detail if the key is explained."""
        score = np.asarray(score, dtype=np.float64)
        threshold = np.broadcast_to(np.asarray(threshold, dtype=np.float64), score.shape)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(threshold > 0, score / threshold, 0.0)
        ratio = np.where(np.isfinite(ratio), ratio, -np.inf)
        closest = self.closest.setdefault(key, {})
        if np.isfinite(ratio).any():
            closest[rule] = max(closest.get(rule, 0.0), float(ratio.max()))
        if wanted is not None:
            self.detail.setdefault(key, {}).setdefault(rule, RuleScores(rule)).add(
                score, threshold, ratio, ids, ts)

    def near_misses(self, alerted: set[str], limit: int = 50) -> list[dict]:
        """Keys that never alerted whose closest rule reached ``NEAR_MISS`` of its threshold,
        closest first."""
        rows = []
        for key, rules in self.closest.items():
            if key in alerted or key.split("/", 1)[-1] in alerted or not rules:
                continue
            rule, ratio = max(rules.items(), key=lambda item: item[1])
            if ratio >= NEAR_MISS:
                rows.append({"key": key, "rule": rule, "ratio": round(ratio, 3)})
        rows.sort(key=lambda r: -r["ratio"])
        return rows[:limit]

    def lines(self, alerts) -> list[str]:
        """``replay --explain`` output: per key, each rule's best score against its threshold."""
        out = []
        for wanted in sorted(self.explain):
            keys = [k for k in self.detail if wanted in (k, k.split("/", 1)[-1], k.split("/")[0])
                    or any(r.at == wanted for r in self.detail[k].values())]
            if not keys:
                out.append(f"{wanted}: not seen (no event or batch with that client, dataset or batch id)")
                continue
            for key in keys:
                fired = [a for a in alerts if key_of(a) == key]
                out.append(f"{key}: {len(fired)} alert(s)")
                for a in fired:
                    out.append(f"  ALERT {a.rule.name} at {a.modelwatch.trigger.ts} "
                               f"({a.modelwatch.trigger.request_id or a.modelwatch.batch_id})")
                out.append(f"  {'rule':34} {'best score':>11} {'threshold':>10} {'reached':>8} "
                           f"{'scored':>7}  where")
                for r in sorted(self.detail[key].values(), key=lambda r: -r.best_ratio):
                    where = f"{r.at} at {format_ts(r.at_ts)}" if r.at and r.best > 0 else ""
                    if not r.scored:
                        out.append(f"  {r.rule:34} {'not scored (not enough events yet)':>38}")
                        continue
                    out.append(f"  {r.rule:34} {r.best:11.4g} {r.threshold:10.4g} {r.reached:8d} "
                               f"{r.scored:7d}  {where}")
        return out


def key_of(alert) -> str:
    """The key an alert belongs to: ``model/client`` or ``dataset/source``."""
    m = alert.modelwatch
    if m.client_id is not None:
        return f"{m.model}/{m.client_id}"
    return f"{m.dataset}/{m.source}"
