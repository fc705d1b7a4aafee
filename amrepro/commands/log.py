"""`amrepro log FILE`: log the results an interrupted or disconnected `amrepro run` kept in an outcome file."""

from __future__ import annotations

import os
from pathlib import Path

from .. import lean, outcome_file, report
from ..context import Context
from ..layout import LOGGED_FROM_TAG, log_outcome, run_name
from ..ownership import refuse_live_id


def log_file(path: str, force: bool = False) -> None:
    """Into the file's parent run when that still exists and is not FINISHED, else into a new parent; then
    delete the file. Store: MLFLOW_TRACKING_URI, else the one the file was made for."""
    saved = outcome_file.load(path)
    ctx = Context(uri=os.environ.get("MLFLOW_TRACKING_URI") or saved.tracking_uri)
    refuse_live_id(ctx.store, saved.parent_id, f"`amrepro log {path}`", force)  # its `run` may still be logging
    with ctx.session(attach=False, leftovers=False):
        ctx.outcome_path = Path(path)
        parent, experiment_id = ctx.reopen(saved.parent_id)
        if parent is None:
            experiment_id = saved.experiment_id if ctx.store.experiment_exists(saved.experiment_id) else None
            config = saved.outcome.config
            parent = ctx.start_parent(saved.params, {**saved.tags, LOGGED_FROM_TAG: saved.parent_id},
                                          run_name=run_name(config), experiment_id=experiment_id)
            experiment_id = ctx.store.get(parent).experiment_id
        if saved.tags.get(lean.LAYOUT_TAG) == "lean":
            lean.log_run(ctx, parent, saved.outcome, saved.pip_freeze)
        else:
            log_outcome(ctx, parent, experiment_id, saved.outcome, saved.pip_freeze,
                        resume=parent == saved.parent_id)
    report.console.print(f"logged {saved.outcome.config.runs} runs into parent run {parent} in {ctx.uri}; "
                         f"{path} was removed.")
