"""Chance levels for statistics of decoded tokens, and one-sided Monte Carlo p-values.

Two null models, each a distribution of every statistic of stats.REGISTRY over `n_draws` Monte Carlo draws of
runs x n_tokens tokens:
(a) uniform: token ids drawn uniformly from the vocabulary.
(b) decoded starts (the primary null): the method's own starts, decoded exactly as its results are. For adam,
    N(0, std(E)) vectors i.i.d. as seeding.initial_embeddings draws them, decoded by max cosine to the embedding
    rows (decode.nearest_tokens' math); pez, gcg and epo start from uniform tokens (methods.problem.start_pool).
    Nearest-token decoding concentrates on "hub" tokens, so random vectors repeat tokens far more often than
    uniform tokens do; (a) ignores that and over-states significance.

How (b) is sampled. Independent draws would decode n_draws * runs * n_tokens vectors (2000 x 50 vectors against
a 50k x 768 vocabulary is ~8 TFLOP). Instead a POOL of K i.i.d. start vectors is decoded once (chunked matmuls),
and every draw takes runs * n_tokens DISTINCT pool entries. The entries are i.i.d., so any set of distinct ones
is an exact sample of i.i.d. decoded starts (exchangeability): no bias. Draws share pool entries, so the p-values
are conditional on the pool's hub frequencies: Monte Carlo variance, not bias. (Sampling WITH replacement would
be biased: an entry drawn twice in one draw fakes a repeat.) Cost on this project's shared 2-core CPU
(bench/hubness.py --timing): decoding K = 4096 vectors against a GPT-2-sized 50257 x 768 matrix took 3.2 s at
load ~2 and 8-9 s at load ~7 (other jobs running); the 2 x 2000 draws and their statistics 0.1-0.4 s. The
"under 2 s" aim would need K ~ 2048, which doubles the pool's sampling error of the hub frequencies; K = 4096
was kept.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from .stats import INTERVAL, PRIMARY, REGISTRY

POOL_SIZE = 4096  # decoded start vectors in the pool: see the module docstring for the cost
N_DRAWS = 2000  # Monte Carlo draws of runs x n_tokens tokens per null
HUBS = 20  # hub tokens reported
_POOL_STREAM = 0x6E756C6C  # 'null': keeps the pool's generator apart from every run's own seed


def pool_size(runs: int, n_tokens: int) -> int:
    """K: at least POOL_SIZE, and at least 4 draws' worth of distinct entries so draws overlap little."""
    return max(POOL_SIZE, 4 * runs * n_tokens)


def pool_seed(seed: int) -> int:
    """The pool generator's seed, derived from Config.seed but never equal to a run's seed: the pool must not
    contain the runs' own start vectors."""
    return int(np.random.SeedSequence([seed, _POOL_STREAM]).generate_state(1)[0])


def decoded_start_pool(vocab, std: float, size: int, seed: int, chunk: int = 512) -> np.ndarray:
    """Token ids [size] of `size` i.i.d. start vectors N(0, std), drawn like seeding.initial_embeddings (float32
    on the CPU from a torch.Generator), decoded by max cosine to the rows of vocab [n_vocab, d_model] (any device)
    with decode.nearest_tokens' arithmetic, the vocabulary normalized once."""
    import torch  # only here: the rest of this module is numpy

    with torch.no_grad():
        generator = torch.Generator(device="cpu").manual_seed(pool_seed(seed))
        v = torch.nn.functional.normalize(vocab, dim=-1)  # [n_vocab, d_model]
        ids = []
        for start in range(0, size, chunk):
            n = min(chunk, size - start)
            x = torch.randn(n, vocab.shape[1], generator=generator, dtype=torch.float32) * std  # [n, d_model]
            e = torch.nn.functional.normalize(x.to(vocab.device, vocab.dtype), dim=-1)
            ids.append((e @ v.T).max(dim=-1).indices.cpu())  # [n]
        return torch.cat(ids).numpy()


def sample_pool(pool: np.ndarray, runs: int, pos: int, n_draws: int, rng: np.random.Generator) -> np.ndarray:
    """[n_draws, runs, pos]: each draw runs * pos DISTINCT entries of the pool (without replacement)."""
    n = runs * pos
    if n > pool.size:
        raise ValueError(f"a draw needs {n} distinct pool entries but the pool has {pool.size}")
    picks = np.stack([rng.choice(pool.size, size=n, replace=False) for _ in range(n_draws)])  # [n_draws, n]
    return pool[picks].reshape(n_draws, runs, pos)


SPARSE_ABOVE = 100_000  # runs^2 * pos^2 per draw above which draws are counted token by token (_sparse_stats)


def _sparse_stats(x: np.ndarray) -> tuple[int, int, int, float, int]:
    """(n_unique, agreeing run-pair positions, shared tokens over run pairs, sum of pairwise Jaccard, sum of the
    runs' distinct-token counts) of one [runs, pos] matrix by counting tokens: agreement is
    sum_p sum_t C(count_pt, 2), shared tokens sum_t C(runs holding t, 2), and Jaccard is non-zero only for the
    (few) pairs that share a token. Linear in runs x pos instead of the all-pairs comparison, so thousands of runs
    stay fast; the same numbers."""
    runs, pos = x.shape
    n_unique = int(np.unique(x).size)
    agreeing = 0
    for p in range(pos):
        c = np.unique(x[:, p], return_counts=True)[1]
        agreeing += int((c * (c - 1) // 2).sum())
    held = np.unique(np.stack([np.repeat(np.arange(runs), pos), x.reshape(-1)], axis=1), axis=0)  # (run, token)
    size = np.bincount(held[:, 0], minlength=runs)  # [runs] distinct tokens per run
    order = np.argsort(held[:, 1], kind="stable")
    token, run = held[order, 1], held[order, 0]
    starts = np.flatnonzero(np.r_[True, token[1:] != token[:-1]])
    counts = np.diff(np.r_[starts, token.size])
    shared = int((counts * (counts - 1) // 2).sum())
    inter: Counter[tuple[int, int]] = Counter()  # (run a, run b) -> tokens both hold
    for start, c in zip(starts[counts > 1], counts[counts > 1]):
        holders = run[start:start + c]
        inter.update((int(holders[i]), int(holders[j])) for i, j in zip(*np.triu_indices(c, k=1)))
    jaccard = sum(n / (size[a] + size[b] - n) for (a, b), n in inter.items())
    return n_unique, agreeing, shared, float(jaccard), int(size.sum())


def draw_stats(draws: np.ndarray, max_cells: int = 20_000_000) -> dict[str, np.ndarray]:
    """The token statistics of many [runs, pos] matrices at once: draws [D, runs, pos] -> {name: [D]}: every
    statistic of stats.REGISTRY and its coincidence count, vectorized, with the definitions of
    metrics.pairwise_agreement / pairwise_jaccard (pairs of different runs; NaN with a single run)."""
    draws = np.asarray(draws)
    D, runs, pos = draws.shape
    if runs * runs * pos * pos > SPARSE_ABOVE:  # many runs: count tokens instead of comparing all pairs
        counts = np.array([_sparse_stats(x) for x in draws], dtype=float).reshape(D, 5)  # [D, 5]
        n_unique, agreeing, shared, held = (counts[:, k].astype(int) for k in (0, 1, 2, 4))
        return _statistics(n_unique, agreeing, shared, counts[:, 3], held, runs, pos)
    step = max(1, max_cells // max(1, runs * runs * pos * pos))  # draws per chunk: bounds the [d, r, r, p, p] mask
    upper = np.triu(np.ones((runs, runs), dtype=bool), k=1)  # [runs, runs]: each pair of different runs once
    out = {k: [] for k in ("n_unique", "agreeing", "shared", "jaccard", "held")}  # each [d] per chunk
    for start in range(0, D, step):
        x = draws[start:start + step]  # [d, runs, pos]
        flat = np.sort(x.reshape(x.shape[0], -1), axis=1)  # [d, runs * pos]
        out["n_unique"].append(1 + (np.diff(flat, axis=1) != 0).sum(axis=1))
        agree = (x[:, :, None, :] == x[:, None, :, :]).sum(axis=-1)  # [d, runs, runs] positions equal
        # token x[a, p] is new in run a if no earlier position of run a holds it: the run's set, without repeats
        same = x[:, :, :, None] == x[:, :, None, :]  # [d, runs, pos, pos]
        first = ~np.tril(same, k=-1).any(axis=-1)  # [d, runs, pos]
        in_other = (x[:, :, None, :, None] == x[:, None, :, None, :]).any(axis=-1)  # [d, a, b, pos_a]
        inter = (first[:, :, None, :] & in_other).sum(axis=-1)  # [d, runs, runs] |A ∩ B|
        size = first.sum(axis=-1)  # [d, runs]
        jaccard = inter / (size[:, :, None] + size[:, None, :] - inter)  # [d, runs, runs]
        out["agreeing"].append(agree[:, upper].sum(axis=1))
        out["shared"].append(inter[:, upper].sum(axis=1))
        out["jaccard"].append(jaccard[:, upper].sum(axis=1))
        out["held"].append(size.sum(axis=-1))  # the runs' distinct tokens, summed over runs
    return _statistics(*(np.concatenate(v) for v in out.values()), runs, pos)


def _statistics(n_unique, agreeing, shared, jaccard_sum, held, runs: int, pos: int) -> dict[str, np.ndarray]:
    """The statistics from the counts of each draw ([D] each). The repeats (tokens minus unique ones) split
    exactly into repeats within runs (a run's tokens minus its distinct ones, summed over runs) and across runs
    (the runs' distinct tokens, held, minus the unique ones: a token held by k runs is k - 1 of them)."""
    n_pairs = runs * (runs - 1) // 2
    with np.errstate(invalid="ignore", divide="ignore"):  # one run: no pairs, NaN
        return {"n_unique": n_unique, "positional_agreement": agreeing / (n_pairs * pos),
                "jaccard_mean": jaccard_sum / n_pairs, "agreeing_positions": agreeing, "shared_tokens": shared,
                "repeats": runs * pos - n_unique, "within_run_repeats": runs * pos - held,
                "cross_run_repeats": held - n_unique}


def interval(values) -> dict:
    """Mean and 95% interval of Monte Carlo values. The interval's ends are draws themselves (the lower end
    rounded down, the upper up), so for counts they are counts and at least 95% of the draws lie inside."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"mean": None, "low": None, "high": None}
    return {"mean": float(values.mean()), "low": float(np.percentile(values, INTERVAL[0], method="lower")),
            "high": float(np.percentile(values, INTERVAL[1], method="higher"))}


def pvalue(observed, null_values, larger: bool) -> float | None:
    """One-sided Monte Carlo p-value with add-one smoothing: (1 + #{draws at least as extreme}) / (1 + draws).

    larger=True: extreme = as large or larger (agreement, Jaccard); False: as small or smaller (unique count:
    repeats). Ties count as extreme. A 1e-9 tolerance keeps float ties tied whatever the summation order.
    None when the statistic does not exist (observed None or NaN: a single run)."""
    if observed is None or not np.isfinite(observed):
        return None
    null_values = np.asarray(null_values, dtype=float)
    null_values = null_values[np.isfinite(null_values)]
    extreme = null_values >= observed - 1e-9 if larger else null_values <= observed + 1e-9
    return float((1 + extreme.sum()) / (1 + null_values.size))


def hub_tokens(pool: np.ndarray, top_k: int = HUBS) -> list[dict]:
    """The top_k most frequent tokens of the pool (ties broken by id): id, count and frequency in the pool."""
    unique, counts = np.unique(pool, return_counts=True)
    order = sorted(range(unique.size), key=lambda k: (-counts[k], unique[k]))[:top_k]
    return [{"id": int(unique[k]), "count": int(counts[k]), "frequency": float(counts[k] / pool.size)} for k in order]


def collision_probability(pool: np.ndarray) -> float:
    """sum_t p_t^2, the probability that two i.i.d. decoded starts are the same token, estimated without bias
    from the pool: pairs of different pool entries that coincide, over all such pairs."""
    _, counts = np.unique(pool, return_counts=True)
    counts = counts.astype(float)
    return float((counts * (counts - 1)).sum() / (pool.size * (pool.size - 1)))


def binomial_tail(k: int, n: int, q: float) -> float:
    """P(X >= k) for X ~ Binomial(n, q): how often chance alone keeps k or more of n start tokens."""
    if k <= 0 or q >= 1.0:
        return 1.0
    if q <= 0.0:
        return 0.0
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(q)
             + (n - i) * math.log1p(-q) for i in range(k, n + 1)]
    top = max(terms)
    return float(min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms)))


def null_model(draws: np.ndarray, observed: dict) -> dict:
    """A null's intervals of every registry statistic over draws [D, runs, pos], and the p-values under it of
    observed: draw_stats of the observed matrix, the same arithmetic as the draws'."""
    values = draw_stats(draws)
    out = {"n_draws": int(draws.shape[0])}
    for stat in REGISTRY:
        out[stat.key] = interval(values[stat.key])
        out[stat.key]["pvalue"] = pvalue(observed[stat.key][0], values[stat.key], stat.larger)
    return out


def null_models(ids: np.ndarray, vocab_size: int, start_pool: np.ndarray | None, seed: int,
                n_draws: int = N_DRAWS, start_name: str = "decoded random starts") -> dict:
    """Both nulls for the observed ids [runs, pos]; decoded starts only when a pool of decoded starts is given.
    start_name: what the verdict calls the primary null (the method's own starts, decoded as its results are).
    Deterministic: every draw comes from numpy generators seeded by (seed, null)."""
    ids = np.asarray(ids)
    runs, pos = ids.shape
    observed = draw_stats(ids[None])
    uniform = np.random.default_rng([seed, 2]).integers(0, vocab_size, size=(n_draws, runs, pos))
    out = {"uniform": {"description": "token ids drawn uniformly from the vocabulary",
                       **null_model(uniform, observed)},
           "events": {k: int(observed[k][0]) for k in dict.fromkeys(s.events for s in REGISTRY)}}
    if start_pool is not None:
        start_pool = np.asarray(start_pool)
        starts = sample_pool(start_pool, runs, pos, n_draws, np.random.default_rng([seed, 3]))
        out[PRIMARY] = {
            "name": start_name, "description": (f"{start_name}: a pool of {start_pool.size} of the method's starts, "
                                                f"decoded once; each draw {runs * pos} distinct pool entries"),
            **null_model(starts, observed), "pool_size": int(start_pool.size), "vocab_size": int(vocab_size),
            "pool_distinct": int(np.unique(start_pool).size),
            "collision_probability": collision_probability(start_pool), "hub_tokens": hub_tokens(start_pool)}
    return out
