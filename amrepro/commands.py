"""One function per CLI command: connects the experiment (science), tracking (MLflow) and report (terminal).

Heavy modules (torch, matplotlib) are imported inside the commands that need them: `decode` and `reproduce`
of a bad run id answer in about the time of `import mlflow`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import outcome_file, report, signals
from .config import AmreproError, Config, NoResult
from .tracking import HOST, StoreLost, Tracker, json_bytes, npy_bytes, store_problem

if TYPE_CHECKING:
    from .experiment import Outcome


def run_name(config: Config) -> str:
    """'{model} {target} x{runs}': what a parent is, readable in the MLflow runs table."""
    model = config.model
    if os.path.exists(os.path.expanduser(model)):  # a local folder or file: its name (and its folder's if generic)
        path = Path(model.rstrip("/"))
        model = path.name.removesuffix(".gguf")
        if model.lower() in ("model", "models", "checkpoint", "snapshot", "final", "hf"):
            model = f"{path.parent.name}/{model}"
    return f"{model} {config.target_name} x{config.runs}"


def child_params(config: Config, r: int) -> dict[str, str]:
    """Every hyperparameter, with this run's own seed; run_index and batch_seed locate it in its batch."""
    params = config.to_params()
    params.update(seed=str(config.seed + r), run_index=str(r), batch_seed=str(config.seed))
    return params


def run(config: Config, experiment: str | None = None):
    """The parent run exists from before the optimization (it is what `mlflow run` hands us, and the user sees
    it RUNNING); the seed runs are created after the science, cheaply, from results already saved to disk."""
    from .experiment import execute, prepare
    from .provenance import busy_cores_note, environment, pip_freeze

    config.validate()
    tracker = Tracker(experiment)  # a store that is down fails here, before the model loads
    end_leftovers(tracker)  # runs a SIGKILLed amrepro left RUNNING on this host: ended KILLED, one line
    with _saying_what_was_saved(tracker), tracker:  # any exception from here on ends every open run FAILED, Ctrl-C ends them KILLED
        tracker.attach_mlflow_run()  # under `mlflow run`, its run is open (and failed on error) from now on
        prep = prepare(config, note=report.note)
        busy = busy_cores_note()
        if busy:
            report.note(busy)
        env = {**environment(prep.lm.device), **prep.lm.fingerprint()}
        parent, experiment_id = tracker.start_top(config.to_params(), env, run_name=run_name(config))
        with report.epoch_progress(config.n_steps, config.runs) as on_epoch:
            outcome = execute(prep, on_epoch)
        # The science is done: from here on it is never lost. Saved before the first store call (a Ctrl-C here
        # waits for the file), removed after the last.
        with signals.shielded():
            frozen = pip_freeze()
            tracker.outcome_path = outcome_file.save(outcome, parent, experiment_id, tracker.uri,
                                                     config.to_params(), env, frozen)
        report.print_outcome(outcome, parent, tracker.uri)
        log_outcome(tracker, parent, experiment_id, outcome, frozen)
    return outcome


def sweep(config: Config, spec: str, workers: int = 0, ray_address: str | None = None, chunk: int = 0,
          resume: str | None = None, experiment: str | None = None) -> dict[str, float]:
    """`amrepro sweep`: a sweep run, one parent per target (what `amrepro run --target T` logs), seed runs; the
    targets run in batches of one site on Ray workers (workers 0: in this process). --resume SWEEP_RUN_ID
    redoes the targets without a FINISHED parent, with the sweep's own params. Returns the sweep/* metrics."""
    from . import sweep as sw
    from .model import load_model, resolve_device
    from .provenance import environment, pip_freeze
    from .readers import site_width
    from .targets import Target

    tracker = Tracker(experiment)
    if resume:
        config, spec = sw.config_from_sweep(_params_of(tracker, resume))
    config.validate()
    if workers < 0:
        raise AmreproError(f"--workers must be 0 (in this process) or more, got {workers}.")
    if chunk < 0:
        raise AmreproError(f"--chunk must be 0 (automatic) or more, got {chunk}.")
    end_leftovers(tracker)
    ray = None
    with _saying_what_was_saved(tracker), tracker:
        if not resume:
            tracker.attach_mlflow_run()
        lm = load_model(config.model, resolve_device(config.device), note=report.note)
        widths: dict[tuple, int] = {}

        def width(block: int, site: str) -> int:
            if (block, site) not in widths:
                widths[block, site] = site_width(lm, Target(block, site, 0))
            return widths[block, site]

        targets = sw.parse_targets(spec, width, lm.n_layers, config.seed)
        remote = bool(ray_address or os.environ.get("RAY_ADDRESS"))
        if not remote:  # this machine's memory and cores; of a cluster, only its cores are known (once joined)
            workers_note = sw.check_workers(lm, targets, config, workers, chunk, os.cpu_count() or 1, local=True)
        if workers and not resume and not config.threads:  # the cores shared out; logged, so --resume keeps it
            if remote:
                ray = sw.start_ray(ray_address, workers, 1)
                cpus = ray.cluster_resources().get("CPU", workers)
            else:
                cpus = os.cpu_count() or 1
            config = dataclasses.replace(config, threads=sw.default_threads(workers, cpus))
        if workers and ray is None:
            ray = sw.start_ray(ray_address, workers, max(config.threads, 1))
        if remote:
            workers_note = sw.check_workers(lm, targets, config, workers, chunk,
                                            int(ray.cluster_resources().get("CPU", workers)) if ray else 1, local=False)
        if workers_note:
            report.errors.print(workers_note, soft_wrap=True, markup=False)
        frozen = pip_freeze()
        if resume:
            sweep_id, experiment_id = tracker.reopen(resume)
            if sweep_id is None:
                raise AmreproError(f"sweep run {resume} is FINISHED (or deleted): every target was done.")
        else:
            sweep_id, experiment_id = tracker.start_top(
                sw.sweep_params(config, spec), {**environment(lm.device), **lm.fingerprint(), "amrepro.kind": "sweep"},
                run_name=f"sweep {run_name(config).rsplit(' ', 2)[0]} {spec} x{config.runs}")
        tracker.log_tags(sweep_id, {"amrepro.workers": str(workers), "amrepro.ray_address": ray_address or
                                    os.environ.get("RAY_ADDRESS", "local" if workers else "none")})
        done = {r.data.tags.get("amrepro.target") for r in tracker.sweep_parents(sweep_id, experiment_id)
                if r.info.status == "FINISHED"}
        todo = [t for t in targets if t.name not in done]
        work = sw.chunks(todo, sw.chunk_size(len(todo), workers, chunk))
        where = (f"{workers} Ray workers ({config.threads} thread{'' if config.threads == 1 else 's'} each)"
                 if workers else "this process")
        report.console.print(f"sweep run {sweep_id}: {len(targets)} targets x {config.runs} seeds, {len(done)} already "
                             f"done, {len(todo)} to run in {len(work)} batch{'' if len(work) == 1 else 'es'} on "
                             f"{where}.", soft_wrap=True, markup=False)
        count = {"done": len(done)}

        def on_chunk(names: list[str]) -> None:
            count["done"] += len(names)
            report.console.print(f"  {count['done']}/{len(targets)} targets logged", soft_wrap=True, markup=False)

        started = time.perf_counter()
        try:
            failures, seconds = sw.run_chunks(work, config, tracker.uri, experiment_id, sweep_id, frozen, workers,
                                              lm=lm if not workers else None, on_chunk=on_chunk)
        finally:
            if ray is not None:
                ray.shutdown()
        wall = time.perf_counter() - started
        metrics = log_sweep(tracker, sweep_id, experiment_id, targets)
        # where the time of this invocation went: the workers' science and tracking, and the rest (Ray: starting
        # workers, loading models, scheduling; idle workers) as a share of the workers' wall time
        slots = max(workers, 1) * wall
        timing = {"time/wall_seconds": wall, "time/science_seconds": seconds["science"],
                  "time/tracking_seconds": seconds["tracking"],
                  "time/share_science": seconds["science"] / slots if slots else 0.0}
        tracker.log_metrics(sweep_id, timing)
        report.console.print(f"{len(todo)} targets in {wall:.0f} s ({3600 * len(todo) / wall:.0f} targets/hour); of the "
                             f"workers' time {seconds['science'] / slots:.0%} science, "
                             f"{seconds['tracking'] / slots:.0%} tracking, the rest Ray and model loading.",
                             soft_wrap=True, markup=False)
        if failures:
            tracker.log_tags(sweep_id, {"error": "; ".join(failures)[:5000]})
        tracker.end(sweep_id, "FAILED" if failures else "FINISHED")
    if failures:
        raise AmreproError(f"{len(failures)} batch(es) of sweep run {sweep_id} failed ({failures[0]}); "
                           f"`amrepro sweep --resume {sweep_id}` runs the targets that are not done.")
    return metrics


def _params_of(tracker: Tracker, run_id: str) -> dict[str, str]:
    """The params of the run to resume, or one sentence if there is no such run."""
    try:
        return tracker.client.get_run(run_id).data.params
    except Exception:  # noqa: BLE001 - MLflow's RESOURCE_DOES_NOT_EXIST
        raise AmreproError(f"no run with id {run_id} in the tracking store {tracker.uri}.") from None


def log_sweep(tracker: Tracker, sweep_id: str, experiment_id: str, targets) -> dict[str, float]:
    """The sweep run's table (one row per target, read back from the store, so a resumed sweep has every
    target), its sweep/* metrics, the verdict over targets and the map."""
    from . import figures
    from . import sweep as sw

    parents = {}
    for run in tracker.sweep_parents(sweep_id, experiment_id):
        name = run.data.tags.get("amrepro.target")
        if name not in parents or run.info.status == "FINISHED":
            parents[name] = run
    columns = sw.table(targets, parents)
    metrics, words = sw.summary(columns)
    tracker.log_table(sweep_id, columns, "sweep_table.json")
    with tracker.batched(sweep_id):  # a --resume logs them again: the UI shows the latest
        tracker.log_metrics(sweep_id, metrics)
        tracker.log_tags(sweep_id, {"verdict": words[:5000], "mlflow.note.content": words})
    tracker.log_figure(sweep_id, figures.sweep_map(columns), "sweep_map.png")
    report.console.print(words, soft_wrap=True, markup=False)
    return metrics


def log_outcome(tracker: Tracker, parent: str, experiment_id: str, outcome, frozen: bytes,
                resume: bool = False) -> None:
    """Log every seed run (one create_run, one artifact upload, one log_batch, one set_terminated each) and
    then the parent, from the outcome saved in tracker.outcome_path, which is removed once all is logged.
    resume: keep the children an interrupted logging already finished, replace the others."""
    config, path = outcome.config, tracker.outcome_path
    done = set()
    if resume:
        for child in tracker.children(parent, experiment_id):
            index = child.data.params.get("run_index")
            complete = child.info.status == "FINISHED" or (
                child.info.status == "FAILED" and child.data.tags.get("error", "").startswith("diverged"))
            if complete and index is not None and int(index) not in done:
                done.add(int(index))
            else:  # half-logged by the interrupted attempt: replaced by a complete one below
                tracker.client.delete_run(child.info.run_id)
    count = {"logged": len(done)}

    def progress() -> str:
        return (f"logging is in progress: {count['logged']} of {config.runs} runs logged; every result is kept in "
                f"{path}. Press Ctrl-C again to stop (`amrepro log {path}` logs the rest later).")

    with signals.logging_phase(progress), report.logging_progress(config.runs, len(done)) as advance:
        for r in range(config.runs):
            if r in done:
                continue
            log_seed_run(tracker, parent, experiment_id, outcome, r)
            count["logged"] += 1
            advance()
        log_parent_run(tracker, parent, outcome, frozen)
        with signals.shielded():  # a parent that is ended has no outcome file left, whenever a Ctrl-C comes
            tracker.end(parent, "FAILED" if outcome.summary["statistics"] is None else "FINISHED")
            if path is not None:
                path.unlink(missing_ok=True)
                tracker.outcome_path = None
    if outcome.summary["statistics"] is None:
        raise NoResult(f"all {config.runs} runs diverged ({outcome.diverged[0]}), so there is nothing to "
                       "compare; lower --lr or --l2. The runs are marked FAILED.")


def log_seed_run(tracker: Tracker, parent: str, experiment_id: str, outcome, r: int) -> None:
    """Run r of the outcome as a seed run under parent: one create_run, one artifact upload, one log_batch, one
    set_terminated. A diverged run says why and ends FAILED: divergence is not a result."""
    config = outcome.config
    child = tracker.start_child(parent, f"seed-{config.seeds[r]}", {}, experiment_id)
    why = outcome.diverged.get(r)
    with tracker.batched(child):  # params, tags and metrics: one log_batch
        tracker.log_params(child, child_params(config, r))
        log_child(tracker, child, outcome, r)
        if why:
            tracker.log_tags(child, {"error": f"diverged: {why}"})
    tracker.end(child, "FAILED" if why else "FINISHED")


def log_parent_run(tracker: Tracker, parent: str, outcome, frozen: bytes) -> None:
    """Everything of the parent but its end (log_parent), batched; an all-diverged outcome says so as its error."""
    with tracker.batched(parent):
        log_parent(tracker, parent, outcome, frozen)
        if outcome.summary["statistics"] is None:
            tracker.log_tags(parent, {"error": f"all {outcome.config.runs} runs diverged"})


def log_file(path: str) -> None:
    """`amrepro log FILE`: log an outcome file that an interrupted or disconnected `amrepro run` left, into its
    parent run when that still exists and is not FINISHED, else into a new parent; then delete the file."""
    saved = outcome_file.load(path)
    tracker = Tracker(uri=os.environ.get("MLFLOW_TRACKING_URI") or saved.tracking_uri)
    with _saying_what_was_saved(tracker), tracker:
        tracker.outcome_path = Path(path)
        parent, experiment_id = tracker.reopen(saved.parent_id)
        if parent is None:
            experiment_id = saved.experiment_id if tracker.experiment_exists(saved.experiment_id) else None
            config = saved.outcome.config
            parent = tracker.start_parent(saved.params, {**saved.tags, "amrepro.logged_from": saved.parent_id},
                                          run_name=run_name(config), experiment_id=experiment_id)
            experiment_id = tracker.client.get_run(parent).info.experiment_id
        log_outcome(tracker, parent, experiment_id, saved.outcome, saved.pip_freeze, resume=parent == saved.parent_id)
    report.console.print(f"logged {saved.outcome.config.runs} runs into parent run {parent} in {tracker.uri}; "
                         f"{path} was removed.")


def end_leftovers(tracker: Tracker) -> None:
    """Runs left RUNNING by an amrepro process of this host that no longer exists: ended KILLED, one line."""
    try:
        gone = [run for run, alive in tracker.leftovers() if alive is False]
        for run in gone:
            tracker.end_leftover(run, _gone_reason(run, "amrepro run"))
    except Exception:  # noqa: BLE001 - housekeeping never stops a run; `amrepro doctor` says what failed
        return
    if gone:
        pids = sorted({run.data.tags["amrepro.pid"] for run in gone}, key=int)
        report.errors.print(f"note: ended {len(gone)} run(s) KILLED that amrepro process(es) {', '.join(pids)} on "
                            f"{gone[0].data.tags['amrepro.host']} left RUNNING when they were killed.",
                            soft_wrap=True, markup=False)


def _gone_reason(run, by: str) -> str:
    tags = run.data.tags
    return (f"its process (pid {tags.get('amrepro.pid')} on {tags.get('amrepro.host')}) is gone: killed or crashed "
            f"without ending the run; ended by {by}")


def doctor(all_hosts: bool = False) -> None:
    """`amrepro doctor`: every RUNNING amrepro run of the store, one line each. Runs of this host whose process
    is gone are ended KILLED; live ones are left alone; runs of other hosts (or without process tags) cannot be
    checked from here and are left alone unless all_hosts."""
    tracker = Tracker()
    ended = alive_n = left = 0
    for run, alive in tracker.leftovers():
        tags, run_id = run.data.tags, run.info.run_id
        name = f"{run_id} ({run.info.run_name})"
        where = f"pid {tags['amrepro.pid']} on {tags['amrepro.host']}" if "amrepro.pid" in tags else "no process tags"
        if alive:
            alive_n += 1
            report.console.print(f"running   {name}: {where}, still alive; left alone", soft_wrap=True, markup=False)
        elif alive is False or all_hosts:
            why = (_gone_reason(run, "amrepro doctor") if alive is False else
                   f"its process ({where}) could not be checked from {HOST}; ended by amrepro doctor --all")
            tracker.end_leftover(run, why)
            ended += 1
            report.console.print(f"KILLED    {name}: {why}", soft_wrap=True, markup=False)
        else:
            left += 1
            report.console.print(f"unchecked {name}: {where}, cannot be checked from {HOST}; left alone "
                                 "(`amrepro doctor --all` ends it)", soft_wrap=True, markup=False)
    report.console.print(f"{ended} run(s) ended KILLED, {alive_n} still running, {left} left alone unchecked "
                         f"in {tracker.uri}.", soft_wrap=True, markup=False)


@contextmanager
def _saying_what_was_saved(tracker: Tracker):
    """On Ctrl-C, SIGTERM or a store that fails, tell the user what the store now holds (the tracker has
    already ended the open runs) and where the results are kept when they are not all logged."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        raise type(interrupt)(_what_was_saved(tracker)) from None
    except Exception as error:  # noqa: BLE001
        if not hasattr(error, "amrepro_store_seconds"):
            raise
        if tracker.outcome_path is None:  # nothing computed yet: the store is simply unusable
            raise AmreproError(store_problem(error, tracker.uri) + ".") from None
        raise StoreLost(f"{store_problem(error, tracker.uri)}; {_what_was_saved(tracker)}") from None


def _what_was_saved(tracker: Tracker) -> str:
    path = tracker.outcome_path
    if not (tracker.n_finished or tracker.n_stopped or tracker.n_unended or path):
        return "nothing was logged yet."
    text = (f"{tracker.n_finished} finished run(s) kept, {tracker.n_stopped} unfinished run(s) marked KILLED in "
            f"{tracker.uri}.")
    if tracker.n_unended:
        text = text[:-1] + f", {tracker.n_unended} could not be ended (the store failed) and stay RUNNING."
    if path is not None and Path(path).exists():
        text += f" Every result is kept in {path}: `amrepro log {path}` logs it."
    return text


def log_child(tracker: Tracker, run_id: str, outcome: Outcome, r: int) -> None:
    from . import metrics

    result = outcome.result
    files = {"embeddings/initial.npy": npy_bytes(result.initial[r].numpy().astype(np.float32)),
             "embeddings/final.npy": npy_bytes(result.final[r].numpy().astype(np.float32))}
    if r in outcome.diverged:  # NaN "decodes" to nothing meaningful: only the history up to the divergence
        epoch = int(result.diverged_at[r])
        tracker.log_metrics(run_id, scalars={"diverged/epoch": epoch},
                            history={"loss/total": result.loss[:epoch, r].numpy(),
                                     "act/target": result.activation[:epoch, r].numpy()})
        tracker.log_artifacts(run_id, files)
        return
    tracker.log_metrics(run_id,
                        scalars={"act/final": float(result.final_activation[r]),
                                 "act/decoded": float(outcome.decoded_activation[r]),
                                 "loss/final": float(result.loss[-1, r]),
                                 # statistics hold the finite runs only: run r is their entry number ok[:r].sum()
                                 **metrics.child_metrics(outcome.summary["statistics"], int(outcome.ok[:r].sum()))},
                        history={"loss/total": result.loss[:, r].numpy(), "act/target": result.activation[:, r].numpy(),
                                 **{key: values[:, r].numpy() for key, values in result.history.items()}})
    files["tokens.json"] = json_bytes({"ids": [int(i) for i in outcome.ids[r]], "tokens": outcome.tokens[r]})
    # the tokens as a column of the MLflow runs table, and the seed's colour of the figures in the UI's charts
    tracker.log_tags(run_id, {"tokens": " | ".join(repr(t) for t in outcome.tokens[r]),
                              "mlflow.runColor": _seed_color(r, len(result.seeds))})
    tracker.log_artifacts(run_id, files)


def _seed_color(r: int, runs: int) -> str:
    from matplotlib.colors import to_hex

    from .figures import seed_colors

    return to_hex(seed_colors(runs)[r])


def log_parent(tracker: Tracker, run_id: str, outcome: Outcome, frozen: bytes | None = None) -> None:
    from . import features, figures
    from .provenance import pip_freeze
    from .specificity import specificity_words

    s = outcome.summary
    counts = {"runs/diverged": len(outcome.diverged), "runs/ok": s["n_runs_ok"]}
    tracker.log_artifacts(run_id, {"summary.json": json_bytes(s),
                                   "environment/pip-freeze.txt": frozen if frozen is not None else pip_freeze(),
                                   **features.file_artifacts(outcome.target)})  # a direction's .npy, a small SAE
    tracker.log_tags(run_id, features.target_tags(outcome.target))  # a feature: what it reads, its file's sha256
    if s["statistics"] is None:  # every run diverged: no statistic exists, and none is logged
        tracker.log_metrics(run_id, counts)
        tracker.log_tags(run_id, {"verdict": f"no result: all {len(outcome.diverged)} runs diverged"})
        return
    tracker.log_metrics(run_id, {**counts, **s["statistics"]["metrics"]})  # stats/n_unique_tokens etc.: once each
    tracker.log_tags(run_id, {"verdict": s["statistics"]["verdict"][:5000],
                              # the run page's description: the verdict, statistics and tokens, never cut off
                              "mlflow.note.content": report.markdown_summary(outcome)})
    tracker.log_table(run_id, report.token_columns(outcome), "token_grid.json")
    if outcome.specificity is not None:  # --controls
        tracker.log_metrics(run_id, outcome.specificity["metrics"])
        tracker.log_tags(run_id, {"specificity": specificity_words(outcome.specificity)[:5000]})
    result, ok = outcome.result, outcome.ok
    log_figures(tracker, run_id, figures.figure_makers(
        result.loss.numpy()[:, ok], result.activation.numpy()[:, ok], [s for s, keep in zip(result.seeds, ok) if keep],
        [t for t, keep in zip(outcome.tokens, ok) if keep], outcome.ids[ok], result.final_activation.numpy()[ok],
        outcome.decoded_activation[ok], hubs=s["statistics"]["nulls"]["decoded_starts"]))


FIGURES_FAILED_TAG = "amrepro.figures_failed"  # on a run: the figures that could not be drawn, and why


def log_figures(tracker: Tracker, run_id: str, makers: dict) -> None:
    """Each figure rendered on its own and logged; one that cannot be drawn is a warning line naming it and a
    tag on the run, never an error: the run's statistics, tables and seeds are logged all the same."""
    from . import figures

    rendered, failed = figures.render(makers)
    if rendered:
        tracker.log_artifacts(run_id, rendered)
    if failed:
        tracker.log_tags(run_id, {FIGURES_FAILED_TAG: "; ".join(f"{p}: {why}" for p, why in failed.items())[:5000]})
        for path, why in failed.items():
            report.errors.print(f"warning: the figure {path} of run {run_id} could not be drawn ({why}); "
                                "everything else is logged.", soft_wrap=True, markup=False)


def decode(run_id: str) -> bool:
    """Re-derive the tokens of a child run (or every child of a parent) from its logged final embeddings.
    True when they equal the logged tokens.json."""
    from .tracking import RunReader

    reader = RunReader()
    parent, selected = reader.family(run_id)  # a bad id is answered before torch is imported
    if reader.note:
        report.errors.print(f"note: {reader.note}", soft_wrap=True, markup=False)
    import torch

    from .decode import nearest_tokens
    from .model import load_model

    config = Config.from_params(parent.data.params)
    finals = np.stack([reader.npy(c, "embeddings/final.npy") for c in selected])  # [runs, pos, d_model]
    logged = [reader.json(c, "tokens.json")["ids"] for c in selected]
    lm = load_model(config.model, torch.device("cpu"), note=report.note)  # nearest-token search needs no accelerator
    ids, _ = nearest_tokens(torch.from_numpy(finals), lm.embedding)
    rows = [(c.data.params["seed"], lm.token_strings(row), row == want)
            for c, row, want in zip(selected, ids.tolist(), logged)]
    report.print_decoded(run_id, rows)
    return all(match for _, _, match in rows)


# environment tags whose difference can explain a final embedding that is not bit-identical
_NUMERIC_ENV = ("env.git_commit", "env.git_dirty", "env.torch", "env.transformers", "env.numpy", "env.device",
                "env.device_name", "env.cuda", "env.threads", "env.platform")


def reproduce(run_id: str, device: str | None = None, tolerance: float = 1e-4) -> bool:
    """Re-run the batch a parent or child run belongs to and compare with its logged artifacts.

    The whole batch is re-run even for one child: the runs never interact, but the BLAS kernels chosen for a
    batch of 10 and a batch of 1 round differently, so only the same batch can be bit-identical."""
    import dataclasses

    from .tracking import RunReader

    reader = RunReader()
    parent, selected = reader.family(run_id)  # a bad id is answered before torch is imported
    if reader.note:
        report.errors.print(f"note: {reader.note}", soft_wrap=True, markup=False)
    from . import features
    from .experiment import prepare
    from .provenance import environment
    from .tracking import BATCH_TAG

    logged_env = {k: v for k, v in parent.data.tags.items() if k.startswith("env.")}
    config = Config.from_params(parent.data.params)
    _check_family_params(config, parent, selected)
    config = dataclasses.replace(config, device=device or logged_env.get("env.device", config.device))
    logged = [(c, reader.npy(c, "embeddings/initial.npy"), reader.npy(c, "embeddings/final.npy"),
               reader.json(c, "tokens.json")["ids"]) for c in selected]

    tracker = Tracker()
    with _saying_what_was_saved(tracker), tracker:
        prep = prepare(config, note=report.note)
        features.check_unchanged(prep.target, parent.data.tags)  # the same direction or SAE file, or no rerun
        env_now = {**environment(prep.lm.device), **prep.lm.fingerprint()}
        weights = (parent.data.tags.get("model.weights_sha256"), env_now["model.weights_sha256"])
        differences = {k: (logged_env.get(k, "?"), env_now[k]) for k in _NUMERIC_ENV if logged_env.get(k) != env_now[k]}
        new_run = tracker.start_parent(config.to_params(), {**env_now, "amrepro.reproduces": run_id,
                                                            # nested under the parent it re-ran, in the UI
                                                            "mlflow.parentRunId": parent.info.run_id},
                                       run_name=f"reproduce {run_id[:8]}", experiment_id=parent.info.experiment_id)
        with report.epoch_progress(config.n_steps, config.runs) as on_epoch:
            outcome = _rerun(prep, parent.data.tags.get(BATCH_TAG), on_epoch)
        rows = []
        for child, initial, final, ids in logged:
            r = int(child.data.params["run_index"])
            new_final = outcome.result.final[r].numpy()
            rows.append({
                "seed": int(child.data.params["seed"]), "run_id": child.info.run_id,
                "initial_identical": outcome.result.initial[r].numpy().tobytes() == initial.tobytes(),
                "final_identical": new_final.tobytes() == final.tobytes(),
                "max_abs_diff": float(np.abs(new_final.astype(np.float64) - final).max()),
                "tokens_identical": [int(i) for i in outcome.ids[r]] == ids,
            })
        verdict = _verdict(rows, differences, tolerance, weights)
        tracker.log_metrics(new_run, {"max_abs_diff_final": max(row["max_abs_diff"] for row in rows),
                                      "n_runs_bit_identical": sum(row["final_identical"] for row in rows)})
        tracker.log_artifacts(new_run, {"reproduction.json": json_bytes(
            {"reproduces": run_id, "verdict": verdict, "runs": rows,
             "environment_differences": {k: {"logged": a, "now": b} for k, (a, b) in differences.items()}})})
        tracker.log_tags(new_run, {"amrepro.verdict": verdict})
        tracker.end(new_run)
    report.print_reproduction(run_id, rows, differences, verdict, new_run)
    return verdict.startswith("reproduced")


def _rerun(prep, batch: str | None, on_epoch):
    """The outcome of prep's target, re-run in the same batch it was optimized in: alone (amrepro run), or with
    the other targets of its sweep batch (the BATCH_TAG of a sweep's target parent)."""
    from .batch import batch_targets, execute_many, prepare_many
    from .experiment import execute

    targets = batch_targets(batch) if batch else [prep.target]
    if targets == [prep.target]:
        return execute(prep, on_epoch)
    if prep.target not in targets:
        raise AmreproError(f"the run's batch tag names {len(targets)} targets, but not its own target "
                           f"{prep.target.name}: the tag was edited; delete it to re-run the target alone.")
    outcomes = execute_many(prepare_many(prep.config, targets, prep.lm), on_epoch)
    return outcomes[targets.index(prep.target)]


def _check_family_params(config: Config, parent, children) -> None:
    """A parent and its children are logged with the same hyperparameters; a param edited afterwards (in the UI
    or the store) would otherwise be re-run and blamed on something else."""
    for child in children:
        params = {**child.data.params, "seed": child.data.params.get("batch_seed", "")}
        try:
            mine = Config.from_params(params)
        except Exception:  # noqa: BLE001 - AmreproError for a missing or garbled param
            mine = None
        if mine != config:
            diff = [f"{name}: parent {getattr(config, name)!r}, child {getattr(mine, name, '?')!r}"
                    for name in config.__dataclass_fields__ if mine is None or getattr(mine, name) != getattr(config, name)]
            raise AmreproError(f"the params of run {parent.info.run_id} and its child {child.data.params.get('seed', '?')} "
                               f"disagree ({'; '.join(diff)}): one was edited after it was logged, so the run cannot "
                               "be reproduced as logged.")
        expected_seed = config.seed + int(child.data.params.get("run_index", -1))
        if child.data.params.get("seed") != str(expected_seed):
            raise AmreproError(f"child run {child.info.run_id} has seed {child.data.params.get('seed')} but run_index "
                               f"{child.data.params.get('run_index')} of a batch starting at seed {config.seed} means "
                               f"{expected_seed}: it was edited after it was logged.")


def _verdict(rows: list[dict], differences: dict, tolerance: float, weights: tuple = (None, None)) -> str:
    """The first cause that explains a difference, most fundamental first: other weights explain everything
    downstream (std(wte) sets the starts, so they would otherwise read as "seeding changed")."""
    logged, now = weights
    if logged is not None and logged != now:
        if all(row["initial_identical"] and row["final_identical"] and row["tokens_identical"] for row in rows):
            return ("reproduced: bit-identical, although the model weights differ from the logged fingerprint "
                    f"(sha256 logged {logged[:12]}, now {now[:12]}) in parts this target does not read")
        return f"differs: the model weights changed (sha256 logged {logged[:12]}, now {now[:12]})"
    if not all(row["initial_identical"] for row in rows):
        return "differs: initial embeddings are not bit-identical (seeding changed)"
    if not all(row["tokens_identical"] for row in rows):
        return "differs: decoded tokens changed"
    if all(row["final_identical"] for row in rows):
        return "reproduced: bit-identical"
    worst = max(row["max_abs_diff"] for row in rows)
    if differences and worst <= tolerance:
        return f"reproduced within {tolerance:g} (max |delta| {worst:.2e}; environment differs: {', '.join(differences)})"
    return f"differs: final embeddings not bit-identical (max |delta| {worst:.2e})" + (
        f"; environment differs: {', '.join(differences)}" if differences else " in the same environment")
