"""`amrepro figures RUN_ID`: draw a lean target's figures from its artifacts and log them into it."""

from __future__ import annotations

from .. import lean, report
from ..config import AmreproError
from ..context import Context
from ..layout import RUN_INDEX, TARGET_NAME, RunReader


def figures(run_id: str) -> list[str]:
    """The five figures of the seeds layout (curves, token grid, token frequency, projection gap, hub tokens),
    drawn from seeds.npz and summary.json; logged into the run (a finished run takes artifacts)."""
    ctx = Context()
    reader = RunReader(ctx.store)
    run = reader.run(run_id)
    if lean.layout_of(run) != "lean":
        if RUN_INDEX in run.params or TARGET_NAME not in run.params:
            raise AmreproError(f"run {run_id} is not a target parent: `amrepro figures` draws a target's figures "
                               "into its parent run.")
        raise AmreproError(f"run {run_id} is in the seeds layout, which logs its figures with the run "
                           "(Artifacts tab, figures/); `amrepro figures` draws those of lean targets.")
    logged = lean.log_figures(ctx, reader, run)
    report.console.print(f"logged {len(logged)} figures into run {run_id}: {', '.join(logged)}", soft_wrap=True,
                         markup=False)
    return logged
