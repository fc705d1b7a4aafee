"""Reproducibility statistics on decoded token matrices: numpy only, no torch, no MLflow. Chance levels and
p-values come from nulls.py, the words from verdict.py."""

from __future__ import annotations

import itertools

import numpy as np

from . import nulls, verdict
from .stats import NULLS, PRIMARY, REGISTRY


def unique_summary(ids: np.ndarray, tokens: list[list[str]]) -> dict:
    """The reference's statistic: how many of the runs x positions decoded tokens are distinct
    (numpy.unique, as the reference counts), and which tokens repeat, most frequent first."""
    ids = np.asarray(ids)
    unique, counts = np.unique(ids, return_counts=True)
    text = {int(i): t for row_ids, row in zip(ids, tokens) for i, t in zip(row_ids, row)}
    repeated = sorted(((int(c), int(i)) for i, c in zip(unique, counts) if c > 1), key=lambda p: (-p[0], p[1]))
    return {
        "n_unique_tokens": int(unique.size),
        "n_tokens_total": int(ids.size),
        "unique_fraction": float(unique.size / ids.size),
        "repeated": [{"id": i, "token": text[i], "count": c} for c, i in repeated],
        # tokens that occur exactly once (the reference's "unique" counts distinct tokens; this list does not
        # pretend a repeated token is unique), and every distinct token with its count
        "unique": [{"id": int(i), "token": text[int(i)], "count": 1} for i, c in zip(unique, counts) if c == 1],
        "counts": [{"id": int(i), "token": text[int(i)], "count": int(c)} for i, c in zip(unique, counts)],
    }


# --- reproducibility statistics --------------------------------------------------------------------------
#
# Every pairwise statistic is first computed as a [runs, runs] matrix, then averaged over pairs of distinct
# runs. The bootstrap reuses those matrices with run multiplicities as weights, so a resample never re-runs
# the (possibly exponential) matching.

EXACT_MATCHING_MAX_POS = 8  # 8! = 40320 permutations per pair of runs; above that, greedy matching


def pairwise_agreement(ids: np.ndarray) -> np.ndarray:
    """[runs, runs]: fraction of positions at which two runs decode to the same token."""
    ids = np.asarray(ids)  # [runs, pos]
    return (ids[:, None, :] == ids[None, :, :]).mean(axis=-1)  # [runs, runs]


def pairwise_jaccard(ids: np.ndarray) -> np.ndarray:
    """[runs, runs]: |A ∩ B| / |A ∪ B| of the two runs' token sets (order and repeats ignored)."""
    ids = np.asarray(ids)  # [runs, pos]
    _, compact = np.unique(ids, return_inverse=True)  # token ids -> 0..K-1
    member = np.zeros((ids.shape[0], compact.max() + 1))  # [runs, K]: run contains token
    member[np.arange(ids.shape[0])[:, None], compact.reshape(ids.shape)] = 1.0
    inter = member @ member.T  # [runs, runs]
    size = member.sum(axis=1)  # [runs]
    return inter / (size[:, None] + size[None, :] - inter)  # sets are never empty: pos >= 1


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # a zero vector stays zero


def _greedy_matching(sim: np.ndarray) -> float:
    """Sum of a one-to-one matching built by repeatedly taking the largest remaining entry."""
    total, used_rows, used_cols = 0.0, set(), set()
    for flat in np.argsort(-sim, axis=None):
        i, j = divmod(int(flat), sim.shape[1])
        if i not in used_rows and j not in used_cols:
            total += sim[i, j]
            used_rows.add(i)
            used_cols.add(j)
    return total


def pairwise_matched_cosine(final: np.ndarray) -> tuple[np.ndarray, str]:
    """[runs, runs]: mean cosine of two runs' final vectors after the best one-to-one matching of positions
    (so the same inputs in another order still count as the same), and how the matching was found."""
    final = np.asarray(final, dtype=np.float64)  # [runs, pos, d_model]
    runs, pos = final.shape[:2]
    exact = pos <= EXACT_MATCHING_MAX_POS
    perms = np.array(list(itertools.permutations(range(pos)))) if exact else None  # [pos!, pos]
    out = np.ones((runs, runs))
    for a, b in itertools.combinations(range(runs), 2):
        sim = _unit(final[a]) @ _unit(final[b]).T  # [pos, pos] cosines
        best = sim[np.arange(pos), perms].sum(axis=1).max() if exact else _greedy_matching(sim)
        out[a, b] = out[b, a] = best / pos
    method = ("exact: brute force over all pos! permutations (the optimal assignment)" if exact
              else f"greedy: pos > {EXACT_MATCHING_MAX_POS}, largest cosine first (a lower bound on the optimum)")
    return out, method


def pairwise_positional_cosine(final: np.ndarray) -> np.ndarray:
    """[runs, runs]: mean cosine of two runs' final vectors at the same position (no matching)."""
    unit = _unit(np.asarray(final, dtype=np.float64))  # [runs, pos, d_model]
    return np.einsum("apd,bpd->abp", unit, unit).mean(axis=-1)  # [runs, runs]


def pair_mean(matrix: np.ndarray, counts: np.ndarray | None = None) -> float:
    """Mean of a symmetric [runs, runs] matrix over pairs of *different* runs, each run weighted by how often
    it was drawn (counts; all ones = every pair once). A run paired with itself is never counted: it would
    fake agreement. NaN when fewer than two different runs are present."""
    counts = np.ones(matrix.shape[0]) if counts is None else np.asarray(counts, dtype=float)
    weights = np.outer(counts, counts)  # [runs, runs]
    np.fill_diagonal(weights, 0.0)
    total = weights.sum()
    return float((weights * matrix).sum() / total) if total > 0 else float("nan")


def token_stats(ids: np.ndarray) -> dict[str, float]:
    """nulls.draw_stats of one [runs, pos] matrix (the very arithmetic of the null draws) and the unique
    fraction: for data and baselines alike."""
    ids = np.asarray(ids)  # [runs, pos]
    values = {k: v[0].item() for k, v in nulls.draw_stats(ids[None]).items()}
    return {**values, "unique_fraction": values["n_unique"] / ids.size}


def _spread(values: np.ndarray) -> dict:
    """Mean, std (population, ddof=0: the runs are all there is), min, max and the values themselves."""
    values = np.asarray(values, dtype=float)  # [runs]
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max()), "per_run": values.tolist()}


def _bootstrap(ids, matrices: dict[str, np.ndarray], per_run: dict[str, np.ndarray], n_boot: int,
               rng: np.random.Generator) -> dict:
    """95% intervals over runs resampled with replacement. Pairwise statistics weight runs by how often they
    were drawn but never pair a run with itself; the unique fraction is taken over the distinct runs drawn
    (a run drawn twice would otherwise fake repeated tokens); per-run means use every draw."""
    runs = ids.shape[0]
    values: dict[str, list[float]] = {"unique_fraction": [], **{k: [] for k in matrices}, **{k: [] for k in per_run}}
    for _ in range(n_boot):
        counts = np.bincount(rng.integers(0, runs, size=runs), minlength=runs)  # [runs]
        distinct = ids[counts > 0]  # [distinct runs, pos]
        values["unique_fraction"].append(np.unique(distinct).size / distinct.size)
        for key, matrix in matrices.items():
            values[key].append(pair_mean(matrix, counts))
        for key, per in per_run.items():
            values[key].append(float((counts * per).sum() / runs))
    return {"n_boot": n_boot, **{key: {k: v for k, v in nulls.interval(v).items() if k != "mean"}
                                 for key, v in values.items()}}


CONVERGENCE_WINDOW = 0.1  # the last 10% of epochs
STILL_RISING = 0.01  # a relative rise above 1% over that window: not converged


def start_token_kept(ids: np.ndarray, initial_ids: np.ndarray) -> np.ndarray:
    """[runs]: fraction of each run's final tokens that equal the decoded token of their own start vector."""
    return (np.asarray(ids) == np.asarray(initial_ids)).mean(axis=1)


def convergence(activation) -> dict | None:
    """Is the activation still rising at the end? Per run, the relative change over the last 10% of epochs
    ("definition" below: bounded in [-2, 2], defined even when one end is near 0); None with fewer than 2 epochs."""
    act = np.asarray(activation, dtype=float)  # [epochs, runs]
    epochs = act.shape[0]
    if epochs < 2:
        return None
    window = min(epochs - 1, max(1, int(round(CONVERGENCE_WINDOW * epochs))))  # epochs in the window
    begin, end = act[-1 - window], act[-1]  # [runs] each
    rel = (end - begin) / np.maximum(np.maximum(np.abs(begin), np.abs(end)), 1e-12)  # [runs]
    rising = rel > STILL_RISING
    return {"per_run": rel.tolist(), "still_rising": rising.tolist(), "n_still_rising": int(rising.sum()),
            "frac_still_rising": float(rising.mean()), "window_epochs": window, "threshold": STILL_RISING,
            "definition": "(a_end - a_begin) / max(|a_begin|, |a_end|) over the last 10% of epochs of the "
                          "per-epoch mean target activation; still rising when > threshold"}


def _none_if_nan(stats: dict) -> dict:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in stats.items()}


def _flat_metrics(out: dict) -> dict[str, float]:
    """MLflow-ready float metrics; statistics that do not exist (one run, no primary null, one epoch) are left out."""
    b, i, nulls, kept = out["bootstrap"], out["baselines"]["initial_tokens"], out["nulls"], out["start_token_kept"]
    flat = {
        "stats/unique_fraction": out["unique_fraction"], "stats/n_tokens_total": out["n_tokens_total"],
        "stats/matched_cosine_mean": out["matched_cosine_mean"],
        "stats/positional_cosine_mean": out["positional_cosine_mean"],
        "stats/projection_gap_mean": out["projection_gap"]["mean"],
        "stats/cosine_mean": out["cosine"]["mean"], "stats/cosine_min": out["cosine"]["min"],
        "stats/start_token_kept": kept["mean"], "pvalue/start_token_kept": kept["pvalue"],
        **{f"stats/{k}": v for k, v in nulls["events"].items()},  # repeats, agreeing_positions, shared_tokens, ...
        "baseline/initial_unique": i["n_unique"], "baseline/initial_agreement": i["positional_agreement"],
        "baseline/initial_jaccard": i["jaccard_mean"],
    }
    for stat in REGISTRY:  # observed values, null intervals and p-values, under the registry's names
        if out["observed"][stat.key] is not None:
            flat[stat.metric] = out["observed"][stat.key]
        for null in (n for n in NULLS if n in nulls):
            flat.update({stat.null_metric(null, k): nulls[null][stat.key][k] for k in ("mean", "low", "high")})
            flat[stat.pvalue_metric(null)] = nulls[null][stat.key]["pvalue"]
    for name in ("final_activation", "decoded_activation"):
        flat.update({f"stats/{name}_{k}": out[name][k] for k in ("mean", "std", "min", "max")})
    if (ds := nulls.get(PRIMARY)) is not None:
        flat.update({"null/decoded_starts/start_token_kept_chance": ds["collision_probability"],
                     "null/decoded_starts/pool_size": ds["pool_size"],
                     "null/decoded_starts/pool_distinct": ds["pool_distinct"]})
    flat["null/n_draws"] = nulls["uniform"]["n_draws"]
    if (c := out["convergence"]) is not None:
        flat.update({"converge/act_rel_change_last10pct_mean": float(np.mean(c["per_run"])),
                     "converge/act_rel_change_last10pct_max": float(np.max(c["per_run"])),
                     "converge/frac_runs_still_rising": c["frac_still_rising"]})
    for key, interval in b.items():
        if isinstance(interval, dict):
            flat.update({f"bootstrap/{key}_{k}": v for k, v in interval.items()})
    flat.update({f"verdict/{k}": float(v) for k, v in verdict.decisions(out).items()})
    return {k: float(v) for k, v in flat.items() if v is not None and np.isfinite(v)}


def child_metrics(stats: dict, r: int) -> dict[str, float]:
    """Run r's own share of the parent's statistics, for its child run."""
    out = {"stats/start_token_kept": stats["start_token_kept"]["per_run"][r]}
    if stats["convergence"] is not None:
        out["converge/act_rel_change_last10pct"] = stats["convergence"]["per_run"][r]
        out["converge/still_rising"] = float(stats["convergence"]["still_rising"][r])
    return {k: float(v) for k, v in out.items()}


def reproducibility_stats(ids, final, final_activation, decoded_activation, cosine, initial_ids, vocab_size: int,
                          seed: int = 0, n_boot: int = 1000, start_pool=None, activation=None,
                          n_null: int = nulls.N_DRAWS, start_name: str = "decoded random starts") -> dict:
    """How similar are the runs, and how does that compare with chance? A JSON-serialisable dict.

    final_activation and decoded_activation [runs]: the mean target activation of the final embeddings and of
    their decoded tokens; cosine [runs, pos]: each final vector's cosine to its decoded token; initial_ids: the
    decoded initial embeddings. start_pool [K]: decoded i.i.d. starts (nulls.decoded_start_pool), the primary
    null (start_name: what the verdict calls it); without it the verdict claims nothing. activation [epochs,
    runs]: for the convergence diagnostic. seed seeds the n_boot resamples and n_null draws per null alike."""
    ids, initial_ids = np.asarray(ids), np.asarray(initial_ids)  # [runs, pos] each
    final, cosine = np.asarray(final, dtype=np.float64), np.asarray(cosine, dtype=np.float64)  # [runs, pos(, d)]
    final_act, decoded_act = (np.asarray(a, dtype=np.float64) for a in (final_activation, decoded_activation))
    runs, pos = ids.shape
    if not (initial_ids.shape == cosine.shape == final.shape[:2] == ids.shape
            and final_act.shape == decoded_act.shape == (runs,)):
        raise ValueError(f"ids {ids.shape}, initial_ids {initial_ids.shape}, cosine {cosine.shape}, final "
                         f"{final.shape[:2]} must be [runs, pos], final_activation {final_act.shape} and "
                         f"decoded_activation {decoded_act.shape} [runs]")

    matched, matching = pairwise_matched_cosine(final)
    matrices = {"positional_agreement": pairwise_agreement(ids), "jaccard_mean": pairwise_jaccard(ids),
                "matched_cosine_mean": matched, "positional_cosine_mean": pairwise_positional_cosine(final)}
    tokens = token_stats(ids)  # every registry statistic, as the null draws compute it
    observed = _none_if_nan({**tokens, **{k: pair_mean(m) for k, m in matrices.items()}})
    gap = final_act - decoded_act  # [runs]
    cosine_per_run = cosine.mean(axis=1)  # [runs]
    null = nulls.null_models(ids, vocab_size, start_pool, seed, n_null, start_name)
    initial = _none_if_nan(token_stats(initial_ids))
    kept = start_token_kept(ids, initial_ids)  # [runs]
    n_kept = int((ids == initial_ids).sum())
    chance_kept = null[PRIMARY]["collision_probability"] if PRIMARY in null else None
    per_run = {"final_activation_mean": final_act, "projection_gap_mean": gap, "cosine_mean": cosine_per_run}
    # a generator of its own for the bootstrap, so its draws do not depend on the Monte Carlo's
    bootstrap = _bootstrap(ids, matrices, per_run, n_boot, np.random.default_rng([seed, 1]))
    out = {
        "n_runs": runs, "n_positions": pos, "n_tokens_total": int(ids.size), "vocab_size": int(vocab_size),
        # the registry's statistics (a pairwise one is None with a single run), then the same under older keys
        "observed": {s.key: None if s.pairwise and runs < 2 else observed[s.key] for s in REGISTRY},
        "n_unique_tokens": observed["n_unique"], "unique_fraction": observed["n_unique"] / ids.size,
        "positional_agreement": observed["positional_agreement"], "jaccard_mean": observed["jaccard_mean"],
        "matched_cosine_mean": observed["matched_cosine_mean"], "matching": matching,
        "positional_cosine_mean": observed["positional_cosine_mean"],
        "final_activation": _spread(final_act), "decoded_activation": _spread(decoded_act),
        "projection_gap": {"per_run": gap.tolist(), "mean": float(gap.mean())},
        "cosine": {"per_run": cosine_per_run.tolist(), "mean": float(cosine.mean()), "min": float(cosine.min())},
        "nulls": null, "primary_null": PRIMARY,
        "baselines": {"initial_tokens": initial},
        "start_token_kept": {
            "per_run": kept.tolist(), "mean": float(kept.mean()), "n_kept": n_kept, "n_total": int(ids.size),
            "chance": chance_kept,
            "pvalue": None if chance_kept is None else nulls.binomial_tail(n_kept, int(ids.size), chance_kept)},
        "convergence": None if activation is None else convergence(activation),
        "bootstrap": bootstrap,
        "interval": "95%: the 2.5th percentile rounded down to a draw, the 97.5th rounded up (nulls.interval)",
        "notes": [
            "pairwise statistics average over pairs of different runs; None with a single run",
            f"matched cosine matching: {matching}",
            "nulls.uniform: runs x pos ids drawn uniformly from the vocabulary; nulls.decoded_starts (primary): "
            f"{start_name}, the method's own starts decoded as its results are (distinct entries of a pool per draw)",
            "p-values: one-sided Monte Carlo, (1 + #{draws at least as extreme}) / (1 + draws); unique count: "
            "as few or fewer, every other statistic: as large or larger",
            "repeats = repeats across runs (a token held by k >= 2 runs counts k - 1) + repeats within runs (a run "
            "repeating its own token); only repeats across runs decide verdict/unique_below_chance",
            "start_token_kept: fraction of final tokens equal to their own start's decoded token; chance = the "
            "decoded-starts collision probability sum_t p_t^2; p-value binomial",
            "bootstrap: runs resampled with replacement; pairwise statistics never pair a run with itself, "
            "unique_fraction is taken over the distinct runs drawn",
        ],
    }
    out["verdict"] = verdict.verdict(out)
    out["metrics"] = _flat_metrics(out)
    return out
