"""`amrepro sweep`: plan (checks, targets, corpus levels, the sweep run), run the chunks (sweep.run_chunks), then
summarize (the sweep run's table, metrics, verdict, map, the study of the layer (study.py) and timing).

`amrepro sweep --methods a,b` (sweep_methods): a top run, one such sweep per method under it (the same targets
and seeds, the model and corpus levels shared), then the study table of the methods on the top run."""

from __future__ import annotations

import dataclasses
import functools
import os
import time

from .. import corpus, dashboard, figures, lean, report, signals, study
from .. import sweep as sw
from ..compare import parse_methods
from ..config import AmreproError, Config, _unquote
from ..context import Context
from ..layout import (DASHBOARD, ERROR_TAG, HEADLINE_TAG, KIND_TAG, METHODS_TAG, NOTE_TAG, PARENT_TAG, PID_TAG,
                      RAY_ADDRESS_TAG, STUDY_FIGURE, STUDY_JSON, STUDY_TABLE, STUDY_TAG, STUDY_TARGETS, SWEEP_MAP,
                      SWEEP_TABLE, TAG_LIMIT, TARGET_TAG, VERDICT_TAG, WORKERS_TAG, RunReader, children, json_bytes,
                      run_name, sweep_parents)
from ..model import load_model, resolve_device
from ..provenance import pip_freeze
from ..readers import site_width
from ..targets import Target
from ..tracking import refuse_live


def sweep(config: Config, spec: str, workers: int = 0, ray_address: str | None = None, chunk: int = 0,
          resume: str | None = None, experiment: str | None = None, layout: str = "lean", force: bool = False,
          corpus_path: str = "", parent: str | None = None, shared: dict | None = None) -> tuple[dict, float]:
    """--resume SWEEP_RUN_ID redoes the targets without a FINISHED parent, with the sweep's own params; refused
    while that sweep's process or workers are alive (force: also when they cannot be checked from this host).
    parent: the top run of a many-method sweep; shared: what its method sweeps share (the model, the corpus
    levels). Returns the study of the targets this invocation ran and the workers' seconds of science."""
    corpus_file = corpus.check(corpus_path) if corpus_path else None  # missing, a FIFO, a device: before runs
    shared = {} if shared is None else shared
    ctx = Context(experiment)
    if resume:
        resumed = RunReader(ctx.store).run(resume)
        if "targets" not in resumed.params:
            raise AmreproError("the run has no 'targets' param: it is not a sweep run made by amrepro sweep.")
        default = Config()  # the sweep's own params (_sweep_params), with any target
        config = Config.from_params({**resumed.params, "target": "", "layer": str(default.layer),
                                     "dim": str(default.dim)})
        spec = _unquote(resumed.params["targets"])  # `mlflow run -e sweep` logs it shell-quoted
        layout = lean.layout_of(resumed)  # the sweep's own
        refuse_live([resumed, *sweep_parents(ctx.store, resume, resumed.experiment_id)],
                    f"`amrepro sweep --resume {resume}`", force)
    config.validate()
    lean.check_layout(layout)
    if workers < 0:
        raise AmreproError(f"--workers must be 0 (in this process) or more, got {workers}.")
    if chunk < 0:
        raise AmreproError(f"--chunk must be 0 (automatic) or more, got {chunk}.")
    with ctx.session(attach=not resume and parent is None):
        # plan: every check, the targets, the corpus levels, the sweep run, what is left to do
        lm = shared.get("lm") or load_model(config.model, resolve_device(config.device), note=report.note)
        shared["lm"] = lm
        width = functools.cache(lambda block, site: site_width(lm, Target(block, site, 0)))  # one probe per site
        targets = sw.parse_targets(spec, width, lm.n_layers, config.seed)
        config, ray = _start_workers(lm, targets, config, workers, ray_address, chunk, resume)
        if corpus_file is not None and "corpus" not in shared:  # scored before any run: a bad file costs none
            started = time.perf_counter()
            shared["corpus"] = _corpus_levels(lm, targets, corpus_file, config)
            shared["corpus_seconds"] = time.perf_counter() - started
        job = _open(ctx, lm, config, spec, workers, ray_address, resume, layout, corpus_path, parent)
        done = {r.tags.get(TARGET_TAG) for r in sweep_parents(ctx.store, job.sweep_id, job.experiment_id)
                if r.status == "FINISHED"}
        todo = [t for t in targets if t.name not in done]
        work = sw.chunks(todo, sw.chunk_size(len(todo), workers, chunk))
        where = (f"{workers} Ray workers ({config.threads} thread{'' if config.threads == 1 else 's'} each)"
                 if workers else "this process")
        report.console.print(f"sweep run {job.sweep_id}: {len(targets)} targets x {config.runs} seeds, {len(done)} "
                             f"already done, {len(todo)} to run in {len(work)} batch{'' if len(work) == 1 else 'es'} "
                             f"on {where}.", soft_wrap=True, markup=False)

        # run the chunks
        started, records = time.perf_counter(), []  # records: the study.TargetRuns of the targets logged

        def on_chunk(ran: list) -> None:
            records.extend(ran)
            report.console.print(f"  {len(done) + len(records)}/{len(targets)} targets logged", soft_wrap=True,
                                 markup=False)

        try:
            failures, seconds = sw.run_chunks(work, job, workers, lm, on_chunk)
        except KeyboardInterrupt as interrupt:  # the workers are stopped (run_chunks); their open runs end here
            interrupt = signals.as_raised(interrupt)
            with signals.ignored():
                _end_unfinished(ctx, job, done, interrupt)
            raise interrupt from None
        finally:
            if ray is not None:
                ray.shutdown()

        result = _summarize(ctx, job, targets, done, records, shared.get("corpus"), workers, seconds,
                            time.perf_counter() - started)
        if failures:
            ctx.log(job.sweep_id, tags={ERROR_TAG: "; ".join(failures)[:TAG_LIMIT]})
        ctx.end(job.sweep_id, "FAILED" if failures else "FINISHED")
    if failures:
        raise AmreproError(f"{len(failures)} batch(es) of sweep run {job.sweep_id} failed ({failures[0]}); "
                           f"`amrepro sweep --resume {job.sweep_id}` runs the targets that are not done.")
    return result, seconds["science"]


def _start_workers(lm, targets: list, config: Config, workers: int, ray_address: str | None, chunk: int,
                   resume: str | None):
    """(config, the ray module or None): the memory and cores checked (a cluster's cores once joined) before any
    run exists; with workers and --threads 0, the cores shared out (logged, so --resume keeps it)."""
    remote = bool(ray_address or os.environ.get("RAY_ADDRESS"))
    ray = sw.start_ray(ray_address, workers, 1) if workers and remote else None
    cpus = int(ray.cluster_resources().get("CPU", workers)) if ray else os.cpu_count() or 1
    note = sw.check_workers(lm, targets, config, workers, chunk, cpus, local=not remote)  # before a local Ray
    if workers and not resume and not config.threads:  # more threads than cores only spin
        config = dataclasses.replace(config, threads=max(1, cpus // workers))
    if workers and not remote:
        ray = sw.start_ray(ray_address, workers, max(config.threads, 1))
    if note:
        report.errors.print(note, soft_wrap=True, markup=False)
    return config, ray


def _open(ctx: Context, lm, config: Config, spec: str, workers: int, ray_address: str | None, resume: str | None,
          layout: str, corpus_path: str, parent: str | None) -> sw.Job:
    """The sweep run, new (under parent, for a many-method sweep) or reopened (--resume), as the workers' Job."""
    if resume:
        sweep_id, experiment_id = ctx.reopen(resume)
        if sweep_id is None:
            raise AmreproError(f"sweep run {resume} is FINISHED (or deleted): every target was done.")
    else:
        ctx.describe(lm, busy_note=False)
        sweep_id, experiment_id = ctx.start_top({**_sweep_params(config, spec), "corpus": corpus_path},
                                                {KIND_TAG: "sweep", lean.LAYOUT_TAG: layout,
                                                 **({PARENT_TAG: parent} if parent else {})},
                                                f"sweep {run_name(config).rsplit(' ', 2)[0]} {spec} x{config.runs}")
    ctx.log(sweep_id, tags={WORKERS_TAG: str(workers), RAY_ADDRESS_TAG: ray_address or
                            os.environ.get("RAY_ADDRESS", "local" if workers else "none")})
    return sw.Job(config, ctx.uri, experiment_id, sweep_id, pip_freeze(), layout)


def _sweep_params(config: Config, spec: str) -> dict[str, str]:
    """The sweep run's params (--resume reads them back): every hyperparameter but the target, and the SPEC."""
    target = ("target", "target_name", "layer", "dim")
    return {**{k: v for k, v in config.to_params().items() if k not in target}, "targets": spec}


def _end_unfinished(ctx: Context, job: sw.Job, done: set, interrupt: KeyboardInterrupt) -> None:
    """After Ctrl-C or SIGTERM: the runs of this invocation's workers (other processes, or their own Context with
    workers 0) counted into ctx's message; those still RUNNING (a killed Ray worker ends nothing) ended KILLED."""
    try:
        parents = sweep_parents(ctx.store, job.sweep_id, job.experiment_id)
    except Exception:  # noqa: BLE001 - the store may be what failed; the sweep run is still ended by ctx
        return
    for parent in parents:
        if parent.tags.get(TARGET_TAG) in done:
            continue  # finished by an earlier invocation
        try:
            family = [parent, *children(ctx.store, parent.id, job.experiment_id)]
        except Exception:  # noqa: BLE001
            family = [parent]
        for run in family:
            if run.status == "RUNNING":
                ctx.stop(run.id, "KILLED", signals.words(interrupt))
            elif run.status == "FINISHED":
                ctx.n_finished += 1
            elif run.tags.get(PID_TAG) == str(os.getpid()):  # ended KILLED just now by the in-process worker
                ctx.n_stopped += 1


def _summarize(ctx, job: sw.Job, targets: list, done: set, records: list, levels: dict | None, workers: int,
               seconds: dict, wall: float) -> dict:
    """The sweep run's table (read back from the store: a resumed sweep has every target), sweep/* metrics, verdict,
    map and timing; returns the study of this invocation's records (levels: those of --corpus), also logged."""
    sweep_id, experiment_id = job.sweep_id, job.experiment_id
    summing = time.perf_counter()
    parents = {}
    for run in sweep_parents(ctx.store, sweep_id, experiment_id):
        name = run.tags.get(TARGET_TAG)
        if name not in parents or run.status == "FINISHED":
            parents[name] = run
    columns = sw.table(targets, parents)
    metrics, words = sw.summary(columns)
    ctx.store.log_table(sweep_id, columns, SWEEP_TABLE)
    with ctx.batched(sweep_id):  # a --resume logs them again: the UI shows the latest
        ctx.log_metrics(sweep_id, metrics)
        ctx.log(sweep_id, tags={VERDICT_TAG: words[:TAG_LIMIT], NOTE_TAG: words})
    ctx.store.log_figure(sweep_id, figures.sweep_map(columns), SWEEP_MAP)
    headlines = {name: run.tags.get(HEADLINE_TAG, "") for name, run in parents.items()}
    index = dashboard.sweep_rows(columns, experiment_id, headlines)  # one row per target, linking to its page
    ctx.log_artifacts(sweep_id, {DASHBOARD: dashboard.render_index(f"sweep of {len(targets)} targets", "target",
                                                                   index).encode()})
    report.console.print(words, soft_wrap=True, markup=False)
    if job.layout == "lean" and job.config.figures:  # --figures false: none; `amrepro figures RUN_ID` draws them
        _log_flagged_figures(ctx, columns)
    order = {t.name: k for k, t in enumerate(targets)}
    result = study.study(sorted(records, key=lambda r: order[r.name]), levels, seed=job.config.seed)
    result["layer"]["note"] = f"the {len(records)} targets run by this invocation" + (
        f" ({len(done)} done by an earlier one are not in it)" if done else "")
    study_words = study.words(result)
    ctx.log_artifacts(sweep_id, {STUDY_JSON: json_bytes(result)})
    ctx.store.log_table(sweep_id, study.target_columns(result), STUDY_TARGETS)
    ctx.log_metrics(sweep_id, study.layer_metrics(result))
    ctx.log(sweep_id, tags={STUDY_TAG: study_words[:TAG_LIMIT]})
    report.console.print(study_words, soft_wrap=True, markup=False)
    summing = time.perf_counter() - summing  # the table, map, verdict, study (and lean: the flagged figures)
    # where the workers' wall time went: science, tracking, the rest (Ray start-up and scheduling, model loading, idle)
    slots = max(workers, 1) * wall
    ctx.log_metrics(sweep_id, {"time/wall_seconds": wall, "time/science_seconds": seconds["science"],
                               "time/tracking_seconds": seconds["tracking"], "time/summary_seconds": summing,
                               "time/share_science": seconds["science"] / slots})
    n_run = len(records)  # the targets logged by this invocation (a batch that failed is not throughput)
    report.console.print(f"{n_run} targets in {wall:.0f} s ({3600 * n_run / wall:.0f} targets/hour); of the "
                         f"workers' time {seconds['science'] / slots:.0%} science, "
                         f"{seconds['tracking'] / slots:.0%} tracking, the rest Ray and model loading.",
                         soft_wrap=True, markup=False)
    return result


def _log_flagged_figures(ctx, columns: dict[str, list]) -> None:
    """A lean sweep draws the figures of the targets with a claim (at most lean.FLAGGED_MAX) itself."""
    flagged, reader = lean.flagged(columns), RunReader(ctx.store)
    for run_id in flagged[:lean.FLAGGED_MAX]:
        run = reader.run(run_id)
        if lean.FIGURES_TAG not in run.tags:  # a --resume draws each once
            lean.log_figures(ctx, reader, run)
    if flagged:
        more = len(flagged) - lean.FLAGGED_MAX
        report.console.print(f"figures drawn for {min(len(flagged), lean.FLAGGED_MAX)} flagged target(s)"
                             + (f"; {more} more: `amrepro figures RUN_ID`" if more > 0 else "") + ".",
                             soft_wrap=True, markup=False)


def _corpus_levels(lm, targets, file, config: Config) -> dict[str, tuple[float, float]]:
    """target name -> (corpus max, 99th percentile): the plain dimensions of each site in one streamed pass (one
    forward per batch of windows for all of them), each feature target on its own."""
    groups: dict = {}
    for target in targets:
        groups.setdefault((target.block, target.site) if not target.source else target.name, []).append(target)
    limit = f"its first {config.corpus_max_tokens} tokens" if config.corpus_max_tokens else "all of it"
    report.note(f"scoring every {config.n_tokens}-token window of {file} ({limit}) for {len(targets)} targets in "
                f"{len(groups)} pass{'' if len(groups) == 1 else 'es'}")
    levels = {}
    for group in groups.values():
        yards = (corpus.yardsticks(lm, group, file, config.n_tokens, config.corpus_max_tokens, top=1,
                                   on_progress=corpus.progress_printer(report.note)) if not group[0].source else
                 [corpus.yardstick(lm, group[0], file, config.n_tokens, config.corpus_max_tokens, top=1)])
        levels.update({t.name: (y["max"], y["p99"]) for t, y in zip(group, yards)})
    return levels


def sweep_methods(config: Config, spec: str, methods_text: str, corpus_path: str = "", workers: int = 0,
                  ray_address: str | None = None, chunk: int = 0, experiment: str | None = None,
                  layout: str = "lean") -> list[dict]:
    """A top run, one sweep per method under it, and on the top run the study table (one row per method),
    study.json, the figure and study/<method>/<column> metrics; every method and the corpus checked first."""
    names = parse_methods(methods_text)
    configs = {m: dataclasses.replace(config, method=m) for m in names}
    for c in configs.values():
        c.validate()
    lean.check_layout(layout)
    if corpus_path:
        corpus.check(corpus_path)
    ctx = Context(experiment)
    rows, results, shared = [], {}, {}
    with ctx.session():
        params = {k: v for k, v in _sweep_params(config, spec).items() if k != "method"}
        top, _ = ctx.start_top({**params, "methods": ",".join(names), "corpus": corpus_path},
                               {KIND_TAG: "study", METHODS_TAG: ",".join(names)},
                               f"study {','.join(names)} {spec} x{config.runs}")
        for m in names:
            report.console.print(f"[bold]{m}[/]", soft_wrap=True)
            results[m], science = sweep(configs[m], spec, workers, ray_address, chunk, None, experiment, layout, False,
                                        corpus_path, parent=top, shared=shared)
            rows.append(study.table_row(m, results[m], science))
        cvs = {m: [r["decoded"]["cv"] for r in results[m]["targets"] if r["decoded"] is not None] for m in names}
        table = ("Study: one row per method (fractions of the layer's targets; s_per_target: the workers' seconds "
                 "of optimization, decoding and statistics per target).\n\n" + study.markdown_table(rows))
        ctx.store.log_table(top, {k: [r.get(k) for r in rows] for k in study.COLUMNS}, STUDY_TABLE)
        ctx.log_artifacts(top, {STUDY_JSON: json_bytes({"rows": rows, "methods": results,
                                                        "corpus_seconds": shared.get("corpus_seconds")})})
        ctx.store.log_figure(top, figures.study(rows, cvs), STUDY_FIGURE)
        ctx.log_metrics(top, {f"study/{r['method']}/{k}": float(r[k]) for r in rows for k in study.COLUMNS[1:]
                              if isinstance(r.get(k), (int, float))})
        ctx.log(top, tags={NOTE_TAG: table})
        ctx.end(top)
    report.console.print(table, soft_wrap=True, markup=False)
    return rows
