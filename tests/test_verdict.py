"""The verdict never claims more than the p-values allow: one coincidence is never 'above chance'."""

import numpy as np

from amrepro import verdict
from test_metrics import distinct_pool, stats_for


def one_coincidence():
    """10 runs x 5 positions of different tokens, except that runs 0 and 1 decode the same token at position 0:
    one repeat, one agreeing run-pair position, one shared token."""
    ids = np.random.default_rng(0).choice(50257, size=50, replace=False).reshape(10, 5)
    ids[1, 0] = ids[0, 0]
    return ids


def test_one_coincidence_is_never_above_chance():
    """The over-claim of issue 8: with a hub-free null every draw has agreement 0 (interval [0, 0]), so p is
    the smallest possible, yet one pair of runs at one position is one coincidence, not evidence."""
    ids = one_coincidence()
    s = stats_for(ids, initial_ids=ids + 1)
    null = s["nulls"]["decoded_starts"]
    assert null["positional_agreement"]["high"] == 0.0 and null["positional_agreement"]["pvalue"] < 0.05
    assert s["nulls"]["events"] == {"repeats": 1, "cross_run_repeats": 1, "within_run_repeats": 0,
                                    "agreeing_positions": 1, "shared_tokens": 1}
    assert "above chance" not in s["verdict"] and "below chance" not in s["verdict"].lower()
    assert s["verdict"].count("a single coincidence, not evidence") == 3  # across runs, agreement, Jaccard
    assert "Repeats across runs 1; decoded random starts 0.00 [0, 0]" in s["verdict"]
    assert "The one repeat is across runs (a token in two or more runs)" in s["verdict"]
    for key in ("agreement_above_chance", "jaccard_above_chance", "unique_below_chance"):
        assert s["metrics"][f"verdict/{key}"] == 0.0


def test_two_coincidences_with_a_small_p_are_above_chance():
    ids = one_coincidence()
    ids[3, 2] = ids[2, 2]  # a second pair of runs agrees at a position
    s = stats_for(ids, initial_ids=ids + 1)
    assert s["nulls"]["events"]["agreeing_positions"] == 2
    assert "above chance under decoded random starts, runs decode to the same token" in s["verdict"]
    assert s["metrics"]["verdict/agreement_above_chance"] == 1.0 and s["metrics"]["verdict/unique_below_chance"] == 1.0


def test_every_claim_names_the_null_and_gives_p():
    s = stats_for(one_coincidence(), initial_ids=one_coincidence() + 1)
    words = s["verdict"]
    assert words.startswith("49/50 tokens unique; decoded random starts give ")
    assert f"p = {s['metrics']['pvalue/unique_decoded_starts']:.2g} (this few unique or fewer)" in words
    assert f"uniform tokens 49.98 [49, 50], p = {s['metrics']['pvalue/unique_uniform']:.2g}" in words
    assert words.count("decoded random starts") >= 3 and words.count("uniform p = ") == 3  # across, agreement, Jaccard


def test_no_claim_without_the_primary_null():
    ids = np.tile([11, 12, 13, 14, 15], (10, 1))  # as repetitive as it gets
    s = stats_for(ids, initial_ids=ids + 100, start_pool=None)
    assert "nothing is claimed about chance" in s["verdict"] and "chance:" not in s["verdict"]
    assert "above chance" not in s["verdict"] and "Below chance" not in s["verdict"]
    assert not any(verdict.decisions(s)[k] for k in ("unique_below_chance", "agreement_above_chance",
                                                       "jaccard_above_chance"))
    assert "null/decoded_starts/unique_mean" not in s["metrics"] and "null/uniform/unique_mean" in s["metrics"]


def test_pool_without_hubs_gives_the_uniform_null():
    s = stats_for(one_coincidence(), initial_ids=one_coincidence() + 1, start_pool=distinct_pool())
    assert s["metrics"]["null/decoded_starts/unique_mean"] == 50.0


def gcg_like(within: int, across: int):
    """Issue 19's gcg run: 4 runs x 5 tokens, all different, then `within` runs repeating a token of their own
    ('ynamic' 'ynamic') and `across` tokens recurring in another run (' HIPAA')."""
    ids = np.random.default_rng(1).choice(50257, size=20, replace=False).reshape(4, 5)
    for r in range(within):
        ids[r, 4] = ids[r, 3]
    for k in range(across):
        ids[k + 1, 0] = ids[0, k + 1]
    return ids


def test_doublets_within_runs_alone_claim_nothing():
    ids = gcg_like(within=2, across=1)  # 17/20 unique, as in the issue: 2 doublets and one cross-run repeat
    s = stats_for(ids, initial_ids=ids + 1, start_name="random start tokens")
    assert s["n_unique_tokens"] == 17 and s["metrics"]["pvalue/unique_decoded_starts"] < 0.05
    assert s["metrics"]["stats/cross_run_repeats"] == 1 and s["metrics"]["stats/within_run_repeats"] == 2
    assert "below chance" not in s["verdict"].lower() and "above chance" not in s["verdict"]
    assert "Repeats across runs 1; random start tokens" in s["verdict"] and "a single coincidence" in s["verdict"]
    assert s["metrics"]["verdict/unique_below_chance"] == 0.0
    assert s["metrics"]["pvalue/within_run_repeats_decoded_starts"] < 0.05  # a uniform start almost never repeats


def test_repeats_across_runs_still_claim_beside_doublets():
    s = stats_for(gcg_like(within=2, across=2), initial_ids=gcg_like(0, 0) + 1, start_name="random start tokens")
    assert s["metrics"]["stats/cross_run_repeats"] == 2 and s["metrics"]["pvalue/cross_run_repeats_decoded_starts"] < 0.05
    assert "so the unique count is below chance under random start tokens" in s["verdict"]
    assert s["metrics"]["verdict/unique_below_chance"] == 1.0
