"""Reproducibility statistics on hand-made token matrices whose answers are known."""

import itertools
import json
import re

import numpy as np
import pytest

from amrepro import metrics
from amrepro.metrics import (convergence, pair_mean, pairwise_agreement, pairwise_jaccard, pairwise_matched_cosine,
                             reproducibility_stats, start_token_kept, token_stats)


def distinct_pool(vocab_size=50257, size=4096):
    """A decoded-starts pool without hubs: every entry a different token."""
    return np.random.default_rng(7).choice(vocab_size, size=size, replace=False)


def stats_for(ids, final=None, vocab_size=50257, initial_ids=None, n_boot=200, seed=0, start_pool="distinct", **kw):
    """reproducibility_stats with neutral activations/cosines unless given; by default a hub-free decoded-starts
    pool, so that the decoded-starts null is close to the uniform one."""
    ids = np.asarray(ids)
    runs, pos = ids.shape
    rng = np.random.default_rng(123)
    final = rng.normal(size=(runs, pos, 16)) if final is None else final
    if isinstance(start_pool, str):
        start_pool = distinct_pool(vocab_size, min(4096, vocab_size))
    return reproducibility_stats(
        ids, final, kw.get("final_activation", np.arange(runs) + 10.0),
        kw.get("decoded_activation", np.arange(runs) * 0.5),
        kw.get("cosine", np.full((runs, pos), 0.5)), ids if initial_ids is None else initial_ids, vocab_size,
        seed=seed, n_boot=n_boot, start_pool=start_pool, activation=kw.get("activation"),
        start_name=kw.get("start_name", "decoded random starts"))


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
    # 3 repeats: 1 and 3 each repeated inside its own run (within), 2 held by both runs (across)
    assert token_stats(repeats) == {"n_unique": 3, "unique_fraction": 0.5, "positional_agreement": 0.0,
                                    "jaccard_mean": pytest.approx(1 / 3), "repeats": 3, "within_run_repeats": 2,
                                    "cross_run_repeats": 1, "agreeing_positions": 0, "shared_tokens": 1}


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
    V = 200  # 50 tokens from 200 give about 44 distinct ones
    ids = rng.choice(V, size=50, replace=False).reshape(10, 5)
    ids[3, 1], ids[7, 4], ids[8, 0], ids[9, 0] = ids[0, 0], ids[2, 2], ids[1, 1], ids[4, 3]  # 46 unique
    s = stats_for(ids, vocab_size=V, initial_ids=rng.integers(0, V, size=(10, 5)), n_boot=1000,
                  start_pool=rng.integers(0, V, size=4096))
    ds = s["nulls"]["decoded_starts"]["n_unique"]
    assert s["n_unique_tokens"] == 46 and ds["low"] <= 46 <= ds["high"] and ds["pvalue"] > 0.05
    assert s["verdict"].startswith("46/50 tokens unique; decoded random starts give") and "within chance" in s["verdict"]
    assert "above chance" not in s["verdict"] and "below chance" not in s["verdict"].lower()
    assert s["metrics"]["verdict/unique_below_chance"] == 0.0


def test_48_of_50_is_below_uniform_chance_but_within_a_hubby_decoded_starts_null():
    """With 50257 tokens, 50 uniform draws collide twice with probability ~3e-4, so 48/50 is below uniform chance.
    Whether it is below chance for nearest-token decoding depends on the hubs of the decoded-starts null."""
    rng = np.random.default_rng(0)
    ids = rng.choice(50257, size=50, replace=False).reshape(10, 5)
    ids[3, 1], ids[7, 4] = ids[0, 0], ids[2, 2]  # 48/50 unique, two repeats shared across runs
    initial = rng.choice(50257, size=50, replace=False).reshape(10, 5)
    s = stats_for(ids, initial_ids=initial)  # no hubs: decoded starts behave like uniform tokens
    assert s["n_unique_tokens"] == 48 and s["nulls"]["events"]["repeats"] == 2
    assert s["metrics"]["pvalue/unique_uniform"] < 0.01 and s["metrics"]["pvalue/unique_decoded_starts"] < 0.01
    assert "Repeats across runs 2; decoded random starts 0.00 [0, 0]" in s["verdict"]
    assert "so the unique count is below chance under decoded random starts" in s["verdict"]
    assert s["metrics"]["verdict/unique_below_chance"] == 1.0
    hubby = np.concatenate([np.repeat(np.arange(40), 60), 1000 + np.arange(1696)])  # 40 hubs hold 59% of the pool
    s = stats_for(ids, initial_ids=initial, start_pool=hubby)
    assert s["metrics"]["pvalue/unique_uniform"] < 0.01 and s["metrics"]["pvalue/unique_decoded_starts"] > 0.05
    assert "within chance under decoded random starts, whose hub tokens" in s["verdict"]
    assert "only the uniform null" in s["verdict"] and s["metrics"]["pvalue/cross_run_repeats_decoded_starts"] > 0.05
    assert "below chance" not in s["verdict"].lower() and s["metrics"]["verdict/unique_below_chance"] == 0.0
    assert s["metrics"]["null/decoded_starts/unique_mean"] < s["metrics"]["null/uniform/unique_mean"]


def test_verdict_names_the_methods_own_starts():
    """gcg/pez/epo start from random tokens, not decoded vectors: the verdict names the null they were tested on."""
    ids = np.tile([11, 12, 13, 14, 15], (10, 1))
    s = stats_for(ids, start_name="random start tokens")
    assert "random start tokens give" in s["verdict"] and "below chance under random start tokens" in s["verdict"]
    assert "decoded random starts" not in s["verdict"]
    assert s["nulls"]["decoded_starts"]["name"] == "random start tokens"


def test_verdict_below_chance_and_decoding_caveat():
    preferred = np.tile([11, 12, 13, 14, 15], (10, 1))  # every run decodes to the same five tokens
    fresh = np.arange(50).reshape(10, 5) + 100
    s = stats_for(preferred, initial_ids=fresh)
    assert "below chance" in s["verdict"] and "above chance" in s["verdict"] and "decoding" not in s["verdict"]
    assert "AM converges to preferred tokens" in s["verdict"]
    assert s["metrics"]["verdict/unique_below_chance"] == 1.0 and s["metrics"]["verdict/agreement_above_chance"] == 1.0
    assert s["metrics"]["verdict/jaccard_above_chance"] == 1.0
    assert s["metrics"]["pvalue/agreement_decoded_starts"] == 1 / 2001  # the smallest p of 2000 draws
    s = stats_for(preferred, initial_ids=preferred)  # the un-optimized start repeats as much: say so
    assert "explained by decoding" in s["verdict"]


def test_verdict_tells_repeats_within_runs_from_shared_tokens():
    """Issue 19: a run repeating its own token says nothing about whether seeds agree. The unique count is far
    below chance, but no claim of reproducibility rests on it; the doublets get their own sentence and flag."""
    ids = np.arange(50).reshape(10, 5)
    ids[:, 1] = ids[:, 0]  # every run repeats its own first token; no two runs share one
    s = stats_for(ids, initial_ids=np.arange(50).reshape(10, 5) + 100)
    assert s["n_unique_tokens"] == 40 and s["jaccard_mean"] == 0.0
    assert s["metrics"]["pvalue/unique_decoded_starts"] < 0.001  # the reference's count alone would claim
    assert s["nulls"]["events"]["within_run_repeats"] == 10 and s["nulls"]["events"]["cross_run_repeats"] == 0
    assert "below chance" not in s["verdict"].lower() and s["metrics"]["verdict/unique_below_chance"] == 0.0
    assert "Repeats within runs 10; decoded random starts 0.00 [0, 0]" in s["verdict"]
    assert "which says nothing about whether seeds agree" in s["verdict"]
    assert s["metrics"]["verdict/within_run_repeats_above_chance"] == 1.0
    assert "Jaccard of token sets 0.000 (0 tokens shared" in s["verdict"]
    assert "converges to preferred tokens" not in s["verdict"] and s["metrics"]["verdict/jaccard_above_chance"] == 0.0


def test_start_token_kept_and_its_chance_level():
    ids = np.arange(20).reshape(4, 5)
    initial = ids.copy()
    initial[1:, :] += 100  # run 0 keeps all 5 start tokens, the others none
    np.testing.assert_allclose(start_token_kept(ids, initial), [1.0, 0.0, 0.0, 0.0])
    pool = np.concatenate([np.zeros(2048, int), np.arange(1, 2049)])  # one hub: sum p^2 ~ 1/4
    s = stats_for(ids, initial_ids=initial, start_pool=pool, vocab_size=5000)
    kept = s["start_token_kept"]
    assert kept["mean"] == 0.25 and kept["n_kept"] == 5 and kept["per_run"] == [1.0, 0.0, 0.0, 0.0]
    assert kept["chance"] == pytest.approx(0.25, abs=0.001)
    assert s["metrics"]["stats/start_token_kept"] == 0.25 and s["metrics"]["pvalue/start_token_kept"] > 0.05
    s = stats_for(ids, initial_ids=initial, vocab_size=5000)  # hub-free pool: 5 kept tokens are far above chance
    assert s["start_token_kept"]["pvalue"] < 1e-6 and s["metrics"]["verdict/start_tokens_kept"] == 1.0
    assert "5/20 final tokens (25%) are the decoded token of their own random start" in s["verdict"]
    assert "identify the seed more than the neuron" in s["verdict"]  # 0.25 > agreement and Jaccard (0)


def test_convergence_flags_runs_still_rising():
    epochs = np.arange(100, dtype=float)[:, None]
    act = np.concatenate([10 * (1 - np.exp(-epochs / 5)), epochs / 10 + 1], axis=1)  # [100, 2]: flat, rising
    c = convergence(act)
    assert c["window_epochs"] == 10 and c["still_rising"] == [False, True] and c["n_still_rising"] == 1
    assert c["per_run"][1] == pytest.approx((10.9 - 9.9) / 10.9)
    assert c["per_run"][0] == pytest.approx(0.0, abs=1e-6)
    assert convergence(act[:1]) is None
    ids = np.arange(10).reshape(2, 5)
    s = stats_for(ids, initial_ids=ids + 100, activation=act)
    assert s["metrics"]["converge/frac_runs_still_rising"] == 0.5
    assert s["metrics"]["verdict/not_converged"] == 1.0 and "Not converged: the activation of 1/2 runs" in s["verdict"]
    assert metrics.child_metrics(s, 1) == {"stats/start_token_kept": 0.0,
                                           "converge/act_rel_change_last10pct": pytest.approx(1 / 10.9),
                                           "converge/still_rising": 1.0}
    flat = stats_for(ids, initial_ids=ids + 100, activation=act[:, :1].repeat(2, axis=1))
    assert "Not converged" not in flat["verdict"] and flat["metrics"]["verdict/not_converged"] == 0.0


def test_json_and_mlflow_metric_keys():
    s = stats_for(np.random.default_rng(0).integers(0, 100, size=(4, 3)), vocab_size=100)
    json.dumps(s, allow_nan=False)
    assert all(re.fullmatch(r"[\w\-./ ]+", key) for key in s["metrics"])
    assert all(isinstance(v, float) and np.isfinite(v) for v in s["metrics"].values())
    for key in ("stats/positional_agreement", "stats/jaccard_mean", "stats/matched_cosine_mean",
                "null/decoded_starts/unique_mean", "null/decoded_starts/unique_low", "null/decoded_starts/unique_high",
                "null/uniform/unique_mean", "pvalue/unique_decoded_starts", "pvalue/unique_uniform",
                "pvalue/agreement_decoded_starts", "pvalue/jaccard_decoded_starts", "baseline/initial_unique",
                "bootstrap/jaccard_mean_high", "stats/final_activation_std", "stats/start_token_kept"):
        assert key in s["metrics"]
    assert not any(key.startswith("baseline/random") for key in s["metrics"])


def test_single_run_has_no_pairwise_statistics():
    s = stats_for([[1, 2, 3]])
    json.dumps(s, allow_nan=False)
    assert s["positional_agreement"] is None and s["matched_cosine_mean"] is None
    assert "stats/positional_agreement" not in s["metrics"] and "single run" in s["verdict"]


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="runs, pos"):
        reproducibility_stats(np.zeros((2, 3), int), np.zeros((2, 4, 5)), [1, 2], [1, 2], np.zeros((2, 3)),
                              np.zeros((2, 3), int), 10)


def test_every_name_the_tables_read_is_logged():
    """The registry is the one place a statistic's names are written: the sweep table's metrics, the compare
    table's columns and the flat metrics must agree, or a misspelt name would give a column of None."""
    from types import SimpleNamespace

    from amrepro import compare, nulls, parent_metrics, stats

    s = stats_for(np.random.default_rng(0).integers(0, 100, size=(4, 3)), vocab_size=100)
    missing = [key for key in parent_metrics.TABLE_COLUMNS.values() if key not in s["metrics"]]
    assert not missing, missing
    drawn = nulls.draw_stats(np.zeros((1, 2, 3), int))
    assert all(stat.key in drawn and stat.events in drawn for stat in stats.REGISTRY)
    row = compare.row("adam", SimpleNamespace(summary={"statistics": s}), None, 1.0)
    assert set(row) == set(compare.COLUMNS)
    for stat in stats.REGISTRY:
        assert row[stat.column] == pytest.approx(s["metrics"][stat.metric])
        assert row[stat.p_column] == pytest.approx(s["metrics"][stat.pvalue_metric(stats.PRIMARY)])
    assert {f"verdict/{stat.claim}" for stat in stats.CLAIMS} <= set(s["metrics"])
