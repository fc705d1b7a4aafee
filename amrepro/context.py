"""What every top-level command does around its own job, done once: connect to the store, end the runs a killed
amrepro left RUNNING, hold the runs it opens (none is left RUNNING), attach to the run of `mlflow run`, describe
the environment, and turn a store failure or a Ctrl-C into one sentence that says what the store now holds and
where unlogged results are kept:

    ctx = Context(experiment)      # a store that is down fails here, before the model loads
    with ctx.session():            # leftovers ended, errors in one sentence, `mlflow run`'s run attached
        ctx.describe(lm)           # env.* and model.* tags, built once; the busy-cores note
        top, experiment_id = ctx.start_top(params, tags, run_name)
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import outcome_file, report, signals
from .config import AmreproError
from .layout import (ERROR_TAG, HOST_TAG, PARENT_TAG, PID_TAG, REPRODUCES_TAG, RUN_INDEX, RUN_NAME_TAG, SHA256_PREFIX,
                     TAG_LIMIT, TARGET_NAME, RunReader)
from .provenance import busy_cores_note, environment
from .tracking import Store, StoreLost, owner_alive, process_tags, quick_http_failure, short, store_problem


def environment_tags(lm) -> dict[str, str]:
    """env.* (versions, device, threads, git, the GEMM kernel) and model.* (fingerprint) tags of a loaded model."""
    from . import kernels  # imports torch

    return {**environment(lm.device), **kernels.tags(), **lm.fingerprint()}


class Context:
    """The runs a command opens: as a context manager (or through session()), on an exception every open run ends
    FAILED (KILLED on Ctrl-C or SIGTERM) with the error as a tag, counted, so the command can say what the store
    now holds."""

    def __init__(self, experiment: str | None = None, uri: str | None = None):
        self.store = Store(uri)  # fails fast, before minutes of model loading and optimization
        self.uri = self.store.uri
        self.experiment = experiment
        self.open_runs: list[str] = []
        self.attached: str | None = None
        self.n_finished = 0  # runs this context ended FINISHED (they stay so, whatever happens next)
        self.n_stopped = 0  # runs it ended FAILED or KILLED on the way out of an error
        self.stopped_as = "KILLED"  # ... and which: KILLED (Ctrl-C, SIGTERM) or FAILED (an error, a store lost)
        self.n_unended = 0  # open runs it could not end (the store itself failed)
        self._batch: dict | None = None  # see batched()
        self.outcome_path = None  # the outcome file of the parent being logged (keep() sets it), one of kept
        self.kept: list[Path] = []  # every outcome file kept and not yet logged (a sweep's chunk keeps several)
        self.unkept: dict[str, str] = {}  # parent -> why its outcome file could not be written (not yet logged)
        self.experiment_name: str | None = None  # the top run's experiment (start_top), recorded in outcome files
        self.env: dict[str, str] = {}  # the environment tags of the top run (describe)

    @contextmanager
    def session(self, attach: bool = True, leftovers: bool = True):
        """leftovers: end the runs a SIGKILLed amrepro of this host left RUNNING (one line). Inside, any exception
        ends every open run FAILED (Ctrl-C: KILLED) and says what was saved; attach: under `mlflow run`, its run
        is held open (and failed on error) from the start."""
        if leftovers:
            end_leftovers(self)
        with saying_what_was_saved(self), self:
            run_id = os.environ.get("MLFLOW_RUN_ID") if attach else None
            if run_id:  # `mlflow run`'s run is our parent: held open now, so a failure from here on ends it FAILED
                try:
                    self.store.get(run_id)
                except Exception:  # noqa: BLE001
                    raise AmreproError(f"MLFLOW_RUN_ID={run_id} names no run in {self.uri}.") from None
                self.open_runs.append(run_id)
                self.write(self.log, run_id, tags=process_tags())  # a SIGKILL from now on is found by `amrepro doctor`
            self.attached = run_id
            yield self

    def describe(self, lm, busy_note: bool = True) -> dict[str, str]:
        """The environment tags of the top run (kept as self.env); busy_note: say when other processes keep the
        cores busy (a speed figure from this run would be misleading)."""
        if busy_note and (busy := busy_cores_note()):
            report.note(busy)
        self.env = environment_tags(lm)
        return self.env

    # --- lifecycle --------------------------------------------------------------------------------------
    def __enter__(self) -> "Context":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            return
        status = self.stopped_as = "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
        message = signals.words(error) if status == "KILLED" else short(error)
        with signals.ignored(), quick_http_failure():  # a store that just failed is not retried for minutes
            for run_id in list(self.open_runs):
                self.stop(run_id, status, message)

    def stop(self, run_id: str, status: str, message: str) -> None:
        """End an unfinished run FAILED or KILLED, the message as its error tag, and count it; a store that fails
        here leaves it RUNNING, counted as such (`amrepro doctor` ends it later)."""
        try:
            self.store.set_tag(run_id, ERROR_TAG, message[:TAG_LIMIT])
            self.end(run_id, status)
            self.n_stopped += 1
        except Exception:  # noqa: BLE001 - the store itself may be what failed; the caller ends the rest
            self.n_unended += 1

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        with signals.shielded():  # the store and open_runs agree, whenever a Ctrl-C comes
            self.store.end(run_id, status)
            self.n_finished += status == "FINISHED"
            if run_id in self.open_runs:
                self.open_runs.remove(run_id)

    def write(self, fn, *args, **kwargs):
        """A store write before any result exists: a store that refuses it (read-only, gone) is bad input."""
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001
            if not hasattr(error, "amrepro_store_seconds"):
                raise
            raise AmreproError(store_problem(error, self.uri) + ".") from None

    def start_parent(self, params: dict[str, str], tags: dict[str, str], run_name: str | None = None,
                     experiment_id: str | None = None) -> str:
        """The attached `mlflow run` run, or a new one; log params and tags on it."""
        run_id = self.attached
        if run_id:
            # mlflow run already logged the MLproject parameters (MLflow refuses to change a param), and gave
            # the run a random name ("painted-rook-610"): amrepro's name says what it is.
            existing = self.store.get(run_id).params
            params = {k: v for k, v in params.items() if k not in existing}
            if run_name:
                tags = {**tags, RUN_NAME_TAG: run_name}
        else:
            with signals.shielded():  # a run that exists is in open_runs, whenever a Ctrl-C comes
                experiment_id = experiment_id or self.write(self.store.experiment, self.experiment)[0]
                run_id = self.write(self.store.create, experiment_id, run_name, process_tags())
                self.open_runs.append(run_id)
        self.write(self.log, run_id, params=params, tags={**tags, **process_tags()})
        return run_id

    def start_top(self, params: dict[str, str], tags: dict[str, str], run_name: str) -> tuple[str, str]:
        """start_parent for a command's top run (run, sweep, compare), with the environment tags (describe):
        (run id, its experiment id), the experiment tagged as model training."""
        run_id = self.start_parent(params, {**self.env, **tags}, run_name)
        experiment_id = self.write(self.store.get, run_id).experiment_id
        self.write(self.store.mark_experiment, experiment_id)
        self.experiment_name = self.write(self.store.experiment_name, experiment_id)
        return run_id, experiment_id

    def keep(self, outcome, parent: str, experiment_id: str, params: dict[str, str], tags: dict[str, str],
             frozen: bytes) -> None:
        """The science of parent is done: save its outcome file before the first store write after it (a Ctrl-C
        here waits for the file; layout.log_outcome removes it after the last). A file that cannot be written
        (a full disk, AMREPRO_OUTCOMES not a folder) costs one warning line: the results go straight to the store
        and are lost only if the store fails too, which the error message then says plainly."""
        with signals.shielded():
            try:
                self.outcome_path = outcome_file.save(outcome, parent, experiment_id, self.uri, params, tags, frozen,
                                                      self.experiment_name)
                self.kept.append(self.outcome_path)
            except OSError as error:
                self.outcome_path = None
                why = f"{outcome_file.path_for(parent)} could not be written ({error.strerror or error})"
                self.unkept[parent] = why
                report.errors.print(f"warning: the outcome file {why}; logging straight to {self.uri} "
                                    "(if the store fails too, these results are lost).", soft_wrap=True, markup=False)

    def logged(self, parent: str) -> None:
        """Every run of parent is logged: its outcome file (the one being logged, outcome_path) goes; nothing of it
        is kept any longer, and nothing of it can be lost."""
        with signals.shielded():
            path, self.outcome_path = self.outcome_path, None
            if path is not None:
                Path(path).unlink(missing_ok=True)
                self.kept = [p for p in self.kept if p != path]
            self.unkept.pop(parent, None)

    def start_child(self, parent_id: str, name: str, params: dict[str, str], experiment_id: str) -> str:
        """A child run with its params; inside batched(run) the params wait for the run's one log_batch."""
        with signals.shielded():
            run_id = self.store.create(experiment_id, name, {PARENT_TAG: parent_id, **process_tags()})
            self.open_runs.append(run_id)
        self.log(run_id, params=params)
        return run_id

    def reopen(self, run_id: str):
        """(run_id, experiment id) of a run that exists and is not FINISHED, set RUNNING again and held open
        (for `amrepro log`, `amrepro sweep --resume`); (None, None) otherwise."""
        try:
            run = self.store.get(run_id)
        except Exception as error:  # noqa: BLE001 - no such run (the store answering is checked by connecting)
            if "RESOURCE_DOES_NOT_EXIST" in str(error) or "not found" in str(error).lower():
                return None, None
            raise
        if run.status == "FINISHED" or run.lifecycle_stage == "deleted":
            return None, None
        with signals.shielded():
            self.store.restart(run_id)
            self.open_runs.append(run_id)
        if ERROR_TAG in run.tags:
            self.store.delete_tag(run_id, ERROR_TAG)
        self.log(run_id, tags=process_tags())
        return run_id, run.experiment_id

    # --- logging ----------------------------------------------------------------------------------------
    @contextmanager
    def batched(self, run_id: str):
        """Params, tags and metrics logged to run_id inside the block go to the store as ONE log_batch at its
        end: a child costs create_run, one artifact upload, one log_batch and set_terminated, whatever it logs."""
        self._batch = batch = {"run_id": run_id, "params": {}, "tags": {}, "metrics": []}
        try:
            yield
        finally:
            self._batch = None
        self.log(**batch)

    def log(self, run_id: str, params: dict | None = None, tags: dict | None = None, metrics: list | None = None):
        """params and tags name -> value, metrics (key, value, step); inside batched(run_id) they wait for its end."""
        if self._batch is not None and self._batch["run_id"] == run_id:
            self._batch["params"].update(params or {})
            self._batch["tags"].update(tags or {})
            self._batch["metrics"] += metrics or []
        elif params or tags or metrics:
            self.store.log_batch(run_id, params or {}, tags or {}, metrics or [])

    def log_metrics(self, run_id: str, scalars: dict[str, float], history: dict[str, np.ndarray] | None = None):
        """Scalars at step 0 and whole per-epoch histories (step = epoch), in one log_batch (see log())."""
        metrics = [(k, v, 0) for k, v in scalars.items()]
        for key, values in (history or {}).items():
            metrics += [(key, v, step) for step, v in enumerate(np.asarray(values, dtype=float).tolist())]
        self.log(run_id, metrics=metrics)

    def log_artifacts(self, run_id: str, files: dict[str, bytes]) -> None:
        """Write files (relative path -> bytes) as artifacts, each with a sha256/<path> integrity tag."""
        self.store.upload(run_id, files)
        self.log(run_id, tags={SHA256_PREFIX + path: hashlib.sha256(data).hexdigest() for path, data in files.items()})


# --- runs a killed amrepro left RUNNING --------------------------------------------------------------------
def leftovers(store) -> list[tuple[object, bool | None]]:
    """Every RUNNING amrepro run of the store (process tags, a reproduction, a parent or a seed run), with
    owner_alive(): False = its process is gone."""
    return [(r, owner_alive(r.tags)) for r in store.search(None, "attributes.status = 'RUNNING'")
            if HOST_TAG in r.tags or REPRODUCES_TAG in r.tags or TARGET_NAME in r.params or RUN_INDEX in r.params]


def end_leftover(store, run, why: str) -> None:
    store.set_tag(run.id, ERROR_TAG, why)
    store.end(run.id, "KILLED")


def end_leftovers(ctx: Context) -> None:
    """Runs left RUNNING by an amrepro process of this host that no longer exists: ended KILLED, one line."""
    try:
        gone = [run for run, alive in leftovers(ctx.store) if alive is False]
        for run in gone:
            end_leftover(ctx.store, run, gone_reason(run, "amrepro run"))
    except Exception:  # noqa: BLE001 - housekeeping never stops a run; `amrepro doctor` says what failed
        return
    if gone:
        pids = sorted({run.tags[PID_TAG] for run in gone}, key=int)
        report.errors.print(f"note: ended {len(gone)} run(s) KILLED that amrepro process(es) {', '.join(pids)} on "
                            f"{gone[0].tags[HOST_TAG]} left RUNNING when they were killed.",
                            soft_wrap=True, markup=False)


def gone_reason(run, by: str) -> str:
    return (f"its process (pid {run.tags.get(PID_TAG)} on {run.tags.get(HOST_TAG)}) is gone: killed or crashed "
            f"without ending the run; ended by {by}")


@contextmanager
def saying_what_was_saved(ctx: Context):
    """On Ctrl-C, SIGTERM or a store that fails, tell the user what the store now holds (the context has
    already ended the open runs) and where the results are kept when they are not all logged."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        raise type(interrupt)(_what_was_saved(ctx)) from None
    except Exception as error:  # noqa: BLE001
        if not hasattr(error, "amrepro_store_seconds"):
            raise
        if not ctx.kept and not ctx.unkept:  # nothing computed yet: the store is unusable
            raise AmreproError(store_problem(error, ctx.uri) + ".") from None
        raise StoreLost(f"{store_problem(error, ctx.uri)}; {_what_was_saved(ctx)}") from None


def _what_was_saved(ctx: Context) -> str:
    kept = [p for p in ctx.kept if Path(p).exists()]
    if not (ctx.n_finished or ctx.n_stopped or ctx.n_unended or ctx.kept or ctx.unkept):
        return "nothing was logged yet."
    text = (f"{ctx.n_finished} finished run(s) kept, {ctx.n_stopped} unfinished run(s) marked {ctx.stopped_as} in "
            f"{ctx.uri}.")
    if ctx.n_unended:
        text = (text[:-1] + f", {ctx.n_unended} could not be ended (the store failed) and stay RUNNING until "
                "`amrepro doctor` (or the next amrepro command on this host) ends them.")
    if len(kept) == 1:
        text += f" Every result is kept in {kept[0]}: `amrepro log {kept[0]}` logs it."
    elif kept:
        text += (f" The results not yet logged are kept in {len(kept)} outcome files: `amrepro log FILE` logs each "
                 f"of {', '.join(map(str, kept))}.")
    if ctx.unkept:
        text += f" The results not yet logged are LOST: the outcome file {'; '.join(ctx.unkept.values())}."
    return text


def read_seeds(run_id: str, store=None):
    """(parent run, [lean.Seed]) of a run id in either layout (lean.read_seeds), its note printed."""
    from . import lean

    reader = RunReader(store or Store())
    parent, seeds = lean.read_seeds(reader, run_id)
    if reader.note:
        report.errors.print(f"note: {reader.note}", soft_wrap=True, markup=False)
    return parent, seeds

