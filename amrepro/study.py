"""The study of a sweep: what a method does over a layer's targets. numpy only, no MLflow, no printing.

Every target of a sweep starts from the same seeds, so the sweep answers four questions for the layer:
- above chance: the targets whose seeds agree more than chance (each target's own verdict, counted);
- specific: the targets whose seeds agree with each other more than with the runs of the *other* targets of the
  sweep, different seeds only (specificity.per_target: the --controls test, with the sweep's targets as controls);
- seed spread: per target, how far the activation reached by different seeds differs (min, max, median, CV);
- real text: per target, whether the best and the median seed beat the corpus max and its 99th percentile.

Multiple testing. A layer's specificity is T one-sided tests, one per target. The question is a fraction of the
layer, so the study controls the false discovery rate (Benjamini-Hochberg at ALPHA): among the targets it calls
specific, at most ALPHA are expected to be false, whatever T is. A family-wise correction (Holm) would ask for
p < ALPHA / T of the best target and so miss most real effects of a 64-target layer; uncorrected, a layer of
targets with no specificity would still show about ALPHA of them specific.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import metrics
from .specificity import per_target
from .stats import ALPHA, REPRODUCIBILITY
from .verdict import decisions

FDR = ALPHA  # Benjamini-Hochberg level of the per-target specificity tests
CORPUS_FLAGS = ("best_beats_max", "median_beats_max", "best_beats_p99", "median_beats_p99")  # against_corpus


@dataclass(frozen=True)
class TargetRuns:
    """One target of a sweep, as its parent run holds it."""
    name: str
    seeds: tuple[int, ...]  # the seeds of its finite runs, in order
    ids: np.ndarray  # [runs, pos] decoded token ids of those runs
    decoded: np.ndarray  # [runs] activation of the decoded tokens as real input
    final: np.ndarray | None = None  # [runs] the continuous optimum (adam), None for a token method
    above_chance: bool | None = None  # its verdict: some claim that seeds agree passed (None: no statistics)


def record(outcome) -> TargetRuns:
    """A target's TargetRuns from its experiment.Outcome: its finite runs; the continuous optimum for adam only
    (the other methods' results are tokens, whose activation is the decoded one)."""
    ok, stats = outcome.ok, outcome.summary["statistics"]
    return TargetRuns(outcome.target.name, tuple(s for s, keep in zip(outcome.result.seeds, ok) if keep),
                      np.asarray(outcome.ids)[ok], np.asarray(outcome.decoded_activation, dtype=float)[ok],
                      np.asarray(outcome.result.final_activation, dtype=float)[ok]
                      if outcome.config.method == "adam" else None,
                      None if stats is None else any(decisions(stats)[s.claim] for s in REPRODUCIBILITY))


def benjamini_hochberg(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) of p [T], in p's order: reject where q < level."""
    p = np.asarray(p, dtype=float)  # [T]
    order = np.argsort(p, kind="stable")
    ranked = p[order] * p.size / np.arange(1, p.size + 1)  # [T]: p_(k) * T / k
    q = np.minimum.accumulate(ranked[::-1])[::-1]  # the smallest over every larger rank
    return np.minimum(q, 1.0)[np.argsort(order)]  # back in p's order


def spread(values) -> dict:
    """min, max, median and coefficient of variation (sample std, ddof=1, over |mean|) of one target's seeds;
    cv is None with one seed or a mean of 0."""
    v = np.asarray(values, dtype=float)  # [runs]
    mean = float(v.mean())
    cv = float(v.std(ddof=1) / abs(mean)) if v.size > 1 and mean != 0 else None
    return {"min": float(v.min()), "max": float(v.max()), "median": float(np.median(v)), "cv": cv, "n": int(v.size)}


def distribution(values) -> dict:
    """Over the layer's targets (None skipped): n, min, quartiles, median, max."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not v.size:
        return {"n": 0}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"n": int(v.size), "min": float(v.min()), "q1": float(q1), "median": float(med), "q3": float(q3),
            "max": float(v.max())}


def cross_target(targets: list[TargetRuns], seed: int = 0, n_perm: int = 1999) -> dict:
    """Specificity against the sweep's other targets on the Jaccard of decoded token sets (what every method returns),
    for the targets with a finite run from every seed (a diverged run would leave a target without its seed's pair)."""
    seeds = max((t.seeds for t in targets), key=len, default=())
    tested = [t for t in targets if t.seeds == seeds]
    out = {"measure": "Jaccard of decoded token sets", "n_tested": len(tested),
           "excluded": [t.name for t in targets if t.seeds != seeds], "correction": f"Benjamini-Hochberg FDR {FDR}",
           "per_target": {}}
    if len(tested) < 2 or len(seeds) < 2:
        return {**out, "frac_specific": None}
    ids = np.concatenate([t.ids for t in tested])  # [T * runs, pos]: row t * runs + s
    test = per_target(metrics.pairwise_jaccard(ids), len(tested), len(seeds), seed=seed, n_perm=n_perm)
    q = benjamini_hochberg(test["p"])
    for k, t in enumerate(tested):
        out["per_target"][t.name] = {"within": test["within"][k], "across": test["across"][k],
                                     "difference": test["difference"][k], "p": test["p"][k], "q": float(q[k]),
                                     "specific": bool(q[k] < FDR)}
    n_specific = int((q < FDR).sum())
    return {**out, "n_specific": n_specific, "frac_specific": n_specific / len(tested), "n_permutations": n_perm}


def against_corpus(decoded, corpus_max: float, corpus_p99: float) -> dict:
    """Whether the best and the median seed's decoded activation beat the corpus max and its 99th percentile."""
    best, median = float(np.max(decoded)), float(np.median(decoded))
    return {"best": best, "median": median, "corpus_max": float(corpus_max), "corpus_p99": float(corpus_p99),
            "best_beats_max": best > corpus_max, "median_beats_max": median > corpus_max,
            "best_beats_p99": best > corpus_p99, "median_beats_p99": median > corpus_p99}


def _fraction(flags) -> float | None:
    flags = [f for f in flags if f is not None]
    return sum(bool(f) for f in flags) / len(flags) if flags else None


def study(targets: list[TargetRuns], corpus: dict[str, tuple[float, float]] | None = None, seed: int = 0,
          n_perm: int = 1999) -> dict:
    """The four questions, per target and for the layer (corpus: name -> (max, p99)); JSON-serialisable."""
    spec = cross_target(targets, seed, n_perm)
    rows = []
    for t in targets:
        test = spec["per_target"].get(t.name, {})
        row = {"target": t.name, "n_runs": len(t.seeds), "above_chance": t.above_chance,
               "specific": test.get("specific"), "p_specific": test.get("p"), "q_specific": test.get("q"),
               "decoded": spread(t.decoded) if t.seeds else None,
               "final": None if t.final is None or not t.seeds else spread(t.final)}
        if corpus is not None and t.name in corpus and t.seeds:
            row["corpus"] = against_corpus(t.decoded, *corpus[t.name])
        rows.append(row)
    layer = {"n_targets": len(targets), "frac_above_chance": _fraction(r["above_chance"] for r in rows),
             "frac_specific": spec["frac_specific"], "specificity": {k: v for k, v in spec.items() if k != "per_target"},
             "spread": {f"{kind}_{key}": distribution(r[kind][key] for r in rows if r[kind] is not None)
                        for kind in ("decoded", "final") for key in ("cv", "min", "max", "median")}}
    if corpus is not None:
        layer.update({f"frac_{key}": _fraction(r["corpus"][key] for r in rows if "corpus" in r)
                      for key in CORPUS_FLAGS})
    return {"targets": rows, "layer": layer}


COLUMNS = ("method", "n_targets", "frac_above_chance", "frac_specific", "median_seed_cv", "median_seed_range",
           "frac_best_beats_corpus_max", "frac_median_beats_corpus_max", "frac_best_beats_corpus_p99",
           "s_per_target")


def table_row(method: str, result: dict, seconds: float) -> dict:
    """The study table's row of one method: its layer summary (study()) and its wall time per target."""
    layer, rows = result["layer"], result["targets"]
    ranges = [r["decoded"]["max"] - r["decoded"]["min"] for r in rows if r["decoded"] is not None]
    return {"method": method, "n_targets": layer["n_targets"], "frac_above_chance": layer["frac_above_chance"],
            "frac_specific": layer["frac_specific"], "median_seed_cv": layer["spread"]["decoded_cv"].get("median"),
            "median_seed_range": float(np.median(ranges)) if ranges else None,
            "frac_best_beats_corpus_max": layer.get("frac_best_beats_max"),
            "frac_median_beats_corpus_max": layer.get("frac_median_beats_max"),
            "frac_best_beats_corpus_p99": layer.get("frac_best_beats_p99"),
            "s_per_target": seconds / layer["n_targets"] if layer["n_targets"] else None}


def target_columns(result: dict) -> dict[str, list]:
    """study_targets.json: one row per target (a log_table for the MLflow UI)."""
    rows = result["targets"]
    columns = {k: [r[k] for r in rows] for k in ("target", "n_runs", "above_chance", "specific", "p_specific",
                                                 "q_specific")}
    columns.update({f"{kind}_{stat}": [None if r[kind] is None else r[kind][stat] for r in rows]
                    for kind in ("decoded", "final") for stat in ("min", "max", "median", "cv")})
    for key in ("corpus_max", "corpus_p99", *CORPUS_FLAGS):
        columns[key] = [r["corpus"][key] if "corpus" in r else None for r in rows]
    return columns


def layer_metrics(result: dict) -> dict[str, float]:
    """study/* metrics of a sweep run: the layer's fractions and the median seed spread."""
    layer = result["layer"]
    fractions = ("frac_above_chance", "frac_specific", *(f"frac_{key}" for key in CORPUS_FLAGS))
    out = {f"study/{key}": float(layer[key]) for key in fractions if layer.get(key) is not None}
    return out | {f"study/median_{key}": s["median"] for key, s in layer["spread"].items()
                  if key in ("decoded_cv", "final_cv") and s.get("n")}


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def words(result: dict) -> str:
    """The layer in one paragraph."""
    layer = result["layer"]
    spec, cv = layer["specificity"], layer["spread"]["decoded_cv"]
    text = (f"Study of {layer['n_targets']} targets: seeds agree above chance for {_pct(layer['frac_above_chance'])}; "
            f"specific to their target (vs the sweep's other targets, different seeds, {spec['measure']}, "
            f"{spec['correction']}) for {_pct(layer['frac_specific'])} of {spec['n_tested']} tested")
    if cv.get("n"):
        text += (f"; seed spread of the decoded activation: CV median {cv['median']:.2f} "
                 f"(quartiles {cv['q1']:.2f}-{cv['q3']:.2f})")
    if "frac_best_beats_max" in layer:
        text += (f"; real text: the best seed beats the corpus max for {_pct(layer['frac_best_beats_max'])}, the "
                 f"median seed for {_pct(layer['frac_median_beats_max'])} (99th percentile: best "
                 f"{_pct(layer['frac_best_beats_p99'])}, median {_pct(layer['frac_median_beats_p99'])})")
    return text + "."


def markdown_table(rows: list[dict]) -> str:
    """The study table as markdown, for the top run's description in the MLflow UI."""
    def cell(key, value):
        if value is None or key.startswith("frac_"):
            return _pct(value)
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(k, r.get(k)) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)
