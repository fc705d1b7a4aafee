"""Reproducibility statistics on hand-made token matrices whose answers are known."""

import itertools
import json
import re

import numpy as np
import pytest

from amrepro import metrics
from amrepro.metrics import (pair_mean, pairwise_agreement, pairwise_jaccard, pairwise_matched_cosine,
                             random_token_baseline, reproducibility_stats, token_stats)


def stats_for(ids, final=None, vocab_size=50257, initial_ids=None, n_boot=200, seed=0, **kw):
    """reproducibility_stats with neutral activations/cosines unless given."""
    ids = np.asarray(ids)
    runs, pos = ids.shape
    rng = np.random.default_rng(123)
    final = rng.normal(size=(runs, pos, 16)) if final is None else final
    return reproducibility_stats(
        ids, final, kw.get("final_activation", np.arange(runs) + 10.0),
        kw.get("decoded_activation", np.arange(runs) * 0.5),
        kw.get("cosine", np.full((runs, pos), 0.5)), ids if initial_ids is None else initial_ids, vocab_size,
        seed=seed, n_boot=n_boot)


def test_identical_runs_agree_completely():
    ids = np.tile([3, 1, 4, 5], (6, 1))  # [6 runs, 4 pos], all the same
    final = np.tile(np.random.default_rng(0).normal(size=(1, 4, 8)), (6, 1, 1))
    s = stats_for(ids, final=final)
    assert s["n_unique_tokens"] == 4 and s["unique_fraction"] == pytest.approx(4 / 24)
    assert s["positional_agreement"] == 1.0 and s["jaccard_mean"] == 1.0
    assert s["matched_cosine_mean"] == pytest.approx(1.0) and s["positional_cosine_mean"] == pytest.approx(1.0)
    assert s["bootstrap"]["positional_agreement"] == {"low": 1.0, "high": 1.0}


def test_all_distinct_runs_share_nothing():
    ids = np.arange(30).reshape(6, 5)
    s = stats_for(ids)
    assert s["n_unique_tokens"] == 30 and s["unique_fraction"] == 1.0
    assert s["positional_agreement"] == 0.0 and s["jaccard_mean"] == 0.0


def test_two_runs_by_hand():
    ids = np.array([[1, 2, 3, 4], [1, 3, 2, 5]])
    # same token only at position 0: 1/4; sets {1,2,3,4} and {1,2,3,5}: 3 shared of 5
    assert pairwise_agreement(ids)[0, 1] == 0.25
    assert pairwise_jaccard(ids)[0, 1] == pytest.approx(3 / 5)
    repeats = np.array([[1, 1, 2], [2, 3, 3]])  # sets {1,2} and {2,3}: repeats inside a run do not count twice
    assert pairwise_jaccard(repeats)[0, 1] == pytest.approx(1 / 3)
    assert token_stats(repeats) == {"n_unique": 3, "unique_fraction": 0.5, "positional_agreement": 0.0,
                                    "jaccard_mean": pytest.approx(1 / 3)}


def test_pairwise_means_average_over_pairs_of_different_runs():
    ids = np.array([[1, 2], [1, 3], [4, 5]])  # pairs: (0,1) agree 1/2, (0,2) 0, (1,2) 0
    assert pair_mean(pairwise_agreement(ids)) == pytest.approx(1 / 6)
    # run 0 drawn twice, run 1 once: pairs (0,0) are skipped, (0,1) counted twice -> 1/2
    assert pair_mean(pairwise_agreement(ids), counts=np.array([2, 1, 0])) == pytest.approx(0.5)
    assert np.isnan(pair_mean(pairwise_agreement(ids), counts=np.array([3, 0, 0])))


def test_jaccard_matches_python_sets():
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 6, size=(7, 4))
    expected = [[len(set(a) & set(b)) / len(set(a) | set(b)) for b in ids] for a in ids]
    np.testing.assert_allclose(pairwise_jaccard(ids), expected)


def test_matched_cosine_ignores_position_order():
    e1, e2 = np.eye(2)
    a = np.stack([e1, e2])
    b = np.stack([e2, (e1 + e2) / np.sqrt(2)])  # best matching: a1-b2 (0.707) and a2-b1 (1)
    matched, method = pairwise_matched_cosine(np.stack([a, b]))
    assert matched[0, 1] == pytest.approx((1 + 1 / np.sqrt(2)) / 2) and method.startswith("exact")
    shuffled = np.random.default_rng(0).normal(size=(1, 5, 32))
    s = stats_for([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]], final=np.concatenate([shuffled, shuffled[:, ::-1]]))
    assert s["matched_cosine_mean"] == pytest.approx(1.0)
    assert s["positional_cosine_mean"] < 0.9  # only the middle position coincides without matching


def test_greedy_matching_above_eight_positions():
    sim = np.array([[0.9, 0.8], [0.8, 0.0]])
    assert metrics._greedy_matching(sim) == pytest.approx(0.9)  # greedy, not the optimum 1.6
    vectors = np.random.default_rng(1).normal(size=(9, 64))
    final = np.stack([vectors, vectors[np.random.default_rng(2).permutation(9)]])  # [2 runs, 9 pos, 64]
    matched, method = pairwise_matched_cosine(final)
    assert method.startswith("greedy") and matched[0, 1] == pytest.approx(1.0)


def test_exact_matching_is_the_optimum():
    final = np.random.default_rng(3).normal(size=(2, 4, 6))
    unit = final / np.linalg.norm(final, axis=-1, keepdims=True)
    sim = unit[0] @ unit[1].T
    best = max(sum(sim[i, p[i]] for i in range(4)) for p in itertools.permutations(range(4))) / 4
    assert pairwise_matched_cosine(final)[0][0, 1] == pytest.approx(best)


def test_random_baseline_matches_the_analytic_expectation():
    V, runs, pos, draws = 7, 4, 3, 4000
    base = random_token_baseline(runs, pos, V, n_draws=draws, seed=0)
    n = runs * pos
    expected = V * (1 - (1 - 1 / V) ** n)  # expected number of distinct values among n uniform draws
    sem = 2.0 / np.sqrt(draws)  # the count's std is below 2 here: a generous Monte-Carlo error bound
    assert abs(base["n_unique"]["mean"] - expected) < 4 * sem
    assert base["n_unique"]["low"] <= expected <= base["n_unique"]["high"]
    assert abs(base["positional_agreement"]["mean"] - 1 / V) < 0.01  # two uniform tokens agree w.p. 1/V
    assert 0 < base["jaccard_mean"]["mean"] < 1


def test_random_baseline_is_reproducible_and_seeded():
    a, b = (random_token_baseline(5, 5, 30, 300, seed=1) for _ in range(2))
    assert a == b
    assert random_token_baseline(5, 5, 30, 300, seed=2) != a


def test_initial_baseline_and_per_run_quantities():
    ids = np.arange(12).reshape(3, 4)
    initial = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    cosine = np.array([[0.1, 0.3, 0.5, 0.7], [1, 1, 1, 1], [0, 0, 0, 0.4]])
    s = stats_for(ids, initial_ids=initial, cosine=cosine, final_activation=[5.0, 7.0, 9.0],
                  decoded_activation=[1.0, 2.0, 10.0])
    assert s["baselines"]["initial_tokens"]["n_unique"] == 2
    assert s["baselines"]["initial_tokens"]["positional_agreement"] == pytest.approx((1 + 0.75 + 0.75) / 3)
    assert s["projection_gap"]["per_run"] == [4.0, 5.0, -1.0] and s["projection_gap"]["mean"] == pytest.approx(8 / 3)
    assert s["cosine"]["per_run"] == pytest.approx([0.4, 1.0, 0.1]) and s["cosine"]["min"] == 0.0
    assert s["final_activation"] == {"mean": 7.0, "std": pytest.approx(np.std([5, 7, 9])), "min": 5.0, "max": 9.0,
                                     "per_run": [5.0, 7.0, 9.0]}
    interval = s["bootstrap"]["final_activation_mean"]
    assert 5.0 <= interval["low"] <= 7.0 <= interval["high"] <= 9.0


def test_verdict_within_chance():
    rng = np.random.default_rng(0)
    V = 200  # 50 uniform draws from 200 tokens give about 44 distinct ones
    ids = rng.choice(V, size=50, replace=False).reshape(10, 5)
    ids[3, 1], ids[7, 4], ids[8, 0], ids[9, 0] = ids[0, 0], ids[2, 2], ids[1, 1], ids[4, 3]  # 46 unique
    s = stats_for(ids, vocab_size=V, initial_ids=rng.integers(0, V, size=(10, 5)), n_boot=1000)
    low, high = s["baselines"]["random_tokens"]["n_unique"]["low"], s["baselines"]["random_tokens"]["n_unique"]["high"]
    assert s["n_unique_tokens"] == 46 and low <= 46 <= high
    assert s["verdict"].startswith("46/50 tokens unique") and "Within chance" in s["verdict"]
    assert "within chance, no evidence that runs agree" in s["verdict"]
    assert s["metrics"]["verdict/unique_below_chance"] == 0.0


def test_the_reference_48_of_50_is_below_uniform_chance():
    """With a 50257-token vocabulary, 50 uniform draws collide twice with probability ~3e-4: the reference's
    48/50 is below uniform chance, and the verdict must say so rather than echo 'mostly unique'."""
    rng = np.random.default_rng(0)
    ids = rng.choice(50257, size=50, replace=False).reshape(10, 5)
    ids[3, 1], ids[7, 4] = ids[0, 0], ids[2, 2]  # 48/50 unique, no positional coincidence
    s = stats_for(ids, initial_ids=rng.choice(50257, size=50, replace=False).reshape(10, 5))
    assert s["n_unique_tokens"] == 48 and s["baselines"]["random_tokens"]["n_unique"]["low"] == 49
    assert s["verdict"].startswith("48/50 tokens unique") and "Below chance" in s["verdict"]
    assert "runs share tokens more than uniformly random tokens do" in s["verdict"]  # the repeats are across runs
    assert "within chance, no evidence that runs agree" in s["verdict"]


def test_verdict_below_chance_and_decoding_caveat():
    preferred = np.tile([11, 12, 13, 14, 15], (10, 1))  # every run decodes to the same five tokens
    fresh = np.arange(50).reshape(10, 5) + 100
    s = stats_for(preferred, initial_ids=fresh)
    assert "Below chance" in s["verdict"] and "above chance" in s["verdict"] and "decoding" not in s["verdict"]
    assert "AM converges to preferred tokens" in s["verdict"]
    assert s["metrics"]["verdict/unique_below_chance"] == 1.0 and s["metrics"]["verdict/agreement_above_chance"] == 1.0
    assert s["metrics"]["verdict/jaccard_above_chance"] == 1.0
    s = stats_for(preferred, initial_ids=preferred)  # the un-optimized start repeats as much: say so
    assert "explained by decoding" in s["verdict"]
    half = np.concatenate([fresh[:5], preferred[:5]])  # initial: 30 unique, below chance but above 5
    assert "also decode below chance" in stats_for(preferred, initial_ids=half)["verdict"]


def test_verdict_tells_repeats_within_runs_from_shared_tokens():
    ids = np.arange(50).reshape(10, 5)
    ids[:, 1] = ids[:, 0]  # every run repeats its own first token; no two runs share one
    s = stats_for(ids, initial_ids=np.arange(50).reshape(10, 5) + 100)
    assert s["n_unique_tokens"] == 40 and s["jaccard_mean"] == 0.0
    assert "Below chance" in s["verdict"] and "the repeats are within runs" in s["verdict"]
    assert "converges to preferred tokens" not in s["verdict"] and s["metrics"]["verdict/jaccard_above_chance"] == 0.0


def test_json_and_mlflow_metric_keys():
    s = stats_for(np.random.default_rng(0).integers(0, 100, size=(4, 3)), vocab_size=100)
    json.dumps(s, allow_nan=False)
    assert all(re.fullmatch(r"[\w\-./ ]+", key) for key in s["metrics"])
    assert all(isinstance(v, float) and np.isfinite(v) for v in s["metrics"].values())
    for key in ("stats/positional_agreement", "stats/jaccard_mean", "stats/matched_cosine_mean",
                "baseline/random_unique_mean", "baseline/random_unique_low", "baseline/initial_unique",
                "bootstrap/jaccard_mean_high", "stats/final_activation_std"):
        assert key in s["metrics"]


def test_single_run_has_no_pairwise_statistics():
    s = stats_for([[1, 2, 3]])
    json.dumps(s, allow_nan=False)
    assert s["positional_agreement"] is None and s["matched_cosine_mean"] is None
    assert "stats/positional_agreement" not in s["metrics"] and "single run" in s["verdict"]


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="runs, pos"):
        reproducibility_stats(np.zeros((2, 3), int), np.zeros((2, 4, 5)), [1, 2], [1, 2], np.zeros((2, 3)),
                              np.zeros((2, 3), int), 10)
