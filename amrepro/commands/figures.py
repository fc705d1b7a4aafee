"""`amrepro figures RUN_ID`: draw a target's figures from its logged results and log them into its run: a lean
target (from seeds.npz), or a seeds-layout parent run with --figures false (from its seed runs)."""

from __future__ import annotations

from .. import layout, lean, report
from ..config import AmreproError
from ..context import Context
from ..layout import COMPARE_TAG, KIND_TAG, RUN_INDEX, TARGET_NAME, RunReader


def figures(run_id: str) -> list[str]:
    """The names of the figures logged into the target's parent run (a finished run takes artifacts)."""
    ctx = Context()
    reader = RunReader(ctx.store)
    run = reader.run(run_id)
    if RUN_INDEX in run.params or TARGET_NAME not in run.params or COMPARE_TAG in run.tags or KIND_TAG in run.tags:
        raise AmreproError(f"run {run_id} is not a target parent: `amrepro figures` draws a target's figures "
                           "into its parent run (an `amrepro run` run, a sweep's target, a compare's method run).")
    if lean.layout_of(run) == "lean":
        logged = lean.log_figures(ctx, reader, run)
    else:
        makers = layout.figure_makers(reader, run_id)
        if reader.note:  # an interrupted parent: the figures of the seeds that were logged
            report.note(reader.note)
        layout.log_figures(ctx, run.id, makers)
        logged = list(makers)
    report.console.print(f"logged {len(logged)} figures into run {run_id}: {', '.join(logged)}", soft_wrap=True,
                         markup=False)
    return logged
