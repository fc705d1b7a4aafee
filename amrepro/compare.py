"""`amrepro compare`: one target, one set of seeds, several methods, side by side in MLflow.

Layout: a top run (tag amrepro.compare = the methods, params = the shared hyperparameters and `methods`), one
nested run per method (param `method`; exactly the parent run `amrepro run --method M` would make, with its
seed children under it, so decode and reproduce work on it), and on the top run: compare.json and the table
compare_table.json (one row per method, plus one for the corpus), the figure activation_vs_agreement.png,
metrics compare/<method>/<column>, and with --corpus the top windows as corpus_top_windows.json.

Every check (each method's, the corpus file) is done before the first MLflow run exists.
"""

from __future__ import annotations

import dataclasses
import time

from . import methods, report
from .config import AmreproError, Config
from .context import Context
from .layout import COMPARE_TAG, json_bytes, log_outcome, run_name
from .stats import PRIMARY, REGISTRY

# the statistics' columns: each registry statistic, its p-value under the method's own starts, and for the unique
# count also under uniform tokens
_STAT_COLUMNS = tuple(c for s in REGISTRY for c in (s.column, s.p_column, *([f"{s.p_column}_uniform"]
                                                                             if s.uniform_column else [])))
COLUMNS = ("method", "act_mean", "act_best", "act_p99", "n_tokens", *_STAT_COLUMNS, "xent_mean", "wall_s")


def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names or not set(names) <= set(methods.specs()):
        raise AmreproError(f"--methods takes a comma-separated list of {', '.join(methods.specs())}; got {text!r}.")
    if len(set(names)) != len(names):
        raise AmreproError(f"--methods names a method twice: {text!r}.")
    return names


def row(method: str, outcome, xent, wall: float) -> dict:
    """One table row from a method's outcome: the statistics of its real tokens and their p-values under the
    method's own start distribution (nulls 'decoded_starts') and under uniform tokens."""
    s = outcome.summary["statistics"]
    if s is None:
        return {"method": method, "wall_s": wall}
    ds, un = s["nulls"][PRIMARY], s["nulls"]["uniform"]
    acts = s["decoded_activation"]
    out = {"method": method, "act_mean": acts["mean"], "act_best": acts["max"], "act_p99": None,
           "n_tokens": s["n_tokens_total"], "xent_mean": None if xent is None else float(xent.mean()), "wall_s": wall}
    for stat in REGISTRY:
        out.update({stat.column: s["observed"][stat.key], stat.p_column: ds[stat.key]["pvalue"]})
        if stat.uniform_column:
            out[f"{stat.p_column}_uniform"] = un[stat.key]["pvalue"]
    return out


def _yardstick(lm, target, file, config: Config) -> dict:
    """The corpus scored before any run exists (a bad file costs no run), streamed, with progress lines."""
    from . import corpus

    limit = f"its first {config.corpus_max_tokens} tokens" if config.corpus_max_tokens else "all of it"
    report.note(f"scoring the {config.n_tokens}-token windows of {file} ({file.stat().st_size / 1e6:.1f} MB; "
                f"{limit}, --corpus-max-tokens)")
    started = time.monotonic()
    yard = corpus.yardstick(lm, target, file, config.n_tokens, config.corpus_max_tokens,
                            on_progress=corpus.progress_printer(report.note))
    yard["seconds"] = time.monotonic() - started
    if yard["truncated"]:
        report.note(f"corpus: stopped after {yard['tokens_read']} tokens (--corpus-max-tokens "
                    f"{config.corpus_max_tokens}; 0 reads the whole file)")
    return yard


def compare(config: Config, methods_text: str, corpus_path: str = "", experiment: str | None = None) -> list[dict]:
    from . import corpus, dashboard, figures
    from .experiment import execute, prepare
    from .methods.fluency import is_causal, prompt_xent
    from .model import load_model, resolve_device
    from .provenance import pip_freeze

    import torch

    began = time.monotonic()
    names = parse_methods(methods_text)
    config.validate()
    corpus_file = corpus.check(corpus_path) if corpus_path else None  # missing, a FIFO, a device: before runs
    ctx = Context(experiment)
    rows, index = [], []  # the table's rows; dashboard.index_row of each method
    with ctx.session():
        lm = load_model(config.model, resolve_device(config.device), note=report.note)
        preps = {m: prepare(dataclasses.replace(config, method=m), lm=lm, note=report.note) for m in names}
        target = preps[names[0]].target
        yard = _yardstick(lm, target, corpus_file, config) if corpus_file is not None else None  # before runs
        env = ctx.describe(lm)
        params = {k: v for k, v in config.to_params().items() if k != "method"}
        top, experiment_id = ctx.start_top({**params, "methods": ",".join(names), "corpus": corpus_path},
                                           {COMPARE_TAG: ",".join(names)},
                                           f"compare {','.join(names)}: {run_name(config)}")
        causal = is_causal(lm)
        frozen = pip_freeze()
        for m in names:
            c = preps[m].config
            method_run = ctx.start_child(top, f"{m}: {run_name(c)}", c.to_params(), experiment_id)
            ctx.log(method_run, tags=env)
            started = time.monotonic()
            with report.epoch_progress(c.n_steps, c.runs) as on_step:
                outcome = execute(preps[m], on_step)
            wall = time.monotonic() - started
            # this method's science is done: kept on disk until its last store write, as `amrepro run` does
            # (a store that fails from here on: exit 3, `amrepro log FILE` logs it into this method run)
            ctx.keep(outcome, method_run, experiment_id, c.to_params(), env, frozen)
            xent = prompt_xent(lm, torch.from_numpy(outcome.ids)) if causal else None
            rows.append(row(m, outcome, xent, wall))
            ctx.log_metrics(method_run, {"time/wall_s": wall} if xent is None else
                            {"time/wall_s": wall, "xent/final_mean": float(xent.mean())})
            report.print_method(m, outcome)  # its headline and its seeds' tokens
            if yard is not None:  # the method's dashboard shows the corpus windows and histogram
                outcome.summary["corpus"] = yard
            log_outcome(ctx, method_run, experiment_id, outcome, frozen)
            index.append(dashboard.index_row(m, method_run, experiment_id, outcome.summary))
        if yard is not None:
            rows.append({"method": "corpus", "act_mean": yard["mean"], "act_best": yard["max"], "act_p99": yard["p99"],
                         "n_tokens": yard["n_windows"] * config.n_tokens})
        table = [{k: r.get(k) for k in COLUMNS} for r in rows]
        starts = "; ".join(f"{m}: {methods.start_name(m)}" for m in names)
        null = (f"{', '.join(s.p_column for s in REGISTRY)}: under each method's own start distribution decoded as "
                f"its results ({starts}); p_unique_uniform: uniform tokens")
        files = {"compare.json": json_bytes({"target": target.name, "model": config.model, "seeds": config.seeds,
                                             "rows": table, "corpus": yard, "null": null})}
        if yard is not None:
            files["corpus_top_windows.json"] = json_bytes(yard["top"])
        files["dashboard.html"] = dashboard.render_index(f"compare {target.name}", "method", index).encode()
        ctx.log_artifacts(top, files)
        ctx.store.log_table(top, {k: [r[k] for r in table] for k in COLUMNS}, "compare_table.json")
        ctx.log_metrics(top, {f"compare/{r['method']}/{k}": float(r[k]) for r in table for k in COLUMNS[1:]
                                  if isinstance(r.get(k), (int, float))})
        ctx.store.log_figure(top, figures.activation_vs_agreement(table, yard), "activation_vs_agreement.png")
        ctx.log_metrics(top, {"time/total_s": time.monotonic() - began})
        ctx.end(top)
    report.print_compare(table, top, ctx.uri)
    return table
