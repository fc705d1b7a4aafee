"""The verdict in one line, for the top of the terminal report, the run's description, the dashboard and the
sweep/compare indexes: what a newcomer needs first. It says no more than verdict.decisions() allows (the same
rules: p < ALPHA under the primary null and at least MIN_EVENTS events), names the deciding p-value, and counts
the runs to distrust (diverged, loss spike, not converged). The full verdict follows it wherever it is shown."""

from __future__ import annotations

from .verdict import PRIMARY, decisions, p_text


def headline(summary: dict) -> str:
    """e.g. 'No evidence that seeds agree (agreement p = 0.15); tokens identify the seed (40% kept); 9/10 runs
    not converged'. summary: an outcome's summary (summary.json). '' for a summary too old to decide from."""
    stats, runs = summary.get("statistics"), len(summary.get("seeds") or [])
    diverged = len(summary.get("diverged") or [])
    if stats is None:
        return f"No result: all {diverged} runs diverged"
    try:
        d = decisions(stats)
    except KeyError:  # a summary saved before the statistics registry (`amrepro log FILE` after an upgrade)
        return ""
    null = stats["nulls"].get(PRIMARY)
    parts = []
    if stats["positional_agreement"] is None:
        parts.append("One run: no run-to-run agreement to test")
    elif null is None:
        parts.append("No chance level was computed: nothing is claimed")
    elif d["agreement_above_chance"] or d["jaccard_above_chance"]:
        key, label = (("positional_agreement", "agreement") if d["agreement_above_chance"]
                      else ("jaccard_mean", "Jaccard"))
        parts.append(f"Seeds agree more than chance ({label} p = {p_text(null[key]['pvalue'])})")
    else:
        parts.append(f"No evidence that seeds agree (agreement p = {p_text(null['positional_agreement']['pvalue'])}, "
                     f"Jaccard p = {p_text(null['jaccard_mean']['pvalue'])})")
    if d["unique_below_chance"]:
        parts.append(f"fewer unique tokens than chance ({stats['n_unique_tokens']}/{stats['n_tokens_total']}, "
                     f"p = {p_text(null['n_unique']['pvalue'])})")
    kept = stats["start_token_kept"]
    if d["tokens_identify_seed"]:
        parts.append(f"tokens identify the seed ({kept['mean']:.0%} kept from the start)")
    elif d["start_tokens_kept"]:
        parts.append(f"{kept['mean']:.0%} of tokens kept from the start")
    if diverged:
        parts.append(f"{diverged}/{runs} runs diverged")
    spiked = sum(s is not None for s in summary.get("loss_spikes") or [])
    if spiked:
        parts.append(f"{spiked}/{runs} runs had a loss spike")
    if d["not_converged"]:
        conv = stats["convergence"]
        parts.append(f"{conv['n_still_rising']}/{len(conv['per_run'])} runs not converged")
    return "; ".join(parts)
