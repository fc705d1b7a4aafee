"""The verdict: what the statistics allow one to say, in words and as 0/1 metrics, from one set of rules.

A statistic is called "above chance" / "below chance" only when BOTH hold:
- its one-sided p-value under the primary null (decoded random starts, see nulls.py) is below ALPHA, and
- at least MIN_EVENTS coincidences make it up (2 repeated tokens for the unique count, 2 agreeing run-pair
  positions for agreement, 2 shared tokens summed over run pairs for Jaccard).
A single coincidence is named as one and never flips a verdict; without a decoded-starts null nothing is
claimed. Every sentence names its null and gives p. The uniform null is reported beside it, never decides.
"""

from __future__ import annotations

ALPHA = 0.05
MIN_EVENTS = 2
PRIMARY = "decoded_starts"


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.2g}"


def _chance(null: dict, digits: int, count: bool = False) -> str:
    """'mean [low, high]' of a null; the ends of a count's interval are counts."""
    if null.get("mean") is None:
        return "n/a"
    ends = (f"{null['low']:.0f}", f"{null['high']:.0f}") if count else (f"{null['low']:.{digits}f}", f"{null['high']:.{digits}f}")
    return f"{null['mean']:.{digits}f} [{ends[0]}, {ends[1]}]"


def _significant(stats: dict, key: str, events: str) -> bool:
    null = stats["nulls"].get(PRIMARY)
    p = None if null is None else null[key]["pvalue"]
    return p is not None and p < ALPHA and stats["nulls"]["events"][events] >= MIN_EVENTS


def decisions(stats: dict) -> dict[str, bool]:
    """The claims the data allow, as booleans; the words and the verdict/* metrics both follow these."""
    kept, conv = stats["start_token_kept"], stats.get("convergence")
    pairwise = stats["positional_agreement"] is not None
    seed_kept = (kept["pvalue"] is not None and kept["pvalue"] < ALPHA and kept["n_kept"] >= MIN_EVENTS)
    return {
        "unique_below_chance": _significant(stats, "n_unique", "repeats"),
        "agreement_above_chance": pairwise and _significant(stats, "positional_agreement", "agreeing_positions"),
        "jaccard_above_chance": pairwise and _significant(stats, "jaccard_mean", "shared_tokens"),
        # kept more often than chance, and more often than another run's token: the seed, not the neuron, decides
        "start_tokens_kept": seed_kept,
        "tokens_identify_seed": seed_kept and kept["mean"] > max(stats["positional_agreement"] or 0.0,
                                                                 stats["jaccard_mean"] or 0.0),
        "not_converged": conv is not None and conv["n_still_rising"] > 0,
    }


def verdict_metrics(stats: dict) -> dict[str, float]:
    return {f"verdict/{k}": float(v) for k, v in decisions(stats).items()}


def verdict(stats: dict) -> str:
    d, nulls, events = decisions(stats), stats["nulls"], stats["nulls"]["events"]
    ds, un = nulls.get(PRIMARY), nulls["uniform"]
    u, n, iu = stats["n_unique_tokens"], stats["n_tokens_total"], stats["baselines"]["initial_tokens"]["n_unique"]
    words = f"{u}/{n} tokens unique"
    if ds is None:
        words += (f"; uniform tokens give {_chance(un['n_unique'], 2, count=True)}, p = {_p(un['n_unique']['pvalue'])}. No "
                  "decoded-starts null was computed, so nothing is claimed about chance.")
        return words
    name = ds.get("name", "decoded random starts")  # the method's own starts: vectors decoded, or tokens
    words += (f"; {name} give {_chance(ds['n_unique'], 2, count=True)}, p = {_p(ds['n_unique']['pvalue'])}"
              f" (this few unique or fewer); uniform tokens {_chance(un['n_unique'], 2, count=True)}, "
              f"p = {_p(un['n_unique']['pvalue'])}; decoded initial embeddings of these runs {iu}/{n}. ")
    if d["unique_below_chance"]:
        words += f"Below chance under {name} ({events['repeats']} repeats)."
        if iu <= u:
            words += (" But the un-optimized initial embeddings repeat as much or more, so the repetition is "
                      "explained by decoding to nearest tokens, not by the optimization.")
    elif events["repeats"] == 1 and ds["n_unique"]["pvalue"] < ALPHA:
        words += "One repeated token: a single coincidence, not evidence of a preferred token set."
    elif un["n_unique"]["pvalue"] is not None and un["n_unique"]["pvalue"] < ALPHA:
        words += (f"Within chance under {name}: nearest-token decoding of random vectors repeats "
                  "hub tokens this often; only the uniform null, which ignores hubs, finds fewer unique than chance.")
    else:
        words += "Within chance: no evidence of a preferred token set."
    if stats["positional_agreement"] is None:
        words += " A single run has no run-to-run agreement to measure."
    else:
        words += _pairwise("Positional agreement", stats["positional_agreement"], ds["positional_agreement"],
                           un["positional_agreement"], events["agreeing_positions"], name,
                           ("run pair decodes the same token at the same position",
                            "run-pair positions with the same token"), d["agreement_above_chance"],
                           "runs decode to the same token at the same position more often than chance")
        words += _pairwise("Jaccard of token sets", stats["jaccard_mean"], ds["jaccard_mean"], un["jaccard_mean"],
                           events["shared_tokens"], name, ("token shared by a pair of runs",
                                                     "tokens shared, summed over pairs of runs"),
                           d["jaccard_above_chance"],
                           "runs share tokens more than chance, evidence that AM converges to preferred tokens")
    words += _kept(stats["start_token_kept"], d)
    words += _converged(stats.get("convergence"), d)
    return words


def _pairwise(label, value, ds, un, n_events, name, event, claim, meaning) -> str:
    words = (f" {label} {value:.3f} ({n_events} {event[0] if n_events == 1 else event[1]}); {name} "
             f"{_chance(ds, 3)}, p = {_p(ds['pvalue'])}; uniform p = {_p(un['pvalue'])}: ")
    if claim:
        return words + f"above chance under {name}, {meaning}."
    if n_events == 1:
        return words + "a single coincidence, not evidence."
    return words + "within chance."


def _kept(kept: dict, d: dict) -> str:
    """Mentioned when it matters: more final tokens equal their own start's token than chance allows."""
    if not d["start_tokens_kept"]:
        return ""
    words = (f" {kept['n_kept']}/{kept['n_total']} final tokens ({kept['mean']:.0%}) are the decoded token of "
             f"their own random start (chance {kept['chance']:.2g} per token, p = {_p(kept['pvalue'])})")
    if d["tokens_identify_seed"]:
        return words + ": the decoded tokens identify the seed more than the neuron."
    return words + ": the optimization keeps part of its start."


def _converged(conv: dict | None, d: dict) -> str:
    if not d["not_converged"]:
        return ""
    return (f" Not converged: the activation of {conv['n_still_rising']}/{len(conv['per_run'])} runs still rose by "
            f"more than {conv['threshold']:.0%} over the last {conv['window_epochs']} epochs (up to "
            f"{max(conv['per_run']):.1%}); more epochs may change the tokens.")
