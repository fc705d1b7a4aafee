"""Null models and p-values: pinned to exact answers on hand-made embedding matrices."""

import math

import numpy as np
import pytest
import torch

from amrepro import nulls
from amrepro.decode import nearest_tokens
from amrepro.metrics import token_stats
from amrepro.seeding import initial_embeddings

# Six 2-D token directions (degrees). For an isotropic Gaussian start the angle is uniform, so a token is decoded
# with probability (angular width of its max-cosine cell) / 360: the cells end halfway between neighbours.
ANGLES = np.array([0.0, 150.0, 170.0, 190.0, 210.0, 230.0])
EXACT_P = np.array([140.0, 85.0, 20.0, 20.0, 20.0, 75.0]) / 360.0  # token 0 is the hub


def hub_vocab() -> torch.Tensor:
    rad = np.deg2rad(ANGLES)
    norms = np.arange(1, 7, dtype=float)  # row norms differ: cosine decoding must ignore them
    return torch.tensor(np.stack([np.cos(rad), np.sin(rad)], axis=1) * norms[:, None], dtype=torch.float32)


def exact_unique_distribution(p: np.ndarray, n: int) -> np.ndarray:
    """P(k distinct tokens among n i.i.d. draws from p), k = 0..n: multinomial sum by dynamic programming over
    tokens, state (draws assigned, distinct so far), weight prod p_i^c_i / c_i!."""
    f = np.zeros((n + 1, n + 1))
    f[0, 0] = 1.0
    for pi in p:
        g = np.zeros_like(f)
        for m in range(n + 1):
            for k in range(n + 1):
                if f[m, k]:
                    for c in range(n - m + 1):
                        g[m + c, k + (c > 0)] += f[m, k] * pi ** c / math.factorial(c)
        f = g
    return math.factorial(n) * f[n]


def test_exact_distribution_helper_is_right():
    p = np.full(4, 0.25)  # 3 uniform draws from 4: all distinct w.p. 4*3*2/64
    dist = exact_unique_distribution(p, 3)
    assert dist.sum() == pytest.approx(1.0) and dist[3] == pytest.approx(24 / 64) and dist[1] == pytest.approx(4 / 64)


def test_pool_decodes_with_the_hub_probabilities():
    pool = nulls.decoded_start_pool(hub_vocab(), std=0.3, size=40_000, seed=0)
    freq = np.bincount(pool, minlength=6) / pool.size
    sigma = np.sqrt(EXACT_P * (1 - EXACT_P) / pool.size)
    assert np.all(np.abs(freq - EXACT_P) < 5 * sigma), (freq, EXACT_P)
    assert nulls.collision_probability(pool) == pytest.approx((EXACT_P ** 2).sum(), abs=0.005)
    hubs = nulls.hub_tokens(pool, top_k=3)
    assert [h["id"] for h in hubs] == [0, 1, 5] and hubs[0]["frequency"] == pytest.approx(140 / 360, abs=0.01)


def test_monte_carlo_null_matches_the_exact_unique_distribution():
    runs, pos, draws = 3, 3, 4000
    pool = nulls.decoded_start_pool(hub_vocab(), std=1.0, size=20_000, seed=1)
    values = nulls.draw_stats(nulls.sample_pool(pool, runs, pos, draws, np.random.default_rng(0)))["n_unique"]
    exact = exact_unique_distribution(EXACT_P, runs * pos)  # [0..9]
    mc = np.bincount(values, minlength=runs * pos + 1) / draws
    assert np.abs(mc - exact).max() < 0.03, (mc.round(3), exact.round(3))
    mean = (np.arange(exact.size) * exact).sum()
    sd = np.sqrt((np.arange(exact.size) ** 2 * exact).sum() - mean ** 2)
    assert abs(values.mean() - mean) < 5 * sd / np.sqrt(draws)
    # the p-value of observing 3 distinct (as few or fewer) against its exact probability
    assert nulls.pvalue(3, values, larger=False) == pytest.approx(exact[:4].sum(), abs=0.015)


def test_pool_is_decoded_exactly_like_the_results():
    vocab = torch.randn(300, 32, generator=torch.Generator().manual_seed(0))
    pool = nulls.decoded_start_pool(vocab, std=0.5, size=100, seed=7)
    generator = torch.Generator().manual_seed(nulls.pool_seed(7))
    starts = torch.randn(100, 32, generator=generator, dtype=torch.float32) * 0.5
    ids, _ = nearest_tokens(starts[None], vocab)
    np.testing.assert_array_equal(pool, ids[0].numpy())
    np.testing.assert_array_equal(pool, nulls.decoded_start_pool(vocab, std=0.5, size=100, seed=7))  # seeded
    # not the runs' own starts: no pool vector is a start vector of the runs of seeds 7..16 (a pool seeded with
    # the config's seed would begin with run 0's five vectors)
    runs = initial_embeddings(list(range(7, 17)), 5, 0.5, 32).reshape(-1, 32)  # [runs * pos, d_model]
    assert not (starts[:, None, :] == runs[None]).all(dim=-1).any()


def test_draws_take_distinct_pool_entries():
    pool = np.arange(60)  # every entry a different token: any duplicate in a draw would be a fake repeat
    draws = nulls.sample_pool(pool, 10, 5, 500, np.random.default_rng(0))
    assert draws.shape == (500, 10, 5)
    assert (nulls.draw_stats(draws)["n_unique"] == 50).all()
    with pytest.raises(ValueError, match="distinct pool entries"):
        nulls.sample_pool(pool, 10, 7, 1, np.random.default_rng(0))


def test_vectorized_statistics_equal_token_stats():
    draws = np.random.default_rng(3).integers(0, 5, size=(200, 4, 3))  # small vocabulary: many repeats
    values = nulls.draw_stats(draws, max_cells=1000)  # several chunks
    for d in range(200):
        expected = token_stats(draws[d])
        assert values["n_unique"][d] == expected["n_unique"]
        assert values["positional_agreement"][d] == pytest.approx(expected["positional_agreement"])
        assert values["jaccard_mean"][d] == pytest.approx(expected["jaccard_mean"])
    by_hand = nulls.draw_stats(np.array([[[1, 1, 2], [1, 3, 2], [4, 4, 4]]]))
    assert by_hand["repeats"][0] == 9 - 4  # tokens 1, 2, 3, 4
    assert by_hand["agreeing_positions"][0] == 2  # runs 0 and 1 agree at positions 0 and 2
    assert by_hand["shared_tokens"][0] == 2  # {1,2} & {1,2,3}: 2; nothing shared with {4}
    # the 5 repeats split: 1 and 2 are each held by a second run (2 across), 1 and 4 repeat inside runs (3 within)
    assert by_hand["cross_run_repeats"][0] == 2 and by_hand["within_run_repeats"][0] == 3
    assert np.isnan(nulls.draw_stats(np.array([[[1, 2]]]))["positional_agreement"][0])  # one run: no pairs


def test_pvalue_edge_cases():
    null = np.full(1999, 50.0)
    assert nulls.pvalue(48, null, larger=False) == 1 / 2000  # beyond every draw: the smallest possible p
    assert nulls.pvalue(50, null, larger=False) == 1.0  # tied with every draw: ties count as extreme
    assert nulls.pvalue(3, [1, 2, 3, 4], larger=True) == (1 + 2) / 5  # 3 and 4 are as large or larger
    assert nulls.pvalue(3, [1, 2, 3, 4], larger=False) == (1 + 3) / 5
    assert nulls.pvalue(0.0, np.zeros(99), larger=True) == 1.0
    assert nulls.pvalue(0.1, np.zeros(99), larger=True) == 1 / 100
    assert nulls.pvalue(0.1 + 0.2, [0.3], larger=True) == 1.0  # a tie up to float rounding is still a tie
    assert nulls.pvalue(None, null, larger=True) is None and nulls.pvalue(float("nan"), null, larger=True) is None


def test_hub_list_and_collision_probability_by_hand():
    pool = np.array([5, 5, 5, 2, 2, 9])
    assert nulls.hub_tokens(pool) == [{"id": 5, "count": 3, "frequency": 0.5}, {"id": 2, "count": 2, "frequency": 2 / 6},
                                      {"id": 9, "count": 1, "frequency": 1 / 6}]
    assert nulls.collision_probability(pool) == pytest.approx((3 * 2 + 2 * 1) / (6 * 5))
    assert nulls.hub_tokens(np.array([7, 3, 3, 7]), top_k=1) == [{"id": 3, "count": 2, "frequency": 0.5}]


def test_binomial_tail():
    n, q = 12, 0.2
    exact = [sum(math.comb(n, i) * q ** i * (1 - q) ** (n - i) for i in range(k, n + 1)) for k in range(n + 1)]
    assert [nulls.binomial_tail(k, n, q) for k in range(n + 1)] == pytest.approx(exact)
    assert nulls.binomial_tail(0, 5, 0.0) == 1.0 and nulls.binomial_tail(1, 5, 0.0) == 0.0


def test_null_models_are_seeded_and_uniform_matches_the_analytic_mean():
    ids = np.arange(12).reshape(4, 3)
    pool = np.random.default_rng(0).integers(0, 7, size=4096)
    a, b = (nulls.null_models(ids, 7, pool, seed=1, n_draws=2000) for _ in range(2))
    assert a == b and nulls.null_models(ids, 7, pool, seed=2, n_draws=2000) != a
    V, n = 7, 12
    expected = V * (1 - (1 - 1 / V) ** n)  # expected distinct values among n uniform draws
    assert abs(a["uniform"]["n_unique"]["mean"] - expected) < 0.1
    assert abs(a["uniform"]["positional_agreement"]["mean"] - 1 / V) < 0.01  # two uniform tokens agree w.p. 1/V
    assert a["decoded_starts"]["pool_size"] == 4096 and "hub_tokens" in a["decoded_starts"]
    assert "decoded_starts" not in nulls.null_models(ids, 7, None, seed=1, n_draws=10)


def test_token_counting_path_equals_all_pairs_comparison(monkeypatch):
    """Thousands of runs use _sparse_stats (linear in runs x pos); it must give the very same statistics."""
    rng = np.random.default_rng(3)
    for runs, pos, vocab in [(10, 5, 40), (30, 5, 50), (7, 3, 5), (2, 1, 3), (25, 8, 100)]:
        draws = rng.integers(0, vocab, size=(50, runs, pos))  # small vocabularies: many shared tokens
        monkeypatch.setattr(nulls, "SPARSE_ABOVE", 10**12)
        dense = nulls.draw_stats(draws)
        monkeypatch.setattr(nulls, "SPARSE_ABOVE", -1)
        sparse = nulls.draw_stats(draws)
        for key in dense:
            if key in ("n_unique", "repeats", "agreeing_positions", "shared_tokens"):
                assert np.array_equal(dense[key], sparse[key]), key
            else:
                np.testing.assert_allclose(sparse[key], dense[key], rtol=1e-12, atol=1e-12)
