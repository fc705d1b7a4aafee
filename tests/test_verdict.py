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
    assert s["nulls"]["events"] == {"repeats": 1, "agreeing_positions": 1, "shared_tokens": 1}
    assert "above chance" not in s["verdict"] and "below chance" not in s["verdict"].lower()
    assert s["verdict"].count("a single coincidence, not evidence") == 3  # unique count, agreement, Jaccard
    assert "One repeated token: a single coincidence" in s["verdict"]
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
    assert words.count("decoded random starts") >= 3 and words.count("uniform p = ") == 2


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
