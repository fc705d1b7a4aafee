"""`amrepro run`: one target, RUNS seeds in one batch, one parent run with a seed run per seed."""

from __future__ import annotations

from .. import lean, report
from ..config import Config
from ..context import Context
from ..layout import run_name


def run(config: Config, experiment: str | None = None, layout: str = "seeds"):
    """The parent run exists from before the optimization (it is what `mlflow run` hands us, and the user sees
    it RUNNING); the seed runs are created after the science, cheaply, from results already saved to disk."""
    from ..experiment import execute, prepare
    from .. import kernels as gemm
    from ..provenance import pip_freeze

    config.validate()
    lean.check_layout(layout)
    ctx = Context(experiment)  # a store that is down fails here, before the model loads
    with ctx.session():  # any exception from here on ends every open run FAILED, Ctrl-C ends them KILLED
        prep = prepare(config, note=report.note)
        env = ctx.describe(prep.lm)
        if layout == "lean":  # on the parent and in the outcome file's tags, so `amrepro log` logs it lean too
            env = {**env, lean.LAYOUT_TAG: "lean"}
        parent, experiment_id = ctx.start_top(config.to_params(), env, run_name(config))
        with report.epoch_progress(config.n_steps, config.runs) as on_epoch:
            outcome = execute(prep, on_epoch)
        kernel = gemm.tags()  # the GEMM kernel is chosen when the science starts: what it used
        env.update(kernel)
        # The science is done: from here on it is kept on disk until the last store write
        frozen = pip_freeze()
        ctx.keep(outcome, parent, experiment_id, config.to_params(), env, frozen)
        ctx.log(parent, tags=kernel)  # after the file: a store that fails here loses nothing
        report.print_outcome(outcome, parent, ctx.uri)
        lean.log_run(ctx, parent, experiment_id, outcome, frozen, layout)
    return outcome
