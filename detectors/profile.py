"""Reference profile: what a model's training data looks like, for the detectors.

Built once from the training set (``modelwatch profile``), stored as JSON. It
holds per-feature bounds and histograms, class-conditional moments, a whitened
(Ledoit-Wolf) covariance model for out-of-distribution scores, and thresholds
calibrated on a held-out fifth of the data, so that alert thresholds come from a
measured false-positive rate rather than from a bare number.

>>> rng = np.random.default_rng(0)
>>> X = rng.normal(size=(500, 4)); y = (X[:, 0] > 0).astype(int)
>>> p = build_profile(X, y, ["a", "b", "c", "d"], model="m", dataset="d")
>>> p.classes, p.n_features
(['0', '1'], 4)
>>> Profile.from_dict(p.to_dict()).ood_threshold == p.ood_threshold
True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

# scipy.stats and scikit-learn are imported where a profile is built: loading one
# (`modelwatch stats`, once per training batch) must not pay their ~1 s of imports.

PROFILE_VERSION = 1
#: Quantile levels of continuous histogram edges: fine in the tails, where
#: backdoor triggers and injected outliers put their mass.
EDGE_LEVELS = np.array(
    [0, 0.001, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
     0.95, 0.975, 0.99, 0.999, 1.0]
)
MAX_DISCRETE_VALUES = 32
#: Re-measurement noise the off-distribution distance allows: this many steps of the data's
#: precision, as a standard deviation.
NOISE_STEPS = 1.5
#: Simulated honest PRADA tests needed before delta is placed from them (else PRADA is off).
PRADA_MIN_TESTS = 100
PRADA_MIN_ROWS = 500
#: Calibrated W quantiles that switch PRADA off: no W falls below a delta of 0.
PRADA_OFF = {"0.001": 0.0, "0.01": 0.0, "0.5": 1.0}
#: Small training sets: an unestimable crowding quantile is this share of the lowest estimable one.
SMALL_SET_KNN_SHARE = 0.5
KNN_K = 5
OOD_LEVEL = 0.99
#: The reference classifier of profiles made before nearest neighbours (Gaussian
#: discriminants, still read from such profiles): its ridge.
CLASSIFIER_RIDGE = 0.05
#: The reference classifier (label-flip test): a row's NEIGHBOURS_K nearest training rows;
#: it is put in another class than its label only when NEIGHBOURS_VOTES of them carry that
#: class (a confident disagreement), else in its own.
NEIGHBOURS_K = 10
NEIGHBOURS_VOTES = 9
#: Training rows kept in the profile for it (a stratified sample beyond that).
NEIGHBOURS_MAX_ROWS = 4000
#: The linear reference classifier (label-flip test, beside the neighbours): a row goes to
#: another class than its label only when its posterior there is at least this. Neighbours
#: miss flipped rows in classes that are spread out; a linear boundary misses them in
#: classes that are not linearly separable: the test takes the stronger of the two.
LINEAR_CONFIDENCE = 0.97
#: Folds of the cross-validated label agreement of the linear classifier.
LINEAR_FOLDS = 10


class ProfileError(ValueError):
    """A profile file does not have the fields or shapes a profile needs."""


@dataclass
class Profile:
    model: str
    dataset: str
    feature_names: list[str]
    classes: list[str]
    n_rows: int
    lower: np.ndarray            # per-feature minimum seen in training
    upper: np.ndarray            # per-feature maximum
    mean: np.ndarray
    std: np.ndarray
    scale: np.ndarray            # std with a floor: the unit of every distance
    step: np.ndarray             # the data's precision: smallest gap between distinct values
    edges: list[np.ndarray]      # histogram edges per feature
    hist: list[np.ndarray]       # reference counts per feature (same bins)
    class_counts: np.ndarray     # rows per class, in ``classes`` order
    class_mean: np.ndarray       # (classes, features)
    class_std: np.ndarray
    within_cov: np.ndarray       # pooled within-class covariance of scaled features
    whitener: np.ndarray         # ||(x - mean)/scale @ whitener|| is the Mahalanobis distance
    ood_threshold: float         # OOD_LEVEL quantile of held-out Mahalanobis distances
    ood_rate: float              # upper bound on the share of honest rows beyond it (held-out)
    knn_quantiles: dict[str, float]  # held-out k-NN mean distances (scaled units)
    bounds_rate: float           # held-out share of rows beyond the fit rows' bounds
    bounds_value_rate: float     # held-out share of single values beyond them
    prada_w: dict[str, float]    # Shapiro-Wilk W of simulated honest query streams, by quantile
    sign_step_rate: float        # held-out rows whose nearest fit row is a sign-shaped step
    duplicate_rate: float        # share of training rows that repeat an earlier row
    label_column: str = "y"      # the label's column in training CSVs
    notes: tuple[str, ...] = ()  # rules the training set was too small to calibrate, and their fallback
    # The reference classifier (see Discriminants) and its label agreement: rows labelled c
    # (row) that it assigns to each class (column), as shares, cross-validated on the
    # training set. None in profiles made before them.
    label_agreement: np.ndarray | None = None
    classifier_pooling: float = 1.0
    class_cov: np.ndarray | None = None  # (classes, features, features), scaled; when pooling < 1
    # The nearest-neighbour reference classifier (profiles made before it have the
    # discriminants above): training rows (raw units), their class indices, and the
    # per-feature weights on scaled units of its distance.
    neighbour_rows: np.ndarray | None = None
    neighbour_labels: np.ndarray | None = None
    neighbour_weights: np.ndarray | None = None
    # The linear reference classifier (multinomial logistic regression on scaled units)
    # and its cross-validated label agreement; None in profiles made before it.
    linear: LinearClassifier | None = None
    linear_agreement: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def class_index(self, label) -> int:
        """Index of a label in ``classes``, or -1 when the profile never saw it."""
        return self._class_lookup.get(str(label), -1)

    def __post_init__(self):
        self._class_lookup = {c: i for i, c in enumerate(self.classes)}
        self._within_precision = None
        self._discriminants = None
        self._neighbours = None

    def scaled(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean) / self.scale

    @functools.cached_property
    def step_unit(self) -> np.ndarray:
        """Each feature's training range in scaled units (0 for constant features)."""
        return (self.upper - self.lower) / self.scale

    @functools.cached_property
    def step_scaled(self) -> np.ndarray:
        """The data's precision per feature in scaled units."""
        return self.step / self.scale

    @property
    def within_precision(self) -> np.ndarray:
        """Inverse of the pooled within-class covariance, ridged (computed once)."""
        if self._within_precision is None:
            self._within_precision = ridged_inverse(self.within_cov)
        return self._within_precision

    def reference_classes(self, X: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The reference classifier's class index for each row of ``X`` (raw units; a
        missing value counts as the training mean) labelled with class indices ``labels``
        (-1: a label the profile never saw). The nearest-neighbour classifier keeps a
        row's own label unless it confidently disagrees."""
        if self.neighbour_rows is not None:
            if self._neighbours is None:
                self._neighbours = NeighbourClassifier.fit(self.scaled(self.neighbour_rows),
                                                  self.neighbour_labels, self.neighbour_weights,
                                                  len(self.classes))
            return self._neighbours.classes(self._classifier_rows(X), np.asarray(labels))
        if self._discriminants is None:
            self._discriminants = Discriminants.fit(
                self.class_mean / self.scale - self.mean / self.scale, self.class_cov,
                self.within_cov, self.class_counts, self.classifier_pooling)
        return self._discriminants.classes(self._classifier_rows(X))

    def linear_classes(self, X: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
        """As :meth:`reference_classes`, by the linear classifier; None without one."""
        if self.linear is None:
            return None
        return self.linear.classes(self._classifier_rows(X), np.asarray(labels))

    def _classifier_rows(self, X: np.ndarray) -> np.ndarray:
        """Raw rows as the reference classifiers read them: scaled, a missing value at the
        training mean."""
        return np.nan_to_num(self.scaled(np.asarray(X, dtype=np.float64)), nan=0.0)

    def mahalanobis(self, Z: np.ndarray) -> np.ndarray:
        """OOD score of already scaled rows (see :meth:`scaled`)."""
        white = Z @ self.whitener
        return np.sqrt(np.einsum("ij,ij->i", white, white))

    def to_dict(self) -> dict:
        return {
            "version": PROFILE_VERSION,
            "model": self.model,
            "dataset": self.dataset,
            "feature_names": self.feature_names,
            "classes": self.classes,
            "label_column": self.label_column,
            "n_rows": self.n_rows,
            "features": {
                name: {
                    "min": float(self.lower[j]), "max": float(self.upper[j]),
                    "mean": float(self.mean[j]), "std": float(self.std[j]),
                    "scale": float(self.scale[j]), "step": float(self.step[j]),
                    "hist": {"edges": self.edges[j].tolist(), "counts": self.hist[j].tolist()},
                }
                for j, name in enumerate(self.feature_names)
            },
            "labels": {c: int(n) for c, n in zip(self.classes, self.class_counts, strict=True)},
            "by_label": {
                c: {"mean": self.class_mean[i].tolist(), "std": self.class_std[i].tolist()}
                for i, c in enumerate(self.classes)
            },
            "whitener": self.whitener.tolist(),
            "within_class_covariance": self.within_cov.tolist(),
            "calibration": {
                "ood_level": OOD_LEVEL,
                "ood_threshold": self.ood_threshold,
                "ood_rate": self.ood_rate,
                "knn_k": KNN_K,
                "knn_quantiles": self.knn_quantiles,
                "bounds_rate": self.bounds_rate,
                "bounds_value_rate": self.bounds_value_rate,
                "prada_w": self.prada_w,
                "sign_step_rate": self.sign_step_rate,
                "duplicate_rate": self.duplicate_rate,
                "notes": list(self.notes),
                **({} if self.label_agreement is None else {
                    "label_agreement": self.label_agreement.tolist(),
                    "classifier_pooling": self.classifier_pooling}),
                **({} if self.class_cov is None else {"class_covariance": self.class_cov.tolist()}),
                **({} if self.neighbour_rows is None else {"neighbours": {
                    "k": NEIGHBOURS_K, "votes": NEIGHBOURS_VOTES,
                    "weights": self.neighbour_weights.tolist(),
                    "labels": self.neighbour_labels.tolist(),
                    "rows": self.neighbour_rows.tolist()}}),
                **({} if self.linear is None else {"linear": {
                    "confidence": LINEAR_CONFIDENCE,
                    "weights": self.linear.weights.tolist(), "bias": self.linear.bias.tolist(),
                    "agreement": self.linear_agreement.tolist()}}),
            },
        }

    @classmethod
    def from_dict(cls, doc: dict) -> Profile:
        """Rebuild a profile, checking every field; raises :class:`ProfileError`."""
        try:
            if doc.get("version") != PROFILE_VERSION:
                raise ProfileError(f"version: expected {PROFILE_VERSION}, got {doc.get('version')!r}")
            names = [str(n) for n in doc["feature_names"]]
            feats = [doc["features"][n] for n in names]
            classes = [str(c) for c in doc["classes"]]
            d = len(names)
            col = lambda key: np.array([f[key] for f in feats], dtype=np.float64)  # noqa: E731
            cal = doc["calibration"]
            profile = cls(
                model=str(doc["model"]),
                dataset=str(doc.get("dataset") or ""),
                feature_names=names,
                classes=classes,
                n_rows=int(doc["n_rows"]),
                lower=col("min"), upper=col("max"), mean=col("mean"), std=col("std"),
                scale=col("scale"),
                step=np.array([f.get("step", 0.0) for f in feats], dtype=np.float64),
                edges=[np.asarray(f["hist"]["edges"], dtype=np.float64) for f in feats],
                hist=[np.asarray(f["hist"]["counts"], dtype=np.float64) for f in feats],
                class_counts=np.array([doc["labels"][c] for c in classes], dtype=np.float64),
                class_mean=np.array([doc["by_label"][c]["mean"] for c in classes], dtype=np.float64),
                class_std=np.array([doc["by_label"][c]["std"] for c in classes], dtype=np.float64),
                whitener=np.asarray(doc["whitener"], dtype=np.float64),
                within_cov=np.asarray(doc["within_class_covariance"], dtype=np.float64),
                ood_threshold=float(cal["ood_threshold"]),
                ood_rate=float(cal.get("ood_rate", 1 - OOD_LEVEL)),
                knn_quantiles={str(k): float(v) for k, v in cal["knn_quantiles"].items()},
                bounds_rate=float(cal["bounds_rate"]),
                bounds_value_rate=float(cal["bounds_value_rate"]),
                prada_w={str(k): float(v) for k, v in cal["prada_w"].items()},
                sign_step_rate=float(cal["sign_step_rate"]),
                duplicate_rate=float(cal["duplicate_rate"]),
                label_column=str(doc.get("label_column", "y")),
                notes=tuple(str(n) for n in cal.get("notes", ())),
                label_agreement=(np.asarray(cal["label_agreement"], dtype=np.float64)
                                 if "label_agreement" in cal else None),
                classifier_pooling=float(cal.get("classifier_pooling", 1.0)),
                class_cov=(np.asarray(cal["class_covariance"], dtype=np.float64)
                           if "class_covariance" in cal else None),
                **_neighbours_from(cal.get("neighbours"), d, len(classes)),
                **_linear_from(cal.get("linear"), d, len(classes)),
            )
        except KeyError as exc:
            raise ProfileError(f"missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ProfileError):
                raise
            raise ProfileError(f"malformed value: {exc}") from None
        if (profile.whitener.shape != (d, d) or profile.within_cov.shape != (d, d)
            or profile.class_mean.shape != (len(classes), d)):
            raise ProfileError("whitener or by_label shapes do not match feature_names")
        if (profile.label_agreement is not None
                and profile.label_agreement.shape != (len(classes), len(classes))):
            raise ProfileError("calibration.label_agreement is not classes x classes")
        if not 0 < profile.classifier_pooling <= 1 or (
                profile.classifier_pooling < 1 and (profile.class_cov is None
                                                    or profile.class_cov.shape != (len(classes), d, d))):
            raise ProfileError("calibration.classifier_pooling needs a class_covariance per class")
        if any(len(e) != len(h) + 1 for e, h in zip(profile.edges, profile.hist, strict=True)):
            raise ProfileError("a histogram has len(edges) != len(counts) + 1")
        return profile


def _neighbours_from(doc: dict | None, d: int, n_classes: int) -> dict:
    """The nearest-neighbour classifier's fields from ``calibration.neighbours``."""
    if doc is None:
        return {}
    if (int(doc["k"]), int(doc["votes"])) != (NEIGHBOURS_K, NEIGHBOURS_VOTES):
        raise ProfileError(f"calibration.neighbours: made with k={doc['k']}, votes={doc['votes']}; "
                           f"this version uses {NEIGHBOURS_K}, {NEIGHBOURS_VOTES}: rebuild the profile")
    rows = np.asarray(doc["rows"], dtype=np.float64).reshape(-1, d)
    labels = np.asarray(doc["labels"], dtype=np.int64)
    weights = np.asarray(doc["weights"], dtype=np.float64)
    if (len(labels) != len(rows) or len(rows) <= NEIGHBOURS_K or weights.shape != (d,)
            or labels.min() < 0 or labels.max() >= n_classes):
        raise ProfileError("calibration.neighbours: rows, labels and weights do not match")
    return {"neighbour_rows": rows, "neighbour_labels": labels, "neighbour_weights": weights}


def _linear_from(doc: dict | None, d: int, n_classes: int) -> dict:
    """The linear classifier's fields from ``calibration.linear``."""
    if doc is None:
        return {}
    if float(doc["confidence"]) != LINEAR_CONFIDENCE:
        raise ProfileError(f"calibration.linear: made with confidence {doc['confidence']}; this "
                           f"version uses {LINEAR_CONFIDENCE}: rebuild the profile")
    weights = np.asarray(doc["weights"], dtype=np.float64)
    bias = np.asarray(doc["bias"], dtype=np.float64)
    agreement = np.asarray(doc["agreement"], dtype=np.float64)
    if (weights.shape != (n_classes, d) or bias.shape != (n_classes,)
            or agreement.shape != (n_classes, n_classes)
            or not (np.isfinite(weights).all() and np.isfinite(bias).all())):
        raise ProfileError("calibration.linear: weights, bias and agreement do not match the classes")
    return {"linear": LinearClassifier(weights, bias), "linear_agreement": agreement}


def ridged_inverse(cov: np.ndarray, share: float = 0.25) -> np.ndarray:
    """Inverse of a covariance with a ridge of ``share`` of its mean variance: trusts
    near-constant directions less, and keeps small sets' estimates stable."""
    ridge = share * float(np.mean(np.diag(cov))) + 1e-9
    return np.linalg.inv(cov + ridge * np.eye(len(cov)))


@dataclass(frozen=True)
class Discriminants:
    """The reference classifier: Gaussian classes whose covariances are pooled with the
    within-class one by ``pooling`` (1: linear discriminants, below 1: partly quadratic)."""

    centroids: np.ndarray   # (classes, features), scaled units
    precisions: np.ndarray  # (classes, features, features)
    log_dets: np.ndarray
    log_priors: np.ndarray

    @classmethod
    def fit(cls, centroids, class_cov, within_cov, counts, pooling: float) -> Discriminants:
        precisions, log_dets = [], []
        for own in class_cov if pooling < 1 else [within_cov] * len(centroids):
            cov = (1 - pooling) * own + pooling * within_cov if pooling < 1 else own
            cov = cov + (CLASSIFIER_RIDGE * float(np.mean(np.diag(cov))) + 1e-9) * np.eye(len(cov))
            precisions.append(np.linalg.inv(cov))
            log_dets.append(np.linalg.slogdet(cov)[1])
        return cls(np.asarray(centroids), np.array(precisions), np.array(log_dets),
                   np.log(np.maximum(np.asarray(counts, dtype=np.float64), 1.0)))

    def classes(self, Z: np.ndarray) -> np.ndarray:
        """Most likely class of each scaled row."""
        score = np.empty((len(Z), len(self.centroids)))
        for k, (centroid, precision) in enumerate(zip(self.centroids, self.precisions, strict=True)):
            D = Z - centroid
            score[:, k] = np.einsum("ij,ij->i", D @ precision, D)
        return np.argmax(-0.5 * (score + self.log_dets) + self.log_priors, axis=1)


@dataclass(frozen=True)
class NeighbourClassifier:
    """The reference classifier: the ``NEIGHBOURS_K`` nearest training rows, in scaled
    units times per-feature ``weights``. A row goes to another class than its label
    only when ``NEIGHBOURS_VOTES`` of its neighbours carry that class.

    >>> rng = np.random.default_rng(0)
    >>> Z = np.r_[rng.normal(0, 1, (50, 2)), rng.normal(6, 1, (50, 2))]
    >>> nn = NeighbourClassifier.fit(Z, np.repeat([0, 1], 50), np.ones(2), 2)
    >>> nn.classes(np.array([[6.0, 6.0], [0.0, 0.0], [3.0, 3.0]]), np.array([0, 0, 1])).tolist()
    [1, 0, 1]
    """

    rows: np.ndarray     # (n, features), weighted scaled units
    labels: np.ndarray   # class index per row
    weights: np.ndarray
    n_classes: int
    norms: np.ndarray    # squared length of each row: every distance needs them

    @classmethod
    def fit(cls, Z, labels, weights, n_classes: int) -> NeighbourClassifier:
        rows = np.asarray(Z) * weights
        return cls(rows, np.asarray(labels), np.asarray(weights), n_classes,
                   np.einsum("ij,ij->i", rows, rows))

    def votes(self, Z: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
        """(rows, classes): how many of each row's nearest training rows carry each class;
        ``exclude`` (row -> training row index) leaves a row's own copy out."""
        Q = np.asarray(Z) * self.weights
        out = np.zeros((len(Q), self.n_classes))
        for start in range(0, len(Q), 512):  # bounded memory: 512 x training rows at a time
            part = Q[start:start + 512]
            dist = self.norms[None, :] - 2.0 * part @ self.rows.T
            if exclude is not None:
                dist[np.arange(len(part)), exclude[start:start + 512]] = np.inf
            nearest = np.argpartition(dist, NEIGHBOURS_K - 1, axis=1)[:, :NEIGHBOURS_K]
            np.add.at(out, (np.repeat(np.arange(len(part)) + start, NEIGHBOURS_K),
                            self.labels[nearest].ravel()), 1.0)
        return out

    def classes(self, Z: np.ndarray, labels: np.ndarray,
                exclude: np.ndarray | None = None) -> np.ndarray:
        """Each row's label, or the class that ``NEIGHBOURS_VOTES`` of its neighbours carry."""
        votes = self.votes(Z, exclude)
        best = votes.argmax(1)
        return np.where(votes.max(1) >= NEIGHBOURS_VOTES, best, labels)


@dataclass(frozen=True)
class LinearClassifier:
    """The linear reference classifier: class posteriors ``softmax(Z @ weights.T + bias)``
    of scaled rows. A row goes to another class than its label only when its posterior
    there is at least ``LINEAR_CONFIDENCE``.

    >>> lc = LinearClassifier(np.array([[-4.0], [4.0]]), np.zeros(2))
    >>> lc.classes(np.array([[2.0], [0.0], [-2.0]]), np.array([0, 0, 1])).tolist()
    [1, 0, 0]
    """

    weights: np.ndarray  # (classes, features)
    bias: np.ndarray     # (classes,)

    def posteriors(self, Z: np.ndarray) -> np.ndarray:
        logits = np.asarray(Z) @ self.weights.T + self.bias
        logits -= logits.max(1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(1, keepdims=True)

    def classes(self, Z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        p = self.posteriors(Z)
        return np.where(p.max(1) >= LINEAR_CONFIDENCE, p.argmax(1), labels)


def label_agreement(label_idx: np.ndarray, assigned: np.ndarray, n_classes: int) -> np.ndarray:
    """Of the rows labelled c (row), the share a reference classifier puts in each class
    (column), each off-diagonal cell at least the typical pair's rate (its confident
    disagreements, plus one, over rows and over the other classes), so that a pair never
    seen confused in a small training set is not promised zero."""
    confusion = np.zeros((n_classes, n_classes))
    np.add.at(confusion, (label_idx, assigned), 1.0)
    rows = confusion.sum(1, keepdims=True)
    off = confusion.sum() - np.trace(confusion)
    typical = (off + 1.0) / (len(label_idx) + 1.0) / max(n_classes - 1, 1)
    agreement = np.maximum(confusion / np.maximum(rows, 1.0), typical)
    diagonal = np.eye(n_classes, dtype=bool)
    agreement[diagonal] = 0.0
    agreement[diagonal] = 1.0 - agreement.sum(1)
    return agreement


def linear_classifier(Z: np.ndarray, label_idx: np.ndarray, n_classes: int,
                      rng: np.random.Generator) -> tuple[LinearClassifier, np.ndarray] | None:
    """The linear reference classifier fit on scaled rows, and its label agreement
    cross-validated over ``LINEAR_FOLDS`` stratified folds; None when a class has fewer
    than two rows (no fold could leave one out)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    smallest = np.bincount(label_idx, minlength=n_classes).min()
    if smallest < 2:
        return None
    make = lambda: LogisticRegression(max_iter=2000)  # noqa: E731
    folds = StratifiedKFold(min(LINEAR_FOLDS, int(smallest)), shuffle=True,
                            random_state=int(rng.integers(2**31)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        held = cross_val_predict(make(), Z, label_idx, cv=folds, method="predict_proba")
        fit = make().fit(Z, label_idx)
    weights, bias = fit.coef_, fit.intercept_
    if n_classes == 2:  # sklearn keeps one logit for two classes: softmax of (-z/2, z/2)
        weights, bias = np.vstack([-weights / 2, weights / 2]), np.array([-bias[0] / 2, bias[0] / 2])
    assigned = np.where(held.max(1) >= LINEAR_CONFIDENCE, held.argmax(1), label_idx)
    return LinearClassifier(weights, bias), label_agreement(label_idx, assigned, n_classes)


def neighbour_classifier(Z: np.ndarray, label_idx: np.ndarray, n_classes: int,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The nearest-neighbour reference classifier: which training rows it keeps, its
    feature weights, and its leave-one-out label agreement.

    The weights are 1 (scaled units), or the square root of each feature's share of
    variance between classes when that is clearly better (balanced leave-one-out accuracy
    of the neighbours' majority, +0.01): uninformative features then stop diluting the
    distance. The agreement is :func:`label_agreement`'s."""
    keep = np.arange(len(Z))
    if len(Z) > NEIGHBOURS_MAX_ROWS:
        # Stratified: every class keeps its share.
        keep = np.sort(np.concatenate([
            rng.permutation(np.flatnonzero(label_idx == c))[
                :max(1, round(NEIGHBOURS_MAX_ROWS * np.mean(label_idx == c)))]
            for c in range(n_classes)]))
    Zk, lk = Z[keep], label_idx[keep]
    centroids = np.array([Zk[lk == c].mean(0) if (lk == c).any() else np.zeros(Z.shape[1])
                          for c in range(n_classes)])
    within = ((Zk - centroids[lk]) ** 2).mean(0)
    total = ((Zk - Zk.mean(0)) ** 2).mean(0)
    eta = np.sqrt(np.clip(1 - within / np.maximum(total, 1e-12), 0.0, 1.0))
    best = None
    for weights in (np.ones(Z.shape[1]), np.maximum(eta, 1e-3)):
        model = NeighbourClassifier.fit(Zk, lk, weights, n_classes)
        votes = model.votes(Zk, exclude=np.arange(len(Zk)))
        majority = votes.argmax(1)
        accuracy = float(np.mean([np.mean(majority[lk == c] == c)
                                  for c in range(n_classes) if (lk == c).any()]))
        if best is None or accuracy > best[0] + 0.01:
            assigned = np.where(votes.max(1) >= NEIGHBOURS_VOTES, majority, lk)
            best = (accuracy, weights, assigned)
    _, weights, assigned = best
    return keep, weights, label_agreement(lk, assigned, n_classes)


def histogram_edges(values: np.ndarray) -> np.ndarray:
    """Edges for one feature: a bin per value if few distinct values, else quantiles."""
    distinct = np.unique(values)
    if len(distinct) == 1:
        return np.array([distinct[0] - 0.5, distinct[0] + 0.5])
    if len(distinct) <= MAX_DISCRETE_VALUES:
        mids = (distinct[1:] + distinct[:-1]) / 2
        first = distinct[0] - (mids[0] - distinct[0])
        last = distinct[-1] + (distinct[-1] - mids[-1])
        return np.concatenate([[first], mids, [last]])
    return np.unique(np.quantile(values, EDGE_LEVELS))


def count_in_bins(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin; values beyond the outer edges are not counted."""
    return np.histogram(values, bins=edges)[0]


def duplicate_share(X: np.ndarray) -> float:
    """Share of rows that repeat an earlier row exactly."""
    if len(X) == 0:
        return 0.0
    return 1.0 - len(np.unique(X, axis=0)) / len(X)


def knn_mean_distance(Q: np.ndarray, R: np.ndarray, k: int) -> np.ndarray:
    """Mean distance of each row of ``Q`` to its ``k`` nearest rows of ``R`` (zero distances kept)."""
    sq = (Q * Q).sum(1)[:, None] + (R * R).sum(1)[None, :] - 2 * Q @ R.T
    dist = np.sqrt(np.maximum(sq, 0))
    k = min(k, dist.shape[1])
    return np.sort(np.partition(dist, k - 1, axis=1)[:, :k], axis=1).mean(1)


def precision_step(values: np.ndarray) -> float:
    """The smallest gap between distinct values of one feature (0 if constant).

    >>> precision_step(np.array([0.0, 0.5, 2.0, 2.0]))
    0.5
    """
    distinct = np.unique(values)
    return float(np.diff(distinct).min()) if len(distinct) > 1 else 0.0


def _rows_for(level: float) -> int:
    """Held-out rows a quantile needs before it is estimated from the data: one beyond it."""
    return int(np.ceil(1 / min(level, 1 - level)))


def gaussian_ood_threshold(held_ood: np.ndarray, n_features: int) -> float:
    """The OOD_LEVEL distance of a Gaussian of the data's dimension, widened by the ratio
    of the held-out median distance to the Gaussian median when that is above one.

    >>> round(gaussian_ood_threshold(np.full(20, 3.0), 13), 2)   # below the median: Gaussian
    5.26
    >>> round(gaussian_ood_threshold(np.full(20, 7.0), 13), 2)   # twice as spread: twice as far
    10.49
    """
    from scipy import stats

    widen = max(1.0, float(np.median(held_ood)) / float(np.sqrt(stats.chi2.ppf(0.5, n_features))))
    return float(np.sqrt(stats.chi2.ppf(OOD_LEVEL, n_features))) * widen


def upper_rate(hits: int, n: int) -> float:
    """An upper bound (about 95 %) on a rate seen ``hits`` times in ``n`` rows: with few
    held-out rows the honest rate is not known better than that.

    >>> upper_rate(0, 300)
    0.01
    """
    return min(1.0, (hits + 3) / max(n, 1))


def _scale_of(std: np.ndarray) -> np.ndarray:
    # Constant features (std 0) still need a unit; take a share of the typical one.
    positive = std[std > 0]
    floor = 0.1 * float(np.median(positive)) if len(positive) else 1.0
    return np.maximum(std, floor)


def _whitener(Z: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Cholesky factor of the precision of the data's covariance plus re-measurement noise.

    ``noise`` is each feature's noise variance in scaled units: honest inputs are
    re-measured, and a feature that never varied in training (a blank pixel)
    would otherwise make one unit of noise look like an attack.
    """
    from sklearn.covariance import LedoitWolf

    covariance = LedoitWolf().fit(Z).covariance_ + np.diag(noise)
    precision = np.linalg.inv(covariance)
    return np.linalg.cholesky((precision + precision.T) / 2)


def _label_order(y: np.ndarray) -> list[str]:
    labels = np.unique(y.astype(str))
    try:
        return sorted(labels.tolist(), key=float)
    except ValueError:
        return sorted(labels.tolist())


def honest_prada_w(Z: np.ndarray, labels: np.ndarray, n_classes: int,
                   rng: np.random.Generator, streams: int = 120, length: int = 200) -> dict[str, float]:
    """PRADA's W on simulated honest clients: streams of training rows, half of
    them drawn from all classes, half from one to three classes, tested as the
    rule tests (window of recent queries, every 10 distances after 100)."""
    from detectors.clients import ClientState, QueryBatch, neighbours
    from detectors.normality import shapiro_w_windows

    values = []
    for s in range(streams):
        if s % 2 and n_classes > 1:
            chosen = rng.choice(n_classes, size=min(n_classes, int(rng.integers(1, 4))), replace=False)
            pool = np.flatnonzero(np.isin(labels, chosen))
        else:
            pool = np.arange(len(Z))
        rows = rng.choice(pool, size=min(length, len(pool)), replace=False)
        state = ClientState(n_classes=n_classes, n_features=Z.shape[1], size=128)
        m = len(rows)
        batch = QueryBatch(ts=np.zeros(m), Z=Z[rows], has_features=np.ones(m, bool),
                           label=labels[rows], margin=np.full(m, np.nan), ood=np.full(m, np.nan),
                           out_of_bounds=np.zeros(m, bool), source_ip=[])
        dist = neighbours(state, batch, KNN_K).nn_same_class
        dist = dist[~np.isnan(dist)]
        ends = np.arange(100, len(dist) + 1, 10)
        if len(ends):
            values.extend(shapiro_w_windows(dist, ends, 300).tolist())
    if len(values) < PRADA_MIN_TESTS:  # too few honest tests to place delta
        return dict(PRADA_OFF)
    return {str(q): float(np.quantile(values, q)) for q in (0.001, 0.01, 0.5)}


def _sign_step_rate(held: np.ndarray, fit: np.ndarray, unit: np.ndarray) -> float:
    """How often honest data's nearest neighbour is a sign-shaped step away."""
    from detectors.clients import sign_steps

    sq = (held * held).sum(1)[:, None] + (fit * fit).sum(1)[None, :] - 2 * held @ fit.T
    sq[sq <= 1e-9] = np.inf  # identical rows are repeats, not steps
    nearest = sq.argmin(1)
    return float(sign_steps(held - fit[nearest], unit).mean())


def build_profile(
    X: np.ndarray,
    y: np.ndarray,
    feature_names: list[str],
    *,
    model: str,
    dataset: str = "",
    label_column: str = "y",
    seed: int = 0,
) -> Profile:
    """Profile a training set ``X`` (rows × features) with labels ``y``."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    if X.ndim != 2 or len(X) < 20:
        raise ProfileError("a profile needs at least 20 rows of features")
    if len(y) != len(X):
        raise ProfileError("labels and rows differ in number")
    classes = _label_order(y)
    lookup = {c: i for i, c in enumerate(classes)}
    label_idx = np.array([lookup[v] for v in y.astype(str)])

    mean, std = X.mean(0), X.std(0)
    scale = _scale_of(std)
    edges = [histogram_edges(X[:, j]) for j in range(X.shape[1])]

    # Calibrate on a held-out fifth: thresholds then reflect unseen honest data.
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    held, fit = order[: len(X) // 5], order[len(X) // 5:]
    Z_fit = (X[fit] - mean) / scale
    Z_held = (X[held] - mean) / scale
    step = np.array([precision_step(X[:, j]) for j in range(X.shape[1])])
    known = step[step > 0]
    step[step <= 0] = float(np.median(known)) if len(known) else 0.0  # constant: a typical step
    noise = (NOISE_STEPS * step / scale) ** 2
    W_fit = _whitener(Z_fit - Z_fit.mean(0), noise)
    held_ood = np.linalg.norm((Z_held - Z_fit.mean(0)) @ W_fit, axis=1)
    beyond = (X[held] < X[fit].min(0)) | (X[held] > X[fit].max(0))
    held_sample = Z_held[:2000]
    fit_sample = Z_fit[rng.permutation(len(Z_fit))[:20000]]
    knn = knn_mean_distance(held_sample, fit_sample, KNN_K)
    knn_levels = (0.001, 0.01, 0.05, 0.5)
    notes = []
    ood_threshold = float(np.quantile(held_ood, OOD_LEVEL))
    if len(held) < _rows_for(OOD_LEVEL):
        # Too few held-out rows for a 99th percentile, and their maximum is one row's
        # accident: the Gaussian quantile, scaled by how far the held-out median sits
        # beyond the Gaussian median (a robust fit of the spread, never below Gaussian).
        ood_threshold = gaussian_ood_threshold(held_ood, X.shape[1])
        notes.append(f"adversarial.out_of_distribution: {len(held)} held-out rows are too few to "
                     f"calibrate the {OOD_LEVEL:.0%} distance (needs {_rows_for(OOD_LEVEL)}); it uses "
                     "the Gaussian quantile scaled to the held-out median")
    knn_quantiles = {str(q): float(np.quantile(knn, q)) for q in knn_levels}
    too_few = [q for q in knn_levels if len(knn) < _rows_for(q)]
    if too_few:
        # An unestimable low quantile is replaced by a share of the smallest one that can be
        # estimated (or of the held-out minimum): crowding then means closer than honest
        # records were ever seen, by a margin.
        known = [q for q in knn_levels if q not in too_few]
        anchor = knn_quantiles[str(known[0])] if known else float(knn.min())
        for q in too_few:
            knn_quantiles[str(q)] = min(knn_quantiles[str(q)], anchor * SMALL_SET_KNN_SHARE)
        notes.append(f"adversarial.query_crowding: {len(knn)} held-out rows are too few for the "
                     f"{min(too_few):g} distance quantile (needs {_rows_for(min(too_few))}); it uses "
                     f"{SMALL_SET_KNN_SHARE:g} x the {known[0] if known else 'smallest'} one, and the "
                     "population's crowding rate once enough clients were seen")

    Z = (X - mean) / scale
    prada_off = ("PRADA is off for this model (uniform and Jacobian extraction are still "
                 "judged by the off-distribution and gradient-step rules)")
    if len(X) < PRADA_MIN_ROWS:
        # Honest clients of a small data set re-ask its few records, re-measured: their
        # distance distributions are bimodal, and PRADA's normality test flags them.
        prada_w = dict(PRADA_OFF)
        notes.append(f"extraction.prada: {len(X)} rows are too few (needs {PRADA_MIN_ROWS}): honest "
                     "clients re-ask the same few records, which PRADA's normality test cannot "
                     f"tell from extraction; {prada_off}")
    else:
        prada_w = honest_prada_w(Z, label_idx, len(classes), rng)
        if prada_w == PRADA_OFF:
            notes.append(f"extraction.prada: {len(X)} rows are too few to simulate the "
                         f"{PRADA_MIN_TESTS} honest tests its delta needs; {prada_off}")
    keep, weights, agreement = neighbour_classifier(Z, label_idx, len(classes), rng)
    linear = linear_classifier(Z[keep], label_idx[keep], len(classes), rng)
    class_mean = np.array([X[label_idx == c].mean(0) for c in range(len(classes))])
    class_std = np.array([X[label_idx == c].std(0) for c in range(len(classes))])
    return Profile(
        model=model,
        dataset=dataset,
        feature_names=[str(n) for n in feature_names],
        classes=classes,
        n_rows=len(X),
        lower=X.min(0), upper=X.max(0), mean=mean, std=std, scale=scale,
        edges=edges,
        hist=[count_in_bins(X[:, j], e).astype(np.float64) for j, e in enumerate(edges)],
        class_counts=np.bincount(label_idx, minlength=len(classes)).astype(np.float64),
        class_mean=class_mean,
        class_std=class_std,
        within_cov=np.cov((Z - (class_mean / scale - mean / scale)[label_idx]).T, bias=True),
        whitener=_whitener(Z - Z.mean(0), noise),
        ood_threshold=ood_threshold,
        ood_rate=upper_rate(int((held_ood > ood_threshold).sum()), len(held)),
        knn_quantiles=knn_quantiles,
        bounds_rate=float(beyond.any(1).mean()),
        bounds_value_rate=float(beyond.mean()),
        prada_w=prada_w,
        sign_step_rate=_sign_step_rate(held_sample, fit_sample, (X.max(0) - X.min(0)) / scale),
        duplicate_rate=duplicate_share(X),
        label_column=label_column,
        step=step,
        notes=tuple(notes),
        label_agreement=agreement,
        neighbour_rows=X[keep],
        neighbour_labels=label_idx[keep],
        neighbour_weights=weights,
        **({} if linear is None else {"linear": linear[0], "linear_agreement": linear[1]}),
    )
