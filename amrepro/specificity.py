"""Target specificity (--controls K): are runs of a target more alike than runs of *different* targets of the
same site? numpy only, no torch, no MLflow.

The batch holds T = 1 + K targets (target 0 is the user's, then the K controls) x the same `runs` seeds: row
(t, s) of every target starts from the same vector. Runs of different targets from the same seed therefore share
their start, and on real models that alone makes them alike (SmolLM2: Jaccard 0.11-0.20, matched cosine ~0.8).
So the test compares like with like:

  within  = pairs of runs of the same target from different seeds
  across  = pairs of runs of different targets from different seeds
  same-seed = pairs of runs of different targets from the same seed (shared start: reported, never tested)

statistic = mean(within) - mean(across), for the Jaccard of decoded token sets and for the matched cosine of final
embeddings (metrics.pairwise_jaccard / pairwise_matched_cosine). Null: the target does not matter, so within each
seed the T rows are exchangeable; the permutation test shuffles which row is which target *within each seed*
(stratified), which keeps every pair's same-seed/different-seed status and thus the shared-start confound.
One-sided p = (1 + #{permuted statistic >= observed}) / (1 + n_perm), from a seeded generator. Two measures are
tested, so the words claim an effect only where the Holm-adjusted p (over the two) is below 0.05.
"""

from __future__ import annotations

import math

import numpy as np

from . import metrics
from .config import AmreproError
from .stats import ALPHA  # the only threshold the words use
_CONTROL_STREAM = 7  # default_rng([seed, 7]): the control draw never shares a stream with other seed-derived draws
_PERM_STREAM = 8
_CHUNK = 256  # permutations evaluated at once ([chunk, N, N] booleans)


def choose_controls(index: int, width: int, k: int, seed: int, site: str = "the site") -> list[int]:
    """K distinct indices of the same site other than `index`, drawn reproducibly from the seed, ascending."""
    if not 0 <= k < width:
        raise AmreproError(f"--controls {k} is out of range for {site}, which has {width} dimensions: "
                           f"K other targets need 0 <= K <= {width - 1}.")
    others = np.delete(np.arange(width), index)  # [width - 1]
    return sorted(int(i) for i in np.random.default_rng([seed, _CONTROL_STREAM]).choice(others, k, replace=False))


def _pair_means(matrix: np.ndarray, same_target: np.ndarray, diff_seed: np.ndarray) -> tuple:
    """(within, across) means of a [N, N] matrix for label masks same_target [B, N, N] (B label assignments)."""
    within = same_target & diff_seed  # [B, N, N]
    across = ~same_target & diff_seed
    w = (within * matrix).sum(axis=(1, 2)) / within.sum(axis=(1, 2))  # [B]
    a = (across * matrix).sum(axis=(1, 2)) / across.sum(axis=(1, 2))  # [B]
    return w, a


def _permutations(T: int, runs: int, seed: int, n_perm: int) -> np.ndarray:
    """[n_perm, T * runs] target labels: within each seed (column), which target each of the T rows is, shuffled
    from a seeded generator (the stratified null: the target does not matter)."""
    rng = np.random.default_rng([seed, _PERM_STREAM])
    grid = np.broadcast_to(np.arange(T)[:, None], (T, runs))  # [T, runs]
    return np.stack([rng.permuted(grid, axis=0).reshape(-1) for _ in range(n_perm)])  # [n_perm, N]


def per_target(matrix: np.ndarray, T: int, runs: int, seed: int = 0, n_perm: int = 1999) -> dict:
    """specificity()'s test, one target t at a time (mean within-t minus mean t-vs-others similarity, different
    seeds only; the same stratified null). matrix [N, N]: a similarity of the T * runs rows (row t * runs + s: target
    t, seed s). Returns {"within", "across", "difference", "p"}, each a list over the T targets (p uncorrected)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (T * runs, T * runs) or T < 2 or runs < 2:
        raise ValueError(f"matrix {matrix.shape} must be [T*runs, T*runs] with T >= 2 and runs >= 2")
    seeds = np.tile(np.arange(runs), T)  # [N]
    masked = matrix * (seeds[:, None] != seeds[None, :])  # [N, N]: different-seed pairs only
    pairs = runs * (runs - 1)  # different-seed pairs of one target pair (t, u), t == u included

    def blocks(rows: np.ndarray) -> np.ndarray:
        """[T] within and [T] across means when rows[t * runs + s] is the run labelled (t, s)."""
        sums = masked[np.ix_(rows, rows)].reshape(T, runs, T, runs).sum(axis=(1, 3))  # [T, T]
        diag = np.diag(sums)
        return np.stack([diag / pairs, (sums.sum(axis=1) - diag) / (pairs * (T - 1))])  # [2, T]

    w, a = blocks(np.arange(T * runs))
    observed = w - a  # [T]
    extreme = np.zeros(T, dtype=int)
    for labels in _permutations(T, runs, seed, n_perm):  # labels[i]: the target row i plays
        # the run labelled (t, s) is the row of seed s whose label is t
        rows = np.empty(T * runs, dtype=int)
        rows[labels * runs + seeds] = np.arange(T * runs)
        pw, pa = blocks(rows)
        extreme += (pw - pa) >= observed - 1e-12  # ties count as extreme, as in specificity()
    return {"within": w.tolist(), "across": a.tolist(), "difference": observed.tolist(),
            "p": ((1 + extreme) / (1 + n_perm)).tolist(), "n_permutations": n_perm}


def specificity(ids: np.ndarray, final: np.ndarray, names: list[str], seed: int = 0, n_perm: int = 1999) -> dict:
    """ids [T, runs, pos] decoded tokens, final [T, runs, pos, d_model] final embeddings, names [T] the targets
    (the user's first); seed seeds the permutations. A JSON-serialisable dict with a flat `metrics` dict."""
    ids, final = np.asarray(ids), np.asarray(final, dtype=np.float64)
    T, runs, pos = ids.shape
    if final.shape[:3] != ids.shape or len(names) != T or T < 2:
        raise ValueError(f"ids {ids.shape}, final {final.shape[:3]} and {len(names)} names must agree, T >= 2")
    labels = np.repeat(np.arange(T), runs)  # [N]: row t*runs + s is target t, seed s
    seeds = np.tile(np.arange(runs), T)  # [N]
    diff_seed = seeds[:, None] != seeds[None, :]  # [N, N]
    same_target = labels[:, None] == labels[None, :]  # [N, N]
    matrices = {"jaccard": metrics.pairwise_jaccard(ids.reshape(T * runs, pos)),
                "cosine": metrics.pairwise_matched_cosine(final.reshape(T * runs, pos, -1))[0]}
    same_seed_pairs = ~same_target & ~diff_seed
    np.fill_diagonal(same_seed_pairs, False)
    out: dict = {"targets": list(names), "n_targets": T, "n_runs": runs, "n_permutations": n_perm,
                 # the statistic is unchanged when every seed's labels are relabelled alike: (T!)^(runs-1) distinct
                 # assignments, so p cannot go below about their inverse
                 "log10_distinct_assignments": (runs - 1) * math.lgamma(T + 1) / math.log(10),
                 "test": "one-sided permutation test, target labels shuffled within each seed; "
                         "statistic = mean within-target minus mean across-target similarity, different seeds only",
                 "alpha": ALPHA}
    if runs < 2:  # no pair of different seeds: nothing to compare like with like
        for key, m in matrices.items():
            out[key] = {"same_seed": float(m[same_seed_pairs].mean()), "within": None, "across": None, "p": None}
        out["metrics"] = {f"specificity/{key}_same_seed": out[key]["same_seed"] for key in matrices}
        return out

    perms = _permutations(T, runs, seed, n_perm)  # [n_perm, N]
    null = {key: np.empty(n_perm) for key in matrices}
    for start in range(0, n_perm, _CHUNK):
        chunk = perms[start:start + _CHUNK]  # [B, N]
        same = chunk[:, :, None] == chunk[:, None, :]  # [B, N, N]
        for key, m in matrices.items():
            w, a = _pair_means(m, same, diff_seed)
            null[key][start:start + len(chunk)] = w - a

    flat = {}
    for key, m in matrices.items():
        (w,), (a,) = _pair_means(m, same_target[None], diff_seed)
        observed = w - a
        # a tiny tolerance so that permutations tying with the observed value (e.g. a relabelling that changes
        # nothing) count as "at least as extreme" despite float summation order
        extreme = int((null[key] >= observed - 1e-12).sum())
        sd = float(null[key].std())
        block = diff_seed[:runs, :runs]  # [runs, runs]: the different-seed pairs of one target's runs
        within_t = [float(m[t * runs:(t + 1) * runs, t * runs:(t + 1) * runs][block].mean()) for t in range(T)]
        out[key] = {"within": float(w), "across": float(a), "same_seed": float(m[same_seed_pairs].mean()),
                    "difference": float(observed), "null_mean": float(null[key].mean()), "null_std": sd,
                    "z": float((observed - null[key].mean()) / sd) if sd > 0 else None,
                    "p": (1 + extreme) / (1 + n_perm), "within_per_target": within_t}
        flat.update({f"specificity/{key}_within": w, f"specificity/{key}_across": a,
                     f"specificity/{key}_same_seed": out[key]["same_seed"],
                     f"specificity/{key}_difference": observed, f"pvalue/specificity_{key}": out[key]["p"]})
    # Holm over the two measures: the smaller p times 2, the larger at least that (and both capped at 1)
    (low, p_low), (high, p_high) = sorted(((k, out[k]["p"]) for k in matrices), key=lambda kp: kp[1])
    out[low]["p_holm"] = min(1.0, 2 * p_low)
    out[high]["p_holm"] = min(1.0, max(out[low]["p_holm"], p_high))
    out["metrics"] = {k: float(v) for k, v in flat.items()}
    return out


def specificity_words(spec: dict) -> str:
    """One or two sentences for the verdict; 'more alike' only where the Holm-adjusted p < ALPHA (two measures
    are tested), always with the numbers and the difference."""
    k = spec["n_targets"] - 1
    jac, cos = spec["jaccard"], spec["cosine"]
    same = (f"Same-seed pairs of different targets (shared start, not tested): Jaccard {jac['same_seed']:.3f}, "
            f"matched cosine {cos['same_seed']:.3f}.")
    if jac["p"] is None:
        return f"Specificity against {k} control target(s) cannot be tested with one run per target. {same}"
    shown = {"Jaccard": (jac, "Jaccard"), "cosine": (cos, "matched cosine")}
    # the difference is the effect size: with many runs a tiny one can be significant, and it must show
    parts = {name: f"{label} within {d['within']:.3f} vs across {d['across']:.3f}, difference {d['difference']:+.2g}, "
                   f"p = {d['p']:{'.2g' if d['p'] >= 0.0001 else '.1e'}}"
                   + (f", Holm {d['p_holm']:.2g}" if d["p"] < ALPHA else "")
             for name, (d, label) in shown.items()}
    significant = [name for name, (d, _) in shown.items() if d["p_holm"] < ALPHA]
    head = f"Specificity against {k} control target(s) of the same site, different seeds only: "
    if significant:
        rest = [parts[n] for n in shown if n not in significant]
        words = (head + "runs of the same target are more alike than runs of different targets ("
                 + "; ".join(parts[n] for n in significant) + ")")
        words += f"; no evidence from the other measure ({rest[0]})." if rest else "."
    else:
        words = (head + "no evidence that runs of the same target are more alike than runs of different targets ("
                 + "; ".join(parts.values()) + ")" + (" once corrected for testing two measures (Holm)."
                                                      if min(jac["p"], cos["p"]) < ALPHA else "."))
    if spec["log10_distinct_assignments"] < -math.log10(ALPHA):
        words += " Too few runs for the test to reach p < 0.05."
    return f"{words} {same}"
