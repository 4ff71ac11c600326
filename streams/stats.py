"""One raw training batch to one training-stats event (contract v1).

Histograms use the profile's edges, so that batches of a dataset compare bin by
bin with the reference. Beyond the contract's required fields it writes
``by_label`` (class-conditional moments, which show label flips), per-feature
``below``/``above`` counts (values outside the histogram edges), ``far`` (values
beyond the edges by more than their whole span: injected outliers) and
``duplicates`` (rows that repeat an earlier row of the batch) and
``reference_classes`` (per label, how many distinct rows within the training bounds the
profile's reference classifier puts in each class: with the nearest-neighbour classifier,
a row stays in its own label's class unless its training neighbours all but agree on
another) and ``linear_classes`` (the same by the profile's linear classifier, whose
posterior must reach ``LINEAR_CONFIDENCE``; absent with profiles made before it).
"""

from __future__ import annotations

import numpy as np

from detectors.profile import Profile
from streams.records import format_ts, parse_ts
from streams.tabular import read_table


def _moments(values: np.ndarray) -> tuple[int, float | None, float | None]:
    present = values[~np.isnan(values)]
    if len(present) == 0:
        return 0, None, None
    return len(present), float(present.mean()), float(present.std())


def stats_event(X: np.ndarray, y: np.ndarray, profile: Profile, *, dataset: str, source: str,
                batch_id: str, ts: float) -> dict:
    features = {}
    for j, name in enumerate(profile.feature_names):
        column = X[:, j]
        present = column[~np.isnan(column)]
        edges = profile.edges[j]
        count, mean, std = _moments(column)
        entry = {"count": count, "nulls": int(len(column) - count), "mean": mean, "std": std,
                 "min": float(present.min()) if count else None,
                 "max": float(present.max()) if count else None,
                 "hist": {"edges": edges.tolist(),
                          "counts": np.histogram(present, bins=edges)[0].tolist()},
                 "below": int((present < edges[0]).sum()),
                 "above": int((present > edges[-1]).sum()),
                 "far": int(((present < 2 * edges[0] - edges[-1])
                             | (present > 2 * edges[-1] - edges[0])).sum())}
        features[name] = {k: v for k, v in entry.items() if v is not None}
    labels, counts = np.unique(y.astype(str), return_counts=True)
    by_label = {}
    for label in labels:
        rows = X[y.astype(str) == label]
        by_label[str(label)] = {}
        for j, name in enumerate(profile.feature_names):
            count, mean, std = _moments(rows[:, j])
            by_label[str(label)][name] = {k: v for k, v in
                                          {"count": count, "mean": mean, "std": std}.items()
                                          if v is not None}
    # Which class the profile's reference classifier gives each row, per label: a flipped
    # label shows as rows of one label that the classifier puts in another class. Rows
    # beyond the training bounds are left out: the classifier knows nothing there, and
    # the bounds rules judge them.
    # A repeated (row, label) counts once: a duplicate flood is the duplicates rule's, and
    # must not pass for a flip by repeating the rows the classifier gets wrong.
    with_labels = np.column_stack([np.nan_to_num(X, nan=np.inf), np.unique(y, return_inverse=True)[1]])
    first = np.zeros(len(X), dtype=bool)
    first[np.unique(with_labels, axis=0, return_index=True)[1]] = True
    inside = first & (np.isnan(X) | ((X >= profile.lower) & (X <= profile.upper))).all(1)
    labels_as_str = y.astype(str)
    label_idx = np.array([profile.class_index(v) for v in labels_as_str], dtype=np.int64)

    rows_inside, labels_inside = X[inside], label_idx[inside]

    def per_label(classify) -> dict | None:
        assigned_idx = np.full(len(X), -1, dtype=np.int64)
        inside_idx = classify(rows_inside, labels_inside)
        if inside_idx is None:
            return None
        assigned_idx[inside] = inside_idx
        # A label the profile never saw keeps its own name unless the classifier is sure.
        assigned = np.where(assigned_idx >= 0,
                            np.asarray(profile.classes, dtype=object)[assigned_idx],
                            labels_as_str.astype(object))
        out = {}
        for label in labels:
            names, n = np.unique(assigned[inside & (labels_as_str == label)].astype(str),
                                 return_counts=True)
            out[str(label)] = {str(c): int(k) for c, k in zip(names, n, strict=True)}
        return out

    linear_classes = per_label(profile.linear_classes)
    return {
        "ts": format_ts(ts),
        "dataset": dataset,
        "batch_id": batch_id,
        "source": source,
        "n": int(len(X)),
        "features": features,
        "labels": {str(label): int(c) for label, c in zip(labels, counts, strict=True)},
        "by_label": by_label,
        "reference_classes": per_label(profile.reference_classes),
        **({} if linear_classes is None else {"linear_classes": linear_classes}),
        "duplicates": int(len(X) - first.sum()),
    }


def stats_event_from_csv(profile_path, csv_path, *, dataset: str, source: str, batch_id: str,
                         ts: float | str, profile: Profile | None = None) -> dict:
    """Read one batch CSV (columns named as in the profile) and describe it."""
    from streams.files import load_profile

    ts = parse_ts(ts) if isinstance(ts, str) else ts
    profile = profile or load_profile(profile_path)
    X, y, _ = read_table(csv_path, profile.label_column, profile.feature_names)
    return stats_event(X, y, profile, dataset=dataset, source=source, batch_id=batch_id, ts=ts)
