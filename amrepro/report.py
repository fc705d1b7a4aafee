"""What the user sees in the terminal (rich): a progress bar over epochs, the decoded-token table and the
reference's summary line. Nothing here computes or logs."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table
from rich.text import Text

from .headline import headline
from .printable import token_repr
from .secrets import redact
from .stats import NULLS, PRIMARY, REGISTRY


class _Console(Console):
    """rich's Console whose printed strings never show a URI's password or token: store URIs reach the terminal
    in many sentences (where a run was logged, why a store failed), and one redaction here covers them all."""

    def print(self, *objects, **kwargs):
        super().print(*(redact(o) if isinstance(o, str) else o for o in objects), **kwargs)


# Redirected to a file, rich would assume 80 columns and cut tokens; a log file has no width to respect.
console = _Console(highlight=False, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
errors = _Console(stderr=True, highlight=False)
PLAIN_PROGRESS_SECONDS = 30.0  # without a terminal: one progress line at most this often (and at 10% steps)


def note(text: str) -> None:
    """A one-line remark from a step that takes a while (e.g. converting a GGUF file), dimmed."""
    console.print(f"[dim]{_escape(text)}[/]", soft_wrap=True)  # a path stays one piece, copyable


@contextmanager
def epoch_progress(epochs: int, runs: int):
    """Yields on_epoch(epoch) for the optimization loop: a live bar in a terminal, plain lines otherwise (a
    redirected stdout sees no bar until the end, so a long run would look dead)."""
    if console.is_terminal:
        columns = (TextColumn(f"[bold]optimizing {runs} runs"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("epochs"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("optimize", total=epochs)
            yield lambda epoch: progress.update(task, completed=epoch + 1)
        return
    start = last = time.monotonic()
    step = max(1, epochs // 10)

    def on_epoch(epoch: int) -> None:
        nonlocal last
        now, done = time.monotonic(), epoch + 1
        if done == epochs or done % step == 0 or now - last >= PLAIN_PROGRESS_SECONDS:
            last = now
            left = (now - start) / done * (epochs - done)
            print(f"optimizing {runs} runs: epoch {done}/{epochs} ({100 * done // epochs}%), "
                  f"{now - start:.0f} s elapsed, ~{left:.0f} s left", flush=True)

    yield on_epoch


@contextmanager
def logging_progress(runs: int, done: int = 0):
    """Yields advance() for each run logged to MLflow (after the science: Ctrl-C here only says so, see signals)."""
    columns = (TextColumn("[bold]logging runs to MLflow"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("log", total=runs, completed=done)
        yield lambda: progress.advance(task)


def _grid(outcome) -> list[list[str] | None]:
    """Each run's tokens as token_repr shows them (an unprintable one with its id); None for a diverged run."""
    return [None if r in outcome.diverged else [token_repr(t, i) for t, i in zip(row, outcome.ids[r])]
            for r, row in enumerate(outcome.tokens)]


def _right(*headers: str, **options) -> list[Column]:
    return [Column(header, justify="right", **options) for header in headers]


def _activations(outcome, r: int) -> tuple[str, str]:
    return f"{float(outcome.result.final_activation[r]):.3f}", f"{float(outcome.decoded_activation[r]):.3f}"


def token_table(outcome, title: str = ""):
    """The decoded tokens, one row per seed, each token whole (repr, so spaces and escapes show). When a table
    of whole tokens is wider than the console, one line per seed instead of cut tokens."""
    title = title or f"Decoded tokens ({outcome.target.name})"
    grid, n_pos = _grid(outcome), len(outcome.tokens[0])
    repeated = {row["id"] for row in outcome.summary.get("counts", []) if row["count"] > 1}
    # per run: (token, its style), None for a diverged run
    styled = [None if row is None else [(t, "bold yellow" if int(i) in repeated else "")
                                        for t, i in zip(row, outcome.ids[r])] for r, row in enumerate(grid)]
    widest = max((len(t) for row in grid if row for t in row), default=8)
    if 8 + n_pos * (widest + 3) + 30 > console.width:
        return _token_lines(outcome, title, styled)
    positions = (Column(f"pos {p}", no_wrap=True, min_width=min(widest, 40)) for p in range(n_pos))
    table = Table(*_right("seed"), *positions, *_right("act (final)", "act (tokens)"), title=title, header_style="bold")
    for r, (seed, row) in enumerate(zip(outcome.result.seeds, styled)):
        if row is None:
            table.add_row(str(seed), *(["[red]diverged[/]"] + [""] * (n_pos - 1)), "n/a", "n/a")
        else:
            table.add_row(_seed_cell(outcome, r), *(f"[{style}]{_escape(t)}[/]" if style else _escape(t)
                                                    for t, style in row), *_activations(outcome, r))
    return table


def _token_lines(outcome, title: str, styled: list) -> Group:
    """One entry per seed, wrapped by us only between tokens (rich would break inside "' The'")."""
    lines = [Text(f"{title}, repeated tokens in yellow", style="bold")]
    for r, (seed, row) in enumerate(zip(outcome.result.seeds, styled)):
        if row is None:
            lines.append(Text(f"seed {seed}: ").append("diverged", style="red"))
            continue
        final, decoded = _activations(outcome, r)
        pieces = [*row, (f"act {final} (tokens {decoded})", "dim")]
        line = Text.from_markup(f"seed {_seed_cell(outcome, r)}: ")
        line.no_wrap, line.overflow = True, "ignore"
        for k, (piece, style) in enumerate(pieces):
            sep = "" if k == 0 else ("  " if k == len(pieces) - 1 else " | ")
            if k and len(line) + len(sep) + len(piece) > console.width:
                lines.append(line)
                line, sep = Text("    ", no_wrap=True, overflow="ignore"), ""
            line.append(sep)
            line.append(piece, style=style or None)
        lines.append(line)
    return Group(*lines)


def _seed_cell(outcome, r: int) -> str:
    """The seed, flagged when its loss spiked (spikes.py)."""
    spike = (outcome.summary.get("loss_spikes") or [None] * (r + 1))[r]
    seed = str(outcome.result.seeds[r])
    return seed if spike is None else f"{seed} [yellow](spike at {spike['epoch']})[/]"


def primary_name(stats: dict) -> str:
    """What the primary null is called: the method's own starts (methods.start_name, via the statistics)."""
    return stats["nulls"].get(PRIMARY, {}).get("name", "the method's starts")


def stats_table(stats: dict) -> Table:
    """Observed statistics (stats.REGISTRY order) with their bootstrap interval, the two chance levels (the primary
    null, the method's own starts, first) with their one-sided p-values, and the un-optimized baseline."""
    nulls, initial, boot = stats["nulls"], stats["baselines"]["initial_tokens"], stats["bootstrap"]
    ds, un, name = nulls.get(PRIMARY), nulls["uniform"], primary_name(stats)
    # One line per row from ~110 columns on; a narrower terminal breaks cells at their spaces and folds (never
    # crops) a number that does not fit.
    table = Table(Column("statistic", overflow="fold"), *_right("observed", "bootstrap", f"chance: {name}", "p",
                                                                "chance: uniform", "p", "initial", overflow="fold"),
                  title="Reproducibility statistics (95% intervals)", header_style="bold")
    table.caption = (f"bootstrap: runs resampled. chance: {un['n_draws']} Monte Carlo draws of {name} (the primary "
                     "null: the method's own starts, decoded as its results are) or of uniformly random tokens. p: "
                     "one-sided (unique: as few or fewer; others: as large or larger). initial: the runs' "
                     "un-optimized starts")

    def num(x, digits=3):
        return "n/a" if x is None else f"{x:.{digits}f}"

    # d: a dict of mean, low, high and pvalue, as nulls.interval gives them; None where there is none
    def interval(d, digits):
        return "n/a" if not d or d.get("low") is None else f"[{num(d['low'], digits)}, {num(d['high'], digits)}]"

    def chance(d, digits, ends):
        return "n/a" if not d or d.get("mean") is None else f"{num(d['mean'], digits)} {interval(d, ends)}"

    def p(d, key="pvalue"):
        return "n/a" if not d or d.get(key) is None else f"{d[key]:.2g}"

    for stat in REGISTRY:
        value, own = stats["observed"][stat.key], ds[stat.key] if ds else None
        ends, digits = (0 if stat.count else stat.digits), (2 if stat.count else 4)
        shown = f"{value}/{stats['n_tokens_total']}" if stat.key == "n_unique" else num(value, ends)  # as the reference
        table.add_row(stat.label, shown, interval(boot.get(stat.key), 2) if stat.key in boot else "",
                      chance(own, digits, ends), p(own), chance(un[stat.key], digits, ends), p(un[stat.key]),
                      num(initial.get(stat.key), ends))
    table.add_row("unique fraction", num(stats["unique_fraction"]), interval(boot.get("unique_fraction"), 2),
                  "", "", "", "", num(initial.get("unique_fraction")))
    kept = stats["start_token_kept"]  # a row's cells left out are blank (rich)
    table.add_row("start token kept", num(kept["mean"]), "", p(kept, "chance"), p(kept))
    # (bootstrap key, label, observed value)
    for key, label, observed in (("matched_cosine_mean", "matched cosine", stats["matched_cosine_mean"]),
                                 ("cosine_mean", "cosine to token", stats["cosine"]["mean"]),
                                 ("final_activation_mean", "activation", stats["final_activation"]["mean"]),
                                 ("projection_gap_mean", "projection gap", stats["projection_gap"]["mean"])):
        table.add_row(label, num(observed), interval(boot.get(key), 2))
    conv = stats.get("convergence")
    if conv is not None:
        table.add_row(f"activation change, last {conv['window_epochs']} epochs", f"max {max(conv['per_run']):+.1%}")
        table.add_row(f"runs still rising (> {conv['threshold']:.0%})",
                      f"{conv['n_still_rising']}/{len(conv['per_run'])}")
    return table


def print_outcome(outcome, parent_id: str | None, uri: str | None) -> None:
    console.print(token_table(outcome))
    for r, why in outcome.diverged.items():
        console.print(f"[red]seed {outcome.result.seeds[r]} diverged:[/] {_escape(why)} (run marked FAILED)")
    if outcome.summary["statistics"] is None:
        console.print(f"[bold red]No result:[/] all {len(outcome.diverged)} runs diverged; no statistic was computed.")
        return
    console.print(stats_table(outcome.summary["statistics"]))
    s = outcome.summary  # the reference's format: 'N/M tokens are unique.', then each repeated token with its count
    console.print(f"{s['n_unique_tokens']}/{s['n_tokens_total']} tokens are unique.")
    for row in s["repeated"]:
        console.print(_escape(f"  {row['token']!r} (id {row['id']}) appears {row['count']} times"))
    console.print(f"[bold]Verdict: {_escape(headline(outcome.summary) or 'see below')}[/]")  # one line, then the detail
    console.print(_escape(outcome.summary["statistics"]["verdict"]), soft_wrap=True)
    if parent_id:
        console.print(f"MLflow parent run {parent_id} ({len(outcome.result.seeds)} child runs) in {uri}")


def print_method(method: str, outcome) -> None:
    """`amrepro compare`, after each method: its verdict in one line and its seeds' tokens, as `amrepro run`
    shows them (the full statistics of every method: the table at the end and each method run's page)."""
    console.print(f"[bold]{method}[/]: {_escape(headline(outcome.summary) or 'see its run page for the verdict')}",
                  soft_wrap=True)
    console.print(token_table(outcome, f"{method}: decoded tokens ({outcome.target.name})"))


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def print_decoded(run_id: str, rows) -> None:
    """rows: (seed, tokens, matches the logged tokens.json)."""
    table = Table(*_right("seed"), "tokens", "= tokens.json",
                  title=f"Tokens re-derived from the logged final embeddings of {run_id}", header_style="bold")
    for seed, tokens, match in rows:
        table.add_row(str(seed), _escape(" | ".join(repr(t) for t in tokens)),
                      "[green]yes[/]" if match else "[red]NO[/]")
    console.print(table)
    bad = sum(not match for _, _, match in rows)
    console.print("all tokens match the logged tokens.json." if not bad
                  else f"[red]{bad} run(s) decode to tokens that differ from the logged tokens.json.[/]")


def print_reproduction(run_id: str, rows: list[dict], differences: dict, verdict: str, new_run: str) -> None:
    table = Table(*_right("seed", "initial identical", "final identical", "max |delta| final", "tokens identical"),
                  title=f"Reproducing {run_id}", header_style="bold")
    yes = lambda ok: "[green]yes[/]" if ok else "[red]no[/]"  # noqa: E731
    for row in rows:
        table.add_row(str(row["seed"]), yes(row["initial_identical"]), yes(row["final_identical"]),
                      f"{row['max_abs_diff']:.2e}", yes(row["tokens_identical"]))
    console.print(table)
    for key, (logged, now) in differences.items():
        console.print(f"  {key}: logged {logged}, now {now}")
    colour = "green" if verdict.startswith("reproduced") else "red"
    console.print(f"[bold {colour}]{_escape(verdict)}[/]  (logged as run {new_run})")


# --- the same results for the MLflow UI (plain data and markdown: nothing here talks to MLflow) ------------

def token_columns(outcome) -> dict[str, list]:
    """The decoded-token grid as table columns (seed, pos 0..n-1, activations) for mlflow's log_table."""
    grid = _grid(outcome)
    columns: dict[str, list] = {"seed": list(outcome.result.seeds)}
    for p in range(len(outcome.tokens[0])):
        columns[f"pos {p}"] = ["(diverged)" if row is None else row[p] for row in grid]
    for name, values in (("act (final)", outcome.result.final_activation),
                         ("act (tokens)", outcome.decoded_activation)):
        columns[name] = [None if r in outcome.diverged else round(float(a), 4) for r, a in enumerate(values)]
    return columns


def model_label(model: str) -> str:
    """A model as a reader names it: a Hub id as it is; a local folder or file by its name (and its folder's if
    the name is generic), not the full path of the machine that ran it."""
    if not os.path.exists(os.path.expanduser(model)):
        return model
    path = Path(model.rstrip("/"))
    name = path.name.removesuffix(".gguf")
    return f"{path.parent.name}/{name}" if name.lower() in ("model", "models", "checkpoint", "snapshot", "final",
                                                            "hf") else name


def markdown_summary(outcome) -> str:
    """The parent run's description (tag mlflow.note.content, rendered as markdown on its page)."""
    c, stats = outcome.config, outcome.summary["statistics"]
    nulls, primary = stats.get("nulls", {}), primary_name(stats)
    # an outcome file saved before the registry (`amrepro log FILE` after an upgrade) has only the older keys
    observed = stats.get("observed") or {"n_unique": stats["n_unique_tokens"], "jaccard_mean": stats["jaccard_mean"],
                                         "positional_agreement": stats["positional_agreement"]}
    line = headline(outcome.summary)  # the verdict in one line leads; the detail follows
    lines = [*([f"### {line}", ""] if line else []),
             f"**{model_label(c.model)}**, `{outcome.target.name}`, {len(outcome.result.seeds)} seeds x {c.n_steps} "
             f"{c.step_unit}", "", f"**Verdict.** {stats['verdict']}", "",
             f"| statistic | observed | chance: {primary} | p | chance: uniform | p |", "|---|---|---|---|---|---|"]
    for stat in (s for s in REGISTRY if s.key in observed):
        value = observed[stat.key]
        shown = f"{value}/{stats['n_tokens_total']}" if stat.key == "n_unique" else _num(value)
        cells = []
        for null in NULLS:
            d = nulls.get(null, {}).get(stat.key) or {}
            cells += [f"{_num(d.get('mean'))} [{_num(d.get('low'))}, {_num(d.get('high'))}]", _num(d.get("pvalue"))]
        lines.append(f"| {stat.label} | {shown} | " + " | ".join(cells) + " |")
    lines += ["", "| seed | " + " | ".join(f"pos {p}" for p in range(len(outcome.tokens[0]))) + " | act (final) |",
              "|---" * (len(outcome.tokens[0]) + 2) + "|"]
    for r, (seed, row) in enumerate(zip(outcome.result.seeds, _grid(outcome))):
        cells = ["(diverged)"] * len(outcome.tokens[r]) + ["n/a"] if row is None else \
            [f"`{t}`".replace("|", "\\|") for t in row] + [f"{float(outcome.result.final_activation[r]):.3f}"]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)[:5000]


def _num(x, digits: int = 3, missing: str = "n/a") -> str:
    if x is None:
        return missing
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def print_compare(rows: list[dict], top_run: str, uri: str) -> None:
    """`amrepro compare`: one row per method (and the corpus), p-values under each method's own start null."""
    stat_heads = [h for s in REGISTRY for h in (s.label, "p", *(["p unif"] if s.uniform_column else []))]
    table = Table("method", *_right("act mean", "act best", "p99", *stat_heads, "xent", "wall s"),
                  title="methods compared (p: under each method's own start distribution; p unif: uniform tokens)")

    def f(x, digits=3):
        return _num(x, digits, "-")

    for r in rows:
        cells = []
        for s in REGISTRY:
            value = r.get(s.column)
            cells.append(f"{value}/{r['n_tokens']}" if s.key == "n_unique" and value is not None else f(value))
            cells += [f(r.get(s.p_column), 2)] + ([f(r.get(f"{s.p_column}_uniform"), 2)] if s.uniform_column else [])
        table.add_row(r["method"], f(r.get("act_mean")), f(r.get("act_best")), f(r.get("act_p99")), *cells,
                      f(r.get("xent_mean")), f(r.get("wall_s"), 3))
    console.print(table)
    console.print(f"compare run {top_run} in {uri}", soft_wrap=True, markup=False)
