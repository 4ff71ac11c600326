"""Per-client query state shared by the extraction and adversarial detectors.

Both families look at how a client's queries sit relative to its own recent
queries. One distance computation per batch serves both: for every query, the
distances to the previous ``size`` queries of the same client (a sliding window
over the client's stream, so results do not depend on how the stream is cut
into batches). From it come

* ``repeat``: the query equals one in its window (honest clients re-ask records);
* ``nn_same_class``: distance to the nearest earlier distinct query that got the
  same answer (PRADA's minimum distance);
* ``knn_mean``: mean distance to the ``k`` nearest earlier distinct queries
  other than the query's own copies (Chen, Carlini & Wagner's query-crowding
  statistic), and ``mixed``: whether those neighbours got another answer than
  the query (a decision-based attack walks the boundary, so its crowded queries
  straddle it; an honest client re-scoring one entity gets one answer);
* ``near_repeat``: the nearest earlier distinct query is closer than honest
  distinct records ever are, or differs from it in a few fields only (the same
  entity re-measured or re-sent with a change): PRADA and the boundary rates
  leave these out like exact repeats;
* ``sign_step``: the query is its nearest earlier distinct query moved by about
  the same share of each feature's range in most features — the shape of a
  gradient-sign step (Papernot et al.'s Jacobian-based augmentation);
* ``axis_probe``: a sparse re-send that differs, beyond rounding, in only one or
  two features from each of at least ``PROBE_NEIGHBOURS`` of the client's last
  ``PROBE_RECENT`` queries: the neighbourhood of one point explored axis by
  axis, as coordinate-wise finite differences do (ZOO). An honest what-if edits a record
  a few times; it does not vary one base along many single features.
* ``line_step``: the query lies on the line from its nearest earlier distinct query
  towards a farther earlier one, between them, with a dense change: a binary search
  between a point and an adversarial one, a step search along a direction, or
  Boundary's step towards the original (HopSkipJump, Boundary, Sign-OPT). Honest
  records are not interpolations of the client's earlier ones.

Memory per client is bounded: up to ``size`` × features float32 for the window (it
grows with the client's queries) plus a few hundred numbers (see :func:`state_bytes`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

SUB_BATCH = 64  # rows per distance block: each row sees `size` columns, a block adds this many
#: A query that changes at most this share of its nearest earlier query's features re-sends it.
NEAR_REPEAT_CHANGED = 0.25
#: ... and is an edit when each changed field moved by more than this many precision steps.
EDIT_STEPS = 2
#: An axis probe differs in at most this many features (beyond rounding) from each of at
#: least PROBE_NEIGHBOURS earlier distinct queries: x + h·e_i against x ± h·e_j.
PROBE_FIELDS = 2
PROBE_NEIGHBOURS = 5
#: ... among the client's last this many queries: finite differences come in bursts around
#: one point, and the check stays cheap (a sixth of the window).
PROBE_RECENT = 32
#: A line step's direction may deviate from the line by this sine, plus what rounding to
#: the data's precision explains (LINE_ROUNDING x the rounding error's norm over each length)...
LINE_SINE = 0.01
LINE_ROUNDING = 2.0


@dataclass
class QueryBatch:
    """One client's events (one model), in event-time order, as columns."""

    ts: np.ndarray                  # event time, epoch seconds
    Z: np.ndarray                   # scaled features (rows × features); rows of NaN when absent
    has_features: np.ndarray        # bool
    label: np.ndarray               # predicted class index in the profile's order, -1 unknown
    margin: np.ndarray              # top-1 minus top-2 probability, NaN when absent
    ood: np.ndarray                 # Mahalanobis distance to the profile, NaN when unknown
    out_of_bounds: np.ndarray       # bool: a feature beyond the profile's bounds
    source_ip: list | np.ndarray    # of str or None

    def __len__(self) -> int:
        return len(self.ts)

    def rows(self, index) -> QueryBatch:
        """The batch of rows ``index`` (an index array or a slice) of every column;
        ``source_ip`` must then be an array."""
        return QueryBatch(**{name: getattr(self, name)[index] for name in _BATCH_COLUMNS})


_BATCH_COLUMNS = tuple(f.name for f in dataclasses.fields(QueryBatch))


@dataclass
class Neighbours:
    repeat: np.ndarray          # bool
    nn_same_class: np.ndarray   # NaN where no earlier distinct query of that class
    knn_mean: np.ndarray        # NaN where fewer than k earlier distinct queries
    mixed: np.ndarray           # bool: the k nearest hold an answer other than the query's
    near_repeat: np.ndarray     # bool: re-sends an earlier query with a small change
    sparse_resend: np.ndarray   # bool: ... with a few fields changed (a what-if, a correction)
    sparse_edit: np.ndarray     # bool: ... each changed by more than rounding (a deliberate edit)
    sign_step: np.ndarray       # bool: a gradient-sign-shaped step from the nearest query
    has_nearest: np.ndarray     # bool: there was an earlier distinct query to compare with
    axis_probe: np.ndarray      # bool: one or two features off many earlier queries (finite differences)
    line_step: np.ndarray       # bool: between its nearest earlier query and a farther one, on their line


#: A step changes at least this share of the live features...
STEP_COVERAGE = 0.6
#: ...by amounts (as shares of each feature's range) this uniform (std / mean)...
STEP_UNIFORMITY = 0.35
#: ...and on average at least this share of the range: smaller moves are re-measurement noise.
STEP_MIN_SHARE = 0.02


def sign_steps(diff: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """Rows of ``diff`` (scaled units) that look like x + λ·sign(g) steps.

    ``unit`` is each feature's training range in scaled units, 0 for constant
    features (left out).
    """
    live, live_unit, coverage = _live_units(unit)
    share = np.abs(diff if live is None else diff[:, live]) / live_unit
    changed = share > 1e-9
    count = changed.sum(1)
    divisor = np.maximum(count, 1)
    mean = np.where(changed, share, 0).sum(1) / divisor
    share -= mean[:, None]
    share **= 2
    spread = np.sqrt(np.where(changed, share, 0).sum(1) / divisor)
    return ((count >= coverage) & (count >= 2) & (spread <= STEP_UNIFORMITY * mean)
            & (mean >= STEP_MIN_SHARE))


def _per_array(cache: dict, array: np.ndarray, build):
    """``build(array)``, kept while ``array`` lives: a profile's constants, derived once
    instead of per client batch (a few small numpy calls each time)."""
    entry = cache.get(id(array))
    if entry is None or entry[0] is not array:
        if len(cache) >= 64:
            cache.clear()
        entry = cache[id(array)] = (array, build(array))
    return entry[1]


def _live_units(unit: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, float]:
    """(live mask or None when every feature is live, the live units, coverage count)."""
    def build(unit):
        live = unit > 0
        return (None if live.all() else live), unit[live], STEP_COVERAGE * live.sum()
    return _per_array(_LIVE_UNITS, unit, build)


def _precision_terms(precision: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(rounding per feature, the norm of one precision step, the norm of rounding's error)."""
    def build(precision):
        step_norm = math.sqrt(precision @ precision)  # np.linalg.norm's arithmetic, without its overhead
        return EDIT_STEPS * precision + 1e-6, step_norm, step_norm / np.sqrt(12)
    return _per_array(_PRECISION_TERMS, precision, build)


_LIVE_UNITS: dict = {}
_PRECISION_TERMS: dict = {}


@dataclass
class ClientState:
    """Everything modelwatch keeps about one client of one model."""

    n_classes: int
    n_features: int
    size: int
    events: int = 0
    distinct: int = 0
    featured: int = 0                                 # events with features (own calibration)
    first_ts: float = float("nan")
    last_ts: float = float("nan")
    window: np.ndarray = field(default=None)          # (size, features) float32, oldest first
    window_label: np.ndarray = field(default=None)    # int16
    window_repeat: np.ndarray = field(default=None)   # bool
    window_hash: np.ndarray = field(default=None)     # uint64 hash of each row's bytes
    window_len: int = 0
    class_counts: np.ndarray = field(default=None)    # answers per class
    rates: np.ndarray = field(default=None)           # (RATES, 2) decayed flagged / total counts
    prada: np.ndarray = field(default=None)           # recent PRADA minimum distances, ring
    prada_count: int = 0                              # distances ever recorded
    rate_bins: np.ndarray = field(default=None)       # its bin per rate in the population histograms
    z_sum: np.ndarray = field(default=None)           # sum of its scaled features: its own calibration
    pooled_epoch: float = -1.0                        # epoch of pooled_counts
    pooled_counts: np.ndarray = field(default=None)   # own share of its IP's pooled counts, this epoch
    ip: str = ""                                      # the source IP its pooled counts went to
    ip_counts: np.ndarray = field(default=None)       # its whole share of that IP's pooled counts
    origin: str = ""                                  # the source IP of its first event (key minting)
    model: str = ""                                   # its model: a key "model/client" alone is
    #                                                   ambiguous when the model's name holds "/"
    last_alert: dict = field(default_factory=dict)    # family -> event time of its last alert

    def __post_init__(self):
        if self.window is None:
            # Windows and the PRADA ring grow as the client queries: most clients send a
            # few queries, and a preallocated window costs size x features floats each.
            self.window = np.zeros((0, self.n_features), dtype=np.float32)
            self.window_label = np.zeros(0, dtype=np.int16)
            self.window_repeat = np.zeros(0, dtype=bool)
            self.window_hash = np.zeros(0, dtype=np.uint64)
            self.class_counts = np.zeros(self.n_classes, dtype=np.int64)
            self.rates = np.zeros((len(RATES), 2))
            self.prada = np.zeros(0, dtype=np.float32)
            self.rate_bins = np.full(len(RATES), -1, dtype=np.int16)
            self.z_sum = np.zeros(self.n_features)
            self.pooled_counts = np.zeros(5)
            self.ip_counts = np.zeros(5)
        else:  # restored, maybe from before a rate was added
            self.rates = with_rate_rows(self.rates, 0)
            self.rate_bins = with_rate_rows(self.rate_bins, -1)


#: Rate tests kept per client, as rows of ``ClientState.rates``.
RATES = ("ood", "bounds", "crowded", "low_margin", "sign_step", "axis_probe", "line_step")
RATE_BINS = 101  # per-client rates in whole percent
#: A client's rate joins the population's baseline once this many queries were eligible.
RATE_MIN_ELIGIBLE = 20
PRADA_RING = 512


def state_bytes(state: ClientState) -> int:
    """Bytes held by one client's arrays (the fixed part of its memory)."""
    arrays = (state.window, state.window_label, state.window_repeat, state.window_hash,
              state.class_counts, state.rates, state.prada, state.pooled_counts, state.rate_bins,
              state.z_sum)
    return sum(a.nbytes for a in arrays)


def _pairwise(Q: np.ndarray, R: np.ndarray) -> np.ndarray:
    product = Q @ R.T
    product *= 2.0
    sq = (Q * Q).sum(1)[:, None] + (R * R).sum(1)[None, :]
    sq -= product
    np.maximum(sq, 0.0, out=sq)
    return np.sqrt(sq, out=sq)


def neighbours(state: ClientState, batch: QueryBatch, k: int,
               unit: np.ndarray | None = None, near: float = 0.0,
               precision: np.ndarray | None = None) -> Neighbours:
    """Distances of each query to its window, then the window moves on.

    Scores first, learns after: a query only ever sees queries before it.
    Rows without features are neither scored nor stored. ``unit`` (feature
    ranges in scaled units) enables the sign-step check; a query whose nearest
    earlier distinct query is closer than ``near`` is a near repeat; ``precision``
    (the data's step per feature, scaled units) tells an edit from rounding.
    """
    rows = batch.has_features.nonzero()[0]
    m = len(batch)
    # Row-wise work (hashes, sign steps) is done for the whole batch at once: its
    # blocks share only the window.
    if 0 < m == len(rows) <= SUB_BATCH:  # the common case in a stream: one block, all featured
        Q = batch.Z.astype(np.float32)
        r, nn, kn, mx, nr, sp, ed, diff, hn, pr, ln = _score_block(
            state, Q, row_hashes(Q), batch.label, k, near, precision)
        return Neighbours(r, nn.astype(np.float64), kn.astype(np.float64), mx, nr, sp, ed,
                          _sign_steps_where(diff, hn, unit), hn, pr, ln)
    repeat = np.zeros(m, dtype=bool)
    nn_same = np.full(m, np.nan)
    knn = np.full(m, np.nan)
    mixed = np.zeros(m, dtype=bool)
    near_repeat = np.zeros(m, dtype=bool)
    sparse = np.zeros(m, dtype=bool)
    edit = np.zeros(m, dtype=bool)
    step = np.zeros(m, dtype=bool)
    has_nearest = np.zeros(m, dtype=bool)
    probe = np.zeros(m, dtype=bool)
    line = np.zeros(m, dtype=bool)
    Q = batch.Z[rows].astype(np.float32)
    hashes = row_hashes(Q)
    diff = np.empty_like(Q)
    for start in range(0, len(rows), SUB_BATCH):
        block = slice(start, start + SUB_BATCH)
        sub = rows[block]
        r, nn, kn, mx, nr, sp, ed, diff[block], hn, pr, ln = _score_block(
            state, Q[block], hashes[block], batch.label[sub], k, near, precision)
        (repeat[sub], nn_same[sub], knn[sub], mixed[sub], near_repeat[sub], sparse[sub],
         edit[sub], has_nearest[sub], probe[sub], line[sub]) = (
            r, nn, kn, mx, nr, sp, ed, hn, pr, ln)
    step[rows] = _sign_steps_where(diff, has_nearest[rows], unit)
    return Neighbours(repeat, nn_same, knn, mixed, near_repeat, sparse, edit, step, has_nearest,
                      probe, line)


def _sign_steps_where(diff: np.ndarray, has_nearest: np.ndarray,
                      unit: np.ndarray | None) -> np.ndarray:
    """:func:`sign_steps` of the rows that have a nearest query; False elsewhere (and
    everywhere without ``unit``)."""
    if unit is None or not has_nearest.any():
        return np.zeros(len(diff), dtype=bool)
    if has_nearest.all():
        return sign_steps(diff, unit)
    step = np.zeros(len(diff), dtype=bool)
    step[has_nearest] = sign_steps(diff[has_nearest], unit)
    return step


@lru_cache(maxsize=256)
def _visible(h: int, m: int, size: int) -> np.ndarray:
    """Row i (the query at column h + i) sees the `size` columns before it."""
    col = np.arange(h + m)[None, :]
    pos = (h + np.arange(m))[:, None]
    return (col < pos) & (col >= pos - size)


def row_hashes(Q: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each float32 row's bytes: equal rows, equal hashes.

    Distances cannot say "identical": float32 rounding leaves identical rows a
    few thousandths apart.
    """
    words = np.ascontiguousarray(Q, dtype=np.float32).view(np.uint32).astype(np.uint64)
    multipliers = _MULTIPLIERS.get(Q.shape[1])
    if multipliers is None:
        multipliers = _MULTIPLIERS[Q.shape[1]] = _multipliers(Q.shape[1])
    # Both sums in one integer product: wrapping sums modulo 2^64 are exact in any order.
    sums = words @ multipliers
    return sums[:, 0] ^ (sums[:, 1] << 32)


def _multipliers(width: int) -> np.ndarray:
    """(width, 2): the hash's odd multipliers, and ones for the plain sum."""
    odd = np.random.default_rng(0x6D77).integers(1, 2**63, size=width, dtype=np.uint64) | 1
    return np.column_stack([odd, np.ones(width, dtype=np.uint64)])


_MULTIPLIERS: dict[int, np.ndarray] = {}


def _score_block(state: ClientState, Q: np.ndarray, q_hash: np.ndarray, labels: np.ndarray,
                 k: int, near: float, precision: np.ndarray | None):
    size, h = state.size, state.window_len
    m = len(Q)
    R = np.concatenate([state.window[:h], Q])
    R_label = np.concatenate([state.window_label[:h], labels.astype(np.int16)])
    R_hash = np.concatenate([state.window_hash[:h], q_hash])
    visible = _visible(h, m, size)
    same_row = visible & (q_hash[:, None] == R_hash[None, :])
    repeat = same_row.any(1)
    # A column that repeats an earlier query stands for nothing new: drop it.
    col_repeat = np.concatenate([state.window_repeat[:h], repeat])
    D = np.where((visible ^ same_row) & ~col_repeat, _pairwise(Q, R), np.inf)  # same_row: within visible
    nearest = D.argmin(1)
    nearest_d = D[np.arange(m), nearest]
    has_nearest = np.isfinite(nearest_d) & ~repeat
    # A re-sent entity: very close, or the same record with a few fields changed.
    diff = Q - R[nearest]  # each query minus its nearest earlier distinct query
    moved = np.abs(diff)
    changed = moved > 1e-6
    sparse = has_nearest & (changed.sum(1) <= NEAR_REPEAT_CHANGED * changed.shape[1])
    # A field moved by more than rounding would (without the data's precision: at all).
    if precision is not None:  # every changed field moved by more than rounding
        rounding, step_norm, error = _precision_terms(precision)
        edit = sparse & ~(changed & (moved <= rounding)).any(1)
    else:
        rounding = 1e-6
        edit = np.zeros(m, dtype=bool)
    near_repeat = sparse | (has_nearest & (nearest_d < near))
    same_label = R_label[None, :] == labels[:, None]
    nn_same = np.where(same_label, D, np.inf).min(1)
    nn_same[~np.isfinite(nn_same) | repeat | near_repeat] = np.nan
    kk = min(k, D.shape[1])
    # Repeats keep their distance to the *other* distinct queries: an honest
    # client re-asks far-apart records, an attacker's rounded probes repeat
    # among near-identical ones.
    knn, mixed = _nearest_k(D, ~same_label, kk)
    probe = np.zeros(m, dtype=bool)
    if sparse.any():  # only sparse re-sends can be axis probes: the cost stays with them
        rows = sparse.nonzero()[0]
        cols = h + rows[:, None] - PROBE_RECENT + np.arange(PROBE_RECENT)  # each row's recent columns
        compared = (cols >= 0) & np.isfinite(D[rows[:, None], np.maximum(cols, 0)])
        probe[rows] = axis_probes(Q[rows], R[np.maximum(cols, 0)], compared, rounding)
    line = np.zeros(m, dtype=bool)
    if precision is not None:
        # Dense moves only: an entity nudged field by field walks on axis lines.
        dense = has_nearest & ((moved > rounding).sum(1) > NEAR_REPEAT_CHANGED * changed.shape[1])
        # A move shorter than one precision step in every feature has its direction
        # decided by rounding.
        dense &= (nearest_d >= step_norm) & (nearest_d > 0)
        if dense.any():
            rows = dense.nonzero()[0]
            line[rows] = line_steps(Q[rows], R, D[rows], diff[rows], nearest_d[rows], error)

    keep = min(size, h + m)
    # The last `keep` columns become the window: whole arrays while the window grows,
    # copies once it slides (a view would keep the longer array alive).
    tail = slice(h + m - keep, None)
    copy = keep < h + m
    state.window = R[tail].copy() if copy else R
    state.window_label = R_label[tail].copy() if copy else R_label
    state.window_repeat = col_repeat[tail].copy() if copy else col_repeat
    state.window_hash = R_hash[tail].copy() if copy else R_hash
    state.window_len = keep
    return repeat, nn_same, knn, mixed, near_repeat, sparse, edit, diff, has_nearest, probe, line


def _nearest_k(D: np.ndarray, other: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean distance of each row's ``k`` nearest columns of ``D`` (NaN unless all are
    finite), and whether one of the finite ones is ``other`` (answered otherwise).

    The distances come from one partition, several times cheaper than argpartition.
    The neighbours are the columns up to the k-th distance; where more columns tie
    with it than there are places, argpartition picks, as it always did.

    >>> D = np.array([[1.0, 2.0, 2.0, np.inf]]); other = np.array([[0, 0, 1, 1]], bool)
    >>> knn, mixed = _nearest_k(D, other, 2)
    >>> knn.tolist(), mixed.tolist() == [bool(other[0, np.argpartition(D[0], 1)[:2]].any())]
    ([1.5], True)
    """
    kth_values = np.partition(D, k - 1, axis=1)
    knn = kth_values[:, :k].sum(1) / k  # np.mean's own arithmetic, without its Python overhead
    knn[~np.isfinite(knn)] = np.nan
    kth = kth_values[:, k - 1:k]
    near = D <= kth
    mixed = (near & other).any(1)
    finite = np.isfinite(kth[:, 0])
    if not finite.all():
        few = (~finite).nonzero()[0]  # fewer than k finite columns: those are the neighbours
        mixed[few] = (np.isfinite(D[few]) & other[few]).any(1)
    unsure = (finite & (near.sum(1) > k)).nonzero()[0]
    if len(unsure):
        idx = np.argpartition(D[unsure], k - 1, axis=1)[:, :k]
        mixed[unsure] = np.take_along_axis(other[unsure], idx, 1).any(1)
    return knn, mixed


def line_steps(Q: np.ndarray, R: np.ndarray, D: np.ndarray, step: np.ndarray,
               step_length: np.ndarray, error: float) -> np.ndarray:
    """Rows of ``Q`` that continue the line from their nearest earlier query towards a
    farther column of ``R``: ``step`` is each query minus its nearest, ``D`` the
    distances to the columns (inf where not visible), ``error`` rounding's error norm.

    >>> R = np.array([[0.0, 0.0], [4.0, 4.0]]); Q = np.array([[1.0, 1.0]])
    >>> D = np.array([[np.sqrt(2), np.sqrt(18)]])
    >>> line_steps(Q, R, D, Q - R[:1], D[:, 0], 0.0).tolist()
    [True]
    >>> Q = np.array([[1.0, 1.5]])                  # off the line: not a line step
    >>> D = np.linalg.norm(R - Q, axis=1)[None, :]
    >>> line_steps(Q, R, D, Q - R[:1], D[:, 0], 0.0).tolist()
    [False]
    """
    # cos of the angle between (query - nearest) and (column - query), for every column.
    dot = (R @ step.T).T - (Q * step).sum(1)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (D * step_length[:, None])
        sine = np.minimum(LINE_SINE + LINE_ROUNDING * error * (1 / step_length[:, None] + 1 / D), 0.5)
    beyond = np.isfinite(D) & (D > step_length[:, None])
    return (beyond & (cos > np.sqrt(1 - sine ** 2))).any(1)


def axis_probes(Q: np.ndarray, R: np.ndarray, compared: np.ndarray, tolerance) -> np.ndarray:
    """Rows of ``Q`` that differ beyond ``tolerance`` in 1..PROBE_FIELDS features from at
    least PROBE_NEIGHBOURS of the ``compared`` rows of ``R`` and re-send none of them.
    ``R`` is (rows, features), or (len(Q), rows, features): each query's own rows.

    >>> R = np.vstack([np.eye(4), [[1, 1, 0, 0]]])   # x + e_i, and x + e_0 + e_1
    >>> axis_probes(np.zeros((1, 4)), R, np.ones((1, 5), bool), 1e-6).tolist()
    [True]
    """
    changed = (np.abs(Q[:, None, :] - (R if R.ndim == 3 else R[None])) > tolerance).sum(2)
    changed = np.where(compared, changed, -1)
    near = ((changed >= 1) & (changed <= PROBE_FIELDS)).sum(1)
    return (near >= PROBE_NEIGHBOURS) & ~(changed == 0).any(1)


def _stored_ips(ips: dict) -> dict:
    return {ip: entry.stored() for ip, entry in ips.items()}


@dataclass
class Population:
    """What the population of one model's clients looks like, for comparisons.

    Updated between batches (a detector reads the state as it was before the
    batch), bounded in size: class answer counts, per rate test a histogram of
    per-client rates (the production baseline each rate rule calibrates from, see
    :meth:`baseline`), a histogram of per-client volumes (log2 bins) and, per
    source IP, a bounded set of client ids.
    """

    n_classes: int
    class_counts: np.ndarray = field(default=None)
    rate_hist: np.ndarray = field(default=None)       # (RATES, 101) clients per rate bin (percent)
    volume_hist: np.ndarray = field(default=None)     # clients per log2(events) bin
    ips: dict = field(default_factory=dict, metadata={"store": _stored_ips})  # ip -> IpEntry
    epoch: float = -1.0                               # event-time epoch this snapshot opens
    minting: dict = field(default_factory=dict)       # ip -> [new ids this epoch, its last minting alert]
    minting_hist: np.ndarray = field(default=None)    # sources per log2(new ids in an epoch) bin

    def __post_init__(self):
        if self.class_counts is None:
            self.class_counts = np.zeros(self.n_classes, dtype=np.float64)
            self.rate_hist = np.zeros((len(RATES), RATE_BINS), dtype=np.int64)
            self.volume_hist = np.zeros(40, dtype=np.int64)
        if self.minting_hist is None:  # absent from snapshots stored before key minting
            self.minting_hist = np.zeros(40, dtype=np.int64)
        self.rate_hist = with_rate_rows(self.rate_hist, 0)  # stored before a rate was added
        if isinstance(next(iter(self.ips.values()), None), dict):  # as stored (_stored_ips)
            self.ips = {ip: IpEntry.of(e["ids"], e["counts"]) for ip, e in self.ips.items()}

    def baseline(self, rate: str, quantile: float, min_clients: int) -> float | None:
        """The ``quantile`` of per-client rates of ``rate`` over clients with a rate worth
        the name, or None while fewer than ``min_clients`` have one.

        A quantile over clients, not over queries: one heavy client cannot move it, and
        attackers move it only once they are more than ``1 - quantile`` of the clients.

        >>> pop = Population(2)
        >>> pop.rate_hist[RATES.index("ood"), [1, 2, 40]] = [60, 30, 10]
        >>> pop.baseline("ood", 0.75, 20)
        0.02
        """
        bin_ = hist_quantile(self.rate_hist[RATES.index(rate)], quantile, min_clients)
        return None if bin_ is None else bin_ / (RATE_BINS - 1)

    def volume_quantile(self, q: float) -> float | None:
        bin_ = hist_quantile(self.volume_hist, q, 20)
        return None if bin_ is None else float(2.0 ** bin_)

    def class_entropy(self) -> float:
        return entropy(self.class_counts)

    def add_clients(self, clients: list[tuple[str, ClientState]]) -> None:
        """Count clients' states in: the population is the sum of its clients, so it
        can be rebuilt from restored client states after a restart (in bulk; the per-IP
        pooling in order)."""
        if not clients:
            return
        states = [state for _, state in clients]
        self.class_counts += np.sum([s.class_counts for s in states], axis=0)
        events = np.array([s.events for s in states])
        active = events[events > 0]
        np.add.at(self.volume_hist, np.minimum(39, np.log2(active)).astype(np.int64), 1)
        bins = np.array([with_rate_rows(s.rate_bins, -1) for s in states], dtype=np.int64)
        rows, cols = np.nonzero(bins >= 0)
        np.add.at(self.rate_hist, (cols, bins[rows, cols]), 1)
        for client_id, state in clients:
            if state.ip:
                self.pool(state.ip, client_id, state.ip_counts)

    def remove_client(self, client_id: str, state: ClientState) -> None:
        """Take an evicted client's state out: the inverse of :meth:`add_clients`, so the
        population stays what a restart would rebuild from the clients still kept."""
        self.class_counts -= state.class_counts
        if state.events:
            self.volume_hist[volume_bin(state.events)] -= 1
        joined = np.flatnonzero(state.rate_bins >= 0)
        self.rate_hist[joined, state.rate_bins[joined]] -= 1
        entry = self.ips.get(state.ip) if state.ip else None
        if entry is not None:
            ids = [i for i in entry.ids if i != client_id]  # a new entry: see snapshot()
            counts = np.maximum(np.asarray(entry.counts) - state.ip_counts, 0.0)
            if not ids and not counts.any():
                del self.ips[state.ip]
            else:
                self.ips[state.ip] = IpEntry.of(ids, counts)

    def new_id(self, ip: str) -> list | None:
        """Count a client id new to the model from source ``ip`` this epoch; returns its
        [new ids, last alert] entry (None once MAX_IPS sources are counted)."""
        entry = self.minting.get(ip)
        if entry is None:
            if len(self.minting) >= MAX_IPS:
                return None
            entry = self.minting[ip] = [0, None]
        entry[0] += 1
        return entry

    def minting_expected(self, quantile: float, factor: float, floor: int,
                         min_sources: int) -> float:
        """New ids per epoch one source brings at most, honestly: ``factor`` times the
        ``quantile`` of sources' counts in past epochs, never below ``floor``.

        >>> pop = Population(2)
        >>> pop.minting_hist[[0, 4]] = [990, 10]       # 1 new id, or an office of 16-31
        >>> pop.minting_expected(0.99, 2.0, 50, 20), pop.minting_expected(0.999, 2.0, 20, 20)
        (50, 32.0)
        """
        bin_ = hist_quantile(self.minting_hist, quantile, min_sources)
        return floor if bin_ is None else max(floor, factor * 2.0 ** bin_)

    def close_epoch(self, cooling_after: float) -> None:
        """Fold each source's new-id count since the last close into the histogram the
        threshold calibrates from. Alerted sources stay out (suspects do not calibrate
        honesty); an alert time later than ``cooling_after`` (the new epoch's start less
        the cooldown) is kept for the cooldown. Closing again with no new ids in between
        changes nothing, so a shard that publishes an idle epoch or skips it ends the same.
        """
        carried = {}
        for ip, (count, alerted) in self.minting.items():
            if alerted is None:
                if count:
                    self.minting_hist[volume_bin(count)] += 1
            elif alerted > cooling_after:
                carried[ip] = [0, alerted]
        self.minting = carried

    def pool(self, ip: str, client_id: str, counts: np.ndarray) -> None:
        """Add a client's pooled counts to its IP's entry."""
        self._pool(ip, [client_id], counts)

    def merge(self, other: Population) -> None:
        """Add another shard's population (disjoint clients) into this one."""
        self.class_counts += other.class_counts
        self.rate_hist += other.rate_hist
        self.volume_hist += other.volume_hist
        self.minting_hist += other.minting_hist
        for ip, entry in other.ips.items():
            self._pool(ip, entry.ids, np.asarray(entry.counts))

    def _pool(self, ip: str, client_ids, counts: np.ndarray) -> None:
        entry = self.ips.get(ip)
        if entry is None:
            if len(self.ips) >= MAX_IPS:  # bounded: MAX_IPS addresses, MAX_IDS_PER_IP ids each
                return
            entry = UNSEEN_IP
        ids = entry.ids
        for client_id in client_ids:
            if client_id not in ids and len(ids) < MAX_IDS_PER_IP:
                ids = (*ids, client_id)
        # A new entry, never a change in place: snapshots share the entries (snapshot()).
        self.ips[ip] = IpEntry.of(ids, np.asarray(entry.counts) + counts)

    def snapshot(self) -> Population:
        """A copy that later changes to this population leave alone, sharing its per-IP
        entries (one per source IP: most of a snapshot), which are replaced, never changed."""
        return dataclasses.replace(
            self, class_counts=self.class_counts.copy(), rate_hist=self.rate_hist.copy(),
            volume_hist=self.volume_hist.copy(), minting_hist=self.minting_hist.copy(),
            ips=dict(self.ips), minting={ip: list(entry) for ip, entry in self.minting.items()})


class IpEntry(tuple):
    """A source IP's entry in a population: its five pooled sums, then its client ids (at
    most MAX_IDS_PER_IP), in one tuple. There is one per source IP, and a dict of two
    lists took ~250 B more each. Replaced, never changed: snapshots share them."""

    __slots__ = ()

    @classmethod
    def of(cls, ids, counts) -> IpEntry:
        return cls((*_floats(np.asarray(counts, dtype=np.float64)), *ids))

    @property
    def counts(self) -> tuple[float, ...]:
        return self[:5]

    @property
    def ids(self) -> tuple[str, ...]:
        return self[5:]

    def stored(self) -> dict:
        """The form populations are stored in (:func:`detectors.state.dumps`)."""
        return {"ids": list(self.ids), "counts": list(self.counts)}


#: One float object per whole count up to 4,096 (and +0.0), shared by the per-IP entries: a
#: source's five sums are counts of events (sums of ones and zeros), and an entry per
#: source IP otherwise holds five floats of its own.
_COUNTS = {float(i): float(i) for i in range(1, 4097)}
_ZERO = 0.0


def _floats(values: np.ndarray) -> list[float]:
    """``values.tolist()``, with whole counts as the shared float objects (the same
    values: +0.0 only for +0.0, never for -0.0)."""
    return [_COUNTS.get(v, v) if v else (_ZERO if math.copysign(1.0, v) > 0 else v)
            for v in values.tolist()]


UNSEEN_IP = IpEntry.of((), np.zeros(5))  # a source IP without an entry


def with_rate_rows(values: np.ndarray, fill) -> np.ndarray:
    """``values`` (one row per rate test) with a ``fill`` row for each rate in RATES
    after its last: state stored before a rate test was added."""
    missing = len(RATES) - len(values)
    if missing <= 0:
        return values
    return np.concatenate([values, np.full((missing, *values.shape[1:]), fill, values.dtype)])


def split_key(key: str, model: str = "") -> tuple[str, str]:
    """(model, client) of a client key "model/client": by the state's own model name
    when it has one (a name may hold "/"), else at the first "/" (states stored before
    they kept their model's name)."""
    if model and key.startswith(model + "/"):
        return model, key[len(model) + 1:]
    found, client = key.split("/", 1)
    return found, client


def hist_quantile(hist: np.ndarray, q: float, min_count: int) -> int | None:
    """The bin holding the ``q`` quantile of a histogram of clients, or None while it
    counts fewer than ``min_count``."""
    total = int(hist.sum())
    if total < min_count:
        return None
    return int(np.searchsorted(np.cumsum(hist), q * total))


def entropy(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of a vector of counts."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def volume_bin(events: int) -> int:
    """floor(log2(events)), capped at 39: from the integer's bits (the float log2 gives the
    same below 2^48 events)."""
    return min(39, int(max(events, 1)).bit_length() - 1)


MAX_IPS = 100_000
MAX_IDS_PER_IP = 32
