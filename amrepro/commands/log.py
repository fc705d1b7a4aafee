"""`amrepro log FILE`: log the results an interrupted or disconnected `amrepro run` kept in an outcome file."""

from __future__ import annotations

import os
from pathlib import Path

from .. import lean, outcome_file, report
from ..context import Context, end_leftover, gone_reason
from ..layout import LOGGED_FROM_TAG, PARENT_TAG, run_name
from ..tracking import owner_alive, refuse_live_id
from ..secrets import redact


def log_file(path: str, force: bool = False) -> None:
    """Into the file's parent run when that still exists and is not FINISHED, else into a new parent in the
    file's experiment, found by name (line printed); then delete the file."""
    saved = outcome_file.load(path)
    ctx = Context(uri=os.environ.get("MLFLOW_TRACKING_URI") or saved.tracking_uri)
    refuse_live_id(ctx.store, saved.parent_id, f"`amrepro log {path}`", force)  # its `run` may still be logging
    with ctx.session(attach=False, leftovers=False):
        ctx.outcome_path = Path(path)
        ctx.kept.append(ctx.outcome_path)
        parent, experiment_id = ctx.reopen(saved.parent_id)
        if parent is None:
            experiment_id = _experiment(ctx, saved)
            parent = ctx.start_parent(saved.params, {**saved.tags, LOGGED_FROM_TAG: saved.parent_id},
                                      run_name=run_name(saved.outcome.config), experiment_id=experiment_id)
        lean.log_run(ctx, parent, experiment_id, saved.outcome, saved.pip_freeze, lean.layout_of(saved),
                     resume=parent == saved.parent_id)
        _end_dead_top(ctx, parent)
    report.console.print(f"logged {saved.outcome.config.runs} runs into parent run {parent} in {ctx.uri}; "
                         f"{path} was removed.")


def _experiment(ctx: Context, saved) -> str:
    """The experiment of a new parent: the file's, matched by NAME (an experiment id of another store names
    another team's experiment there), created when this store has none of that name; one line says which."""
    name = saved.experiment_name
    if name is None:  # a file written before the name was recorded: its id is right only in its own store
        if redact(ctx.uri, mask="") == saved.tracking_uri and ctx.store.experiment_exists(saved.experiment_id):
            _say(f"logging into experiment id {saved.experiment_id}, the one of the store the outcome file was made "
                 "for (the file does not name its experiment: an older amrepro wrote it).")
            return saved.experiment_id
        experiment_id, _ = ctx.write(ctx.store.experiment, None)
        _say(f"the outcome file does not name its experiment (an older amrepro wrote it) and was made for "
             f"{saved.tracking_uri}: logging into the default experiment "
             f"{ctx.store.experiment_name(experiment_id)!r} (id {experiment_id}).")
        return experiment_id
    experiment_id, found = ctx.write(ctx.store.experiment, name)
    _say(f"logging into the {'existing' if found else 'new'} experiment {name!r} (id {experiment_id}) of {ctx.uri}, "
         "matched by the name the outcome file records.")
    return experiment_id


def _end_dead_top(ctx: Context, parent: str) -> None:
    """A compare's top run that could not be ended when the store went away (its process is gone): ended KILLED
    now that its method run holds the results."""
    top_id = ctx.store.get(parent).tags.get(PARENT_TAG)
    top = ctx.store.get(top_id) if top_id else None
    if top is not None and top.status == "RUNNING" and owner_alive(top.tags) is False:
        end_leftover(ctx.store, top, gone_reason(top, "amrepro log"))
        _say(f"ended the top run {top.id} KILLED: the process that made it is gone; its method run {parent} now "
             "holds the logged results.")


def _say(line: str) -> None:
    report.console.print(line, soft_wrap=True, markup=False)
