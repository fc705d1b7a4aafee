"""The statistics registry: one row per statistic of the decoded tokens, and the thresholds every claim uses.

It drives everything downstream, so a name is written once: nulls.py gives every statistic a distribution under
each null and a one-sided p-value (direction below); metrics.py logs its value, coincidence count, null intervals
and p-values under the names below; verdict.py turns each claim into a 0/1 flag verdict/<claim> and a sentence;
report.py, sweep.table and compare.row show them in this order, with these labels and columns. A new token
statistic is one Statistic here plus its arithmetic in nulls.draw_stats, which computes the observed runs'
statistics and each null draw's alike (the same code, so observed and chance compare).

Direction: larger=True means a larger value is more agreement between runs, so p counts the null draws as large
or larger; larger=False (the unique count) means a smaller value is. Events: the coincidences that make up the
statistic (nulls["events"][events], logged as stats/<events>); no claim rests on fewer than MIN_EVENTS of them.
What a claim supports: "reproducibility" (seeds agree: the question amrepro answers, counted by sweeps), or
"method" (a property of the method's results that says nothing about whether seeds agree).
"""

from __future__ import annotations

from dataclasses import dataclass

ALPHA = 0.05  # the one threshold every claim (verdict, specificity, sweep) uses
MIN_EVENTS = 2  # a single coincidence is never evidence
INTERVAL = (2.5, 97.5)  # percentiles of every 95% interval (nulls.interval)
PRIMARY = "decoded_starts"  # the primary null: the method's own starts, decoded as its results are
NULLS = (PRIMARY, "uniform")  # every null, the primary first


@dataclass(frozen=True)
class Statistic:
    key: str  # its key in nulls.draw_stats, in each null's dict and in the statistics' "observed" dict
    label: str  # what the terminal, the verdict and the sweep summary call it
    event: tuple[str, str]  # one coincidence, several: "(3 repeats across runs)"
    larger: bool = True  # True: larger is agreement; False: smaller is (see the module docstring)
    events: str = ""  # the key of its coincidence count in nulls["events"], logged as stats/<events>; default: key
    short: str = ""  # null/<null>/<short>_{mean,low,high}, pvalue/<short>_<null>, column p_<short>; default: key
    metric: str = ""  # the observed value's MLflow metric (stats/<key>)
    column: str = ""  # its column in compare_table.json (and metric compare/<method>/<column>); default: short
    sweep_column: str = ""  # its column in sweep_table.json, when it differs from column (names logged before)
    claim: str = ""  # the verdict/<claim> flag it decides; "" for a statistic that is only reported
    supports: str = ""  # "reproducibility" or "method": what the claim is evidence of
    says: str = ""  # the claim in words, after "<label> <value> (...; chance ..., p = ...): "; {null} = its name
    pairwise: bool = False  # needs two runs or more: None with a single run
    digits: int = 3  # digits of the observed value and of its chance level
    count: bool = False  # an integer count: its interval's ends are shown as counts
    uniform_column: bool = False  # compare also shows p_<short>_uniform

    def __post_init__(self):  # fills the names left "" (frozen: object.__setattr__ is the one way in)
        for name, default in (("events", self.key), ("short", self.key), ("metric", f"stats/{self.key}"),
                              ("column", self.short or self.key)):
            object.__setattr__(self, name, getattr(self, name) or default)

    def null_metric(self, null: str, part: str) -> str:
        return f"null/{null}/{self.short}_{part}"

    def pvalue_metric(self, null: str) -> str:
        return f"pvalue/{self.short}_{null}"

    @property
    def p_column(self) -> str:
        return f"p_{self.short}"


REGISTRY = (
    # the reference's statistic (numpy.unique over runs x n_tokens): reported with its chance levels, but its
    # repeats mix two things, so no claim rests on it; the two rows after it split them
    Statistic("n_unique", "unique tokens", ("repeated token", "repeated tokens"), larger=False, events="repeats",
              short="unique", metric="stats/n_unique_tokens", column="n_unique", sweep_column="n_unique_tokens",
              digits=2, count=True, uniform_column=True),
    # a token held by k >= 2 different runs is k - 1 repeats across runs: seeds agreeing on a token
    Statistic("cross_run_repeats", "repeats across runs", ("repeat across runs", "repeats across runs"),
              claim="unique_below_chance", supports="reproducibility", pairwise=True, digits=2, count=True,
              says="more than {null} give, so the unique count is below chance under {null}: different runs "
                   "decode to the same tokens"),
    # a run repeating a token inside its own sequence ('ynamic' 'ynamic'): about the method, not about seeds
    Statistic("within_run_repeats", "repeats within runs", ("repeat within a run", "repeats within runs"),
              claim="within_run_repeats_above_chance", supports="method", digits=2, count=True,
              says="more than {null} give: the method repeats tokens inside its own sequences, which says "
                   "nothing about whether seeds agree"),
    Statistic("positional_agreement", "positional agreement",
              ("run pair decodes the same token at the same position", "run-pair positions with the same token"),
              events="agreeing_positions", short="agreement", claim="agreement_above_chance",
              supports="reproducibility", pairwise=True,
              says="above chance under {null}, runs decode to the same token at the same position more often "
                   "than chance"),
    Statistic("jaccard_mean", "Jaccard of token sets",
              ("token shared by a pair of runs", "tokens shared, summed over pairs of runs"),
              events="shared_tokens", short="jaccard", claim="jaccard_above_chance", supports="reproducibility",
              pairwise=True, says="above chance under {null}, runs share tokens more than chance, evidence that AM "
                                  "converges to preferred tokens"),
)
CLAIMS = tuple(s for s in REGISTRY if s.claim)  # the statistics that decide a verdict/* flag
REPRODUCIBILITY = tuple(s for s in CLAIMS if s.supports == "reproducibility")
