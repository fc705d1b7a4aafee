"""The verdict: what the statistics allow one to say, in words and as 0/1 metrics, from one set of rules.

Every statistic of stats.REGISTRY with a claim decides one flag verdict/<claim>, claimed only when BOTH its
one-sided p-value under the primary null (the method's own starts, see nulls.py) is below ALPHA and at least
MIN_EVENTS coincidences make it up. A single coincidence is named as one and never flips a verdict; without a
primary null nothing is claimed. Every sentence names its null and gives p; the uniform null is reported beside
it, never decides. The unique count's repeats mix seeds agreeing with runs repeating their own token ('ynamic'
'ynamic'), so verdict/unique_below_chance rests on the repeats across runs only; the repeats within runs get
their own sentence, null and flag.
"""

from __future__ import annotations

from .stats import ALPHA, CLAIMS, MIN_EVENTS, PRIMARY


def p_text(p: float | None) -> str:
    """A p-value as the verdict and the headline print it."""
    return "n/a" if p is None else f"{p:.2g}"


def _chance(null: dict, digits: int, count: bool = False) -> str:
    """'mean [low, high]' of a null; the ends of a count's interval are counts."""
    if null.get("mean") is None:
        return "n/a"
    ends = 0 if count else digits
    return f"{null['mean']:.{digits}f} [{null['low']:.{ends}f}, {null['high']:.{ends}f}]"


def _significant(stats: dict, stat) -> bool:
    null, value = stats["nulls"].get(PRIMARY), stats["observed"][stat.key]
    p = None if null is None or value is None else null[stat.key]["pvalue"]
    return p is not None and p < ALPHA and stats["nulls"]["events"][stat.events] >= MIN_EVENTS


def decisions(stats: dict) -> dict[str, bool]:
    """The claims the data allow, as booleans; the words and the verdict/* metrics both follow these."""
    kept, conv = stats["start_token_kept"], stats.get("convergence")
    seed_kept = (kept["pvalue"] is not None and kept["pvalue"] < ALPHA and kept["n_kept"] >= MIN_EVENTS)
    return {
        **{stat.claim: _significant(stats, stat) for stat in CLAIMS},
        # kept more often than chance, and more often than another run's token: the seed, not the neuron, decides
        "start_tokens_kept": seed_kept,
        "tokens_identify_seed": seed_kept and kept["mean"] > max(stats["positional_agreement"] or 0.0,
                                                                 stats["jaccard_mean"] or 0.0),
        "not_converged": conv is not None and conv["n_still_rising"] > 0,
    }


def verdict(stats: dict) -> str:
    d, nulls, events = decisions(stats), stats["nulls"], stats["nulls"]["events"]
    ds, un = nulls.get(PRIMARY), nulls["uniform"]
    u, n, iu = stats["n_unique_tokens"], stats["n_tokens_total"], stats["baselines"]["initial_tokens"]["n_unique"]
    words = f"{u}/{n} tokens unique"
    if ds is None:
        return words + (f"; uniform tokens give {_chance(un['n_unique'], 2, count=True)}, p = "
                        f"{p_text(un['n_unique']['pvalue'])}. No decoded-starts null was computed, so nothing is "
                        "claimed about chance.")
    name = ds.get("name", "decoded random starts")  # the method's own starts: vectors decoded, or tokens
    words += (f"; {name} give {_chance(ds['n_unique'], 2, count=True)}, p = {p_text(ds['n_unique']['pvalue'])}"
              f" (this few unique or fewer); uniform tokens {_chance(un['n_unique'], 2, count=True)}, "
              f"p = {p_text(un['n_unique']['pvalue'])}; decoded initial embeddings of these runs {iu}/{n}.")
    across, within = events["cross_run_repeats"], events["within_run_repeats"]
    where = ("across runs (a token in two or more runs)", "within a run (a run repeating its own token)")
    if events["repeats"] == 1:
        words += (f" The one repeat is {where[0] if across else where[1]}; only "
                  "repeats across runs say whether seeds agree.")
    elif events["repeats"]:
        words += (f" Of the {events['repeats']} repeats, {across} {'is' if across == 1 else 'are'} {where[0]} and "
                  f"{within} {where[1]}; only repeats across runs say whether seeds agree.")
    single = stats["n_runs"] < 2
    for stat in CLAIMS:  # none about pairs of a single run, nor about repeats within runs that did not happen
        if not (stat.pairwise and single) and (stat.supports != "method" or events[stat.events]):
            words += _sentence(stats, stat, d[stat.claim], name)
    if single:
        words += " A single run has no run-to-run agreement to measure."
    return words + _kept(stats["start_token_kept"], d) + _converged(stats.get("convergence"), d)


def _sentence(stats: dict, stat, claimed: bool, name: str) -> str:
    """'<Label> <value> (<n> <events>); <null> <chance>, p = ..; uniform p = ..: <claim or why not>.'"""
    value, n_events = stats["observed"][stat.key], stats["nulls"]["events"][stat.events]
    ds, un = stats["nulls"][PRIMARY][stat.key], stats["nulls"]["uniform"][stat.key]
    shown = f"{value:.0f}" if stat.count else f"{value:.{stat.digits}f}"
    if stat.events != stat.key:  # a count is its own events; a mean says how many coincidences make it up
        shown += f" ({n_events} {stat.event[0] if n_events == 1 else stat.event[1]})"
    words = (f" {stat.label[0].upper() + stat.label[1:]} {shown}; {name} {_chance(ds, stat.digits, stat.count)}, "
             f"p = {p_text(ds['pvalue'])}; uniform p = {p_text(un['pvalue'])}: ")
    if claimed:
        words += stat.says.format(null=name) + "."
        initial = stats["baselines"]["initial_tokens"].get(stat.key)
        if initial is not None and (initial >= value if stat.larger else initial <= value):
            words += (" But the decoded un-optimized starts of these runs show as much or more, so it is explained "
                      "by decoding to nearest tokens, not by the optimization.")
        return words
    if n_events == 1 and ds["pvalue"] is not None and ds["pvalue"] < ALPHA:
        return words + "a single coincidence, not evidence."
    if un["pvalue"] is not None and un["pvalue"] < ALPHA and n_events >= MIN_EVENTS:
        return words + (f"within chance under {name}, whose hub tokens recur often; "
                        "only the uniform null, which ignores hubs, finds it beyond chance.")
    return words + "within chance."


def _kept(kept: dict, d: dict) -> str:
    """Mentioned when it matters: more final tokens equal their own start's token than chance allows."""
    if not d["start_tokens_kept"]:
        return ""
    words = (f" {kept['n_kept']}/{kept['n_total']} final tokens ({kept['mean']:.0%}) are the decoded token of "
             f"their own random start (chance {kept['chance']:.2g} per token, p = {p_text(kept['pvalue'])})")
    if d["tokens_identify_seed"]:
        return words + ": the decoded tokens identify the seed more than the neuron."
    return words + ": the optimization keeps part of its start."


def _converged(conv: dict | None, d: dict) -> str:
    if not d["not_converged"]:
        return ""
    return (f" Not converged: the activation of {conv['n_still_rising']}/{len(conv['per_run'])} runs still rose by "
            f"more than {conv['threshold']:.0%} over the last {conv['window_epochs']} epochs (up to "
            f"{max(conv['per_run']):.1%}); more epochs may change the tokens.")
