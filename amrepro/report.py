"""What the user sees in the terminal (rich): a progress bar over epochs, the decoded-token table and the
reference's summary line. Nothing here computes or logs."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)


@contextmanager
def epoch_progress(epochs: int, runs: int):
    """Yields on_epoch(epoch) for the optimization loop."""
    columns = (TextColumn(f"[bold]optimizing {runs} runs"), BarColumn(), MofNCompleteColumn(),
               TextColumn("epochs"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("optimize", total=epochs)
        yield lambda epoch: progress.update(task, completed=epoch + 1)


@contextmanager
def logging_progress(runs: int, done: int = 0):
    """Yields advance() for each run logged to MLflow (after the science: Ctrl-C here only says so, see signals)."""
    columns = (TextColumn("[bold]logging runs to MLflow"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("log", total=runs, completed=done)
        yield lambda: progress.advance(task)


def token_table(outcome) -> Table:
    n_pos = len(outcome.tokens[0])
    table = Table(title=f"Decoded tokens ({outcome.target.name})", header_style="bold")
    table.add_column("seed", justify="right")
    for p in range(n_pos):
        table.add_column(f"pos {p}")
    table.add_column("act (final)", justify="right")
    table.add_column("act (tokens)", justify="right")
    counts = {row["id"]: row["count"] for row in outcome.summary.get("unique", [])}
    for r, seed in enumerate(outcome.result.seeds):
        if r in outcome.diverged:
            table.add_row(str(seed), *(["[red]diverged[/]"] + [""] * (n_pos - 1)), "n/a", "n/a")
            continue
        cells = []
        for token_id, text in zip(outcome.ids[r], outcome.tokens[r]):
            shown = repr(text)
            cells.append(f"[bold yellow]{_escape(shown)}[/]" if counts[int(token_id)] > 1 else _escape(shown))
        table.add_row(str(seed), *cells, f"{float(outcome.result.final_activation[r]):.3f}",
                      f"{float(outcome.decoded_activation[r]):.3f}")
    return table


def summary_lines(summary: dict) -> list[str]:
    """The reference's format: 'N/M tokens are unique.', then each repeated token with its count."""
    lines = [f"{summary['n_unique_tokens']}/{summary['n_tokens_total']} tokens are unique."]
    lines += [f"  {row['token']!r} (id {row['id']}) appears {row['count']} times" for row in summary["repeated"]]
    return lines


def stats_table(stats: dict) -> Table:
    """Observed statistics with their bootstrap interval, next to the chance and un-optimized baselines."""
    random, initial, boot = stats["baselines"]["random_tokens"], stats["baselines"]["initial_tokens"], stats["bootstrap"]
    table = Table(title="Reproducibility statistics (95% intervals)", header_style="bold")
    table.add_column("statistic", no_wrap=True)
    for column in ("observed", "bootstrap", "chance", "initial"):
        table.add_column(column, justify="right", no_wrap=True)
    table.caption = "bootstrap: runs resampled; chance: uniformly random real tokens; initial: un-optimized starts"

    def num(x, digits=3):
        return "n/a" if x is None else f"{x:.{digits}f}"

    def interval(d, digits=3):
        return "n/a" if not isinstance(d, dict) or d.get("low") is None else f"[{num(d['low'], digits)}, {num(d['high'], digits)}]"

    def chance(d):
        return f"{num(d['mean'], 2)} {interval(d, 2)}" if isinstance(d, dict) and d.get("mean") is not None else "n/a"

    table.add_row("unique tokens", f"{stats['n_unique_tokens']}/{stats['n_tokens_total']}", "",
                  f"{random['n_unique']['mean']:.1f} [{random['n_unique']['low']:.0f}, {random['n_unique']['high']:.0f}]",
                  str(initial["n_unique"]))
    for key, label in (("unique_fraction", "unique fraction"), ("positional_agreement", "agreement"),
                       ("jaccard_mean", "Jaccard")):
        table.add_row(label, num(stats[key]), interval(boot.get(key), 2), chance(random.get(key)), num(initial.get(key)))
    # (bootstrap key, label, observed value)
    for key, label, observed in (("matched_cosine_mean", "matched cosine", stats["matched_cosine_mean"]),
                                 ("cosine_mean", "cosine to token", stats["cosine"]["mean"]),
                                 ("final_activation_mean", "activation", stats["final_activation"]["mean"]),
                                 ("projection_gap_mean", "projection gap", stats["projection_gap"]["mean"])):
        table.add_row(label, num(observed), interval(boot.get(key), 2), "", "")
    return table


def print_outcome(outcome, parent_id: str | None, uri: str | None) -> None:
    console.print(token_table(outcome))
    for r, why in outcome.diverged.items():
        console.print(f"[red]seed {outcome.result.seeds[r]} diverged:[/] {_escape(why)} (run marked FAILED)")
    if outcome.summary["statistics"] is None:
        console.print(f"[bold red]No result:[/] all {len(outcome.diverged)} runs diverged; no statistic was computed.")
        return
    console.print(stats_table(outcome.summary["statistics"]))
    for line in summary_lines(outcome.summary):
        console.print(_escape(line))
    console.print(f"[bold]Verdict:[/] {_escape(outcome.summary['statistics']['verdict'])}")
    if parent_id:
        console.print(f"MLflow parent run {parent_id} ({len(outcome.result.seeds)} child runs) in {uri}")


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def print_decoded(run_id: str, rows) -> None:
    """rows: (seed, tokens, matches the logged tokens.json)."""
    table = Table(title=f"Tokens re-derived from the logged final embeddings of {run_id}", header_style="bold")
    table.add_column("seed", justify="right")
    table.add_column("tokens")
    table.add_column("= tokens.json")
    for seed, tokens, match in rows:
        table.add_row(str(seed), _escape(" | ".join(repr(t) for t in tokens)), "[green]yes[/]" if match else "[red]NO[/]")
    console.print(table)
    bad = sum(not match for _, _, match in rows)
    console.print("all tokens match the logged tokens.json." if not bad
                  else f"[red]{bad} run(s) decode to tokens that differ from the logged tokens.json.[/]")


def print_reproduction(run_id: str, rows: list[dict], differences: dict, verdict: str, new_run: str) -> None:
    table = Table(title=f"Reproducing {run_id}", header_style="bold")
    for column in ("seed", "initial identical", "final identical", "max |delta| final", "tokens identical"):
        table.add_column(column, justify="right")
    yes = lambda ok: "[green]yes[/]" if ok else "[red]no[/]"  # noqa: E731
    for row in rows:
        table.add_row(str(row["seed"]), yes(row["initial_identical"]), yes(row["final_identical"]),
                      f"{row['max_abs_diff']:.2e}", yes(row["tokens_identical"]))
    console.print(table)
    for key, (logged, now) in differences.items():
        console.print(f"  {key}: logged {logged}, now {now}")
    colour = "green" if verdict.startswith("reproduced") else "red"
    console.print(f"[bold {colour}]{_escape(verdict)}[/]  (logged as run {new_run})")
