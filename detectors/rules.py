"""Every rule the detectors can fire, in one registry.

The rule code (`adversarial.py`, `extraction.py`, `monitor.py`,
`poisoning.py`) takes each rule's ATLAS techniques from here; the metrics label
their series by these names, the README's rule table and the thresholds file are
checked against it (``tests/test_rules.py``). A rule's ``reads`` are the keys of
``thresholds.toml`` it uses, ``calibration`` says where its expected honest value
comes from, and ``score`` what is compared with the threshold (always "higher is
more suspicious").

>>> RULES["adversarial.query_crowding"].techniques
('AML.T0043', 'AML.T0043.001')
>>> sorted({r.family for r in RULES.values()})
['adversarial', 'extraction', 'poisoning']
"""

from __future__ import annotations

from dataclasses import dataclass

from detectors.base import ATLAS, Family

QUERY_BASED = ("AML.T0043", "AML.T0043.001")
EVASION = ("AML.T0043",)
EXTRACT = ("AML.T0024.002",)
POISON = ("AML.T0020",)


@dataclass(frozen=True)
class Rule:
    name: str
    family: Family
    techniques: tuple[str, ...]
    summary: str
    score: str
    calibration: str
    reads: tuple[str, ...]

    def __post_init__(self):
        assert self.name.startswith(self.family + "."), self.name
        assert all(t in ATLAS for t in self.techniques), self.techniques


PRODUCTION = ("population.quantile", "population.factor", "population.min_clients",
              "population.max_expected")
RATE = ("adversarial.min_flagged", "adversarial.surprise", "history.decay")

_RULES = (
    Rule("adversarial.query_crowding", "adversarial", QUERY_BASED,
         "queries crowd around each other at the decision boundary (Chen et al.): "
         "decision-based black-box attacks",
         "-log10 binomial tail of the client's crowded share",
         "crowded = k-NN distance below the profile's quantile (its 1 % one for a dense "
         "move) and a neighbour answered otherwise; expected share from production "
         "(floor crowding_p0)",
         ("adversarial.knn_k", "adversarial.crowding_quantile", "adversarial.crowding_p0",
          *RATE, *PRODUCTION)),
    Rule("adversarial.low_margin", "adversarial", QUERY_BASED,
         "fresh queries answered at the decision boundary far more often than the population's",
         "-log10 binomial tail of the client's low-margin share",
         "expected share from production (low_margin_floor until calibrated, low_margin_min after)",
         ("adversarial.low_margin", "adversarial.low_margin_floor", "adversarial.low_margin_min",
          *RATE, *PRODUCTION)),
    Rule("adversarial.out_of_distribution", "adversarial", EVASION,
         "queries off the training distribution, even after the client's own calibration",
         "-log10 binomial tail of the client's off-distribution share",
         "distance threshold: profile's 99th percentile (with re-measurement noise); expected "
         "share: the held-out upper bound, then production",
         ("adversarial.ood_p0", *RATE, *PRODUCTION)),
    Rule("adversarial.feature_bounds", "adversarial", EVASION,
         "feature values far beyond the training data's bounds",
         "-log10 binomial tail of the client's out-of-bounds share",
         "bounds slack bounds_tolerance x range (or two precision steps); expected share: "
         "the profile's held-out rate, then production",
         ("adversarial.bounds_tolerance", "adversarial.bounds_p0", *RATE, *PRODUCTION)),
    Rule("adversarial.coordinate_probing", "adversarial", QUERY_BASED,
         "queries vary one point one or two features at a time over many features: "
         "finite-difference gradient estimation (ZOO)",
         "-log10 binomial tail of the client's axis-probe share",
         "axis probe = 1-2 features (beyond two precision steps) off at least 5 of the "
         "client's last 32 queries; expected share from production (floor probe_p0)",
         ("adversarial.probe_p0", *RATE, *PRODUCTION)),
    Rule("adversarial.line_search", "adversarial", QUERY_BASED,
         "queries lie on lines through earlier queries, between them: the binary and "
         "step-size searches of decision-based attacks (HopSkipJump, Boundary, Sign-OPT)",
         "-log10 binomial tail of the client's line-step share",
         "line step = between the nearest earlier distinct query and a farther one, within "
         "a sine of 0.01 plus rounding, moving more than a quarter of the features; expected "
         "share from production (floor line_p0)",
         ("adversarial.line_p0", *RATE, *PRODUCTION)),
    Rule("extraction.prada", "extraction", EXTRACT,
         "distances between a client's successive distinct queries far from normal (PRADA)",
         "1 - Shapiro-Wilk W (fires when W < delta)",
         "delta: the W that simulated honest streams of the profile's data reach at "
         "prada_quantile, minus prada_margin",
         ("extraction.prada_delta", "extraction.prada_quantile", "extraction.prada_margin",
          "extraction.prada_min_distances", "extraction.prada_every", "extraction.prada_window")),
    Rule("extraction.synthetic_queries", "extraction", EXTRACT,
         "most of a client's queries lie off the training distribution",
         "off-distribution share of recent queries",
         "share threshold configured; its rate test uses the production-calibrated expected share",
         ("extraction.synthetic_min_queries", "extraction.synthetic_min_share",
          "extraction.surprise", *PRODUCTION)),
    Rule("extraction.gradient_steps", "extraction", EXTRACT,
         "queries step from earlier ones by a gradient sign in nearly every feature (JbDA)",
         "-log10 binomial tail of the client's step share",
         "expected share: twice the profile's held-out rate (floor step_p0), then production",
         ("extraction.step_p0", "extraction.step_min_flagged", "extraction.surprise",
          *PRODUCTION)),
    Rule("extraction.query_coverage", "extraction", EXTRACT,
         "a high-volume client sweeps every class evenly with almost no repeated records",
         "class entropy relative to the population's",
         "volume against the population's 95th percentile of per-client volumes",
         ("extraction.coverage_min_queries", "extraction.coverage_min_entropy",
          "extraction.coverage_min_distinct", "extraction.coverage_volume_factor")),
    Rule("extraction.boundary_probing", "extraction", EXTRACT,
         "a large share of a client's fresh queries are answered with a low margin",
         "low-margin share of recent fresh queries",
         "share threshold configured",
         ("extraction.boundary_min_queries", "extraction.boundary_min_share",
          "extraction.surprise")),
    Rule("extraction.collusion", "extraction", EXTRACT,
         "several client ids behind one source IP together query like an extraction attack",
         "pooled off-distribution share, or -log10 tail of pooled gradient steps",
         "pooled by source IP per population epoch; expected shares as for the single-client rules",
         ("extraction.collusion_min_ids", "extraction.collusion_min_step_share",
          "population.epoch_s", *PRODUCTION)),
    Rule("extraction.key_minting", "extraction", EXTRACT,
         "one source IP brings new client ids into a model faster than honest sources do: "
         "keys minted for a distributed (sybil) extraction",
         "new client ids from the source in the current epoch",
         "population.factor x the minting_quantile of sources' new ids per past epoch, "
         "never below minting_min_ids",
         ("extraction.minting_min_ids", "extraction.minting_quantile", "population.factor",
          "population.min_clients", "population.epoch_s")),
    Rule("poisoning.label_flip", "poisoning", POISON,
         "rows of one class look like another class's: labels flipped",
         "the stronger of: z of the class-mean shift along the Fisher direction between two "
         "classes; -log10 tail of rows of one label that one of the profile's reference "
         "classifiers (nearest neighbours, logistic regression) puts in another class",
         "against recent clean batches of the source, else the profile (its classifiers' "
         "cross-validated agreement with the labels)",
         ("poisoning.flip_z", "poisoning.flip_surprise", "poisoning.min_rows",
          "poisoning.recent_batches")),
    Rule("poisoning.trigger_spike", "poisoning", POISON,
         "a feature piles up in a value range rare in clean data (a backdoor trigger)",
         "bin share over its reference share",
         "reference: the profile's histogram and recent clean batches",
         ("poisoning.spike_ratio", "poisoning.spike_min_share", "poisoning.min_rows")),
    Rule("poisoning.out_of_bounds", "poisoning", POISON,
         "values far beyond the training range, or piled just beyond one edge of one feature",
         "share of values far beyond per row; or -log10 tail of values beyond one edge, "
         "corrected over features and edges",
         "reference: the profile's bounds and recent clean batches",
         ("poisoning.out_of_bounds_share", "poisoning.pile_surprise", "poisoning.spike_min_share",
          "poisoning.min_rows")),
    Rule("poisoning.duplicates", "poisoning", POISON,
         "duplicated rows far above the reference's share",
         "duplicate share of the batch",
         "the profile's duplicate rate and recent clean batches, plus duplicate_share",
         ("poisoning.duplicate_share", "poisoning.min_rows")),
)

RULES: dict[str, Rule] = {rule.name: rule for rule in _RULES}


def markdown_table() -> str:
    """The README's rule table (``tests/test_rules.py`` keeps the README in step)."""
    rows = ["| rule | family | ATLAS | signal | score against threshold | expected honest value from |",
            "|---|---|---|---|---|---|"]
    for r in RULES.values():
        rows.append(f"| `{r.name}` | {r.family} | {', '.join(r.techniques)} | {r.summary} | "
                    f"{r.score} | {r.calibration} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
