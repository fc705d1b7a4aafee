"""One function per CLI command: connects the experiment (science), tracking (MLflow) and report (terminal)."""

from __future__ import annotations

import numpy as np

from . import report
from .config import Config
from .experiment import Outcome, execute, prepare
from .provenance import environment, pip_freeze
from .tracking import Tracker, json_bytes, npy_bytes


def child_params(config: Config, r: int) -> dict[str, str]:
    """Every hyperparameter, with this run's own seed; run_index and batch_seed locate it in its batch."""
    params = config.to_params()
    params.update(seed=str(config.seed + r), run_index=str(r), batch_seed=str(config.seed))
    return params


def run(config: Config, experiment: str | None = None) -> Outcome:
    config.validate()
    tracker = Tracker(experiment)
    tracker.check()  # a store that is down fails before minutes of model loading and optimization
    with tracker:  # any exception from here on ends every open run FAILED, Ctrl-C ends them KILLED
        tracker.attach_mlflow_run()  # under `mlflow run`, its run is open (and failed on error) from now on
        prep = prepare(config)
        parent = tracker.start_parent(config.to_params(), environment(prep.lm.device),
                                      run_name=f"{prep.target.name} x{config.runs}")
        children = [tracker.start_child(parent, f"seed-{seed}", child_params(config, r))
                    for r, seed in enumerate(config.seeds)]
        with report.epoch_progress(config.epochs, config.runs) as on_epoch:
            outcome = execute(prep, on_epoch)
        for r, child in enumerate(children):
            log_child(tracker, child, outcome, r)
            tracker.end(child)
        log_parent(tracker, parent, outcome)
        tracker.end(parent)
    report.print_outcome(outcome, parent, tracker.uri)
    return outcome


def log_child(tracker: Tracker, run_id: str, outcome: Outcome, r: int) -> None:
    result = outcome.result
    tracker.log_metrics(run_id,
                        scalars={"act/final": float(result.final_activation[r]),
                                 "act/decoded": float(outcome.decoded_activation[r]),
                                 "loss/final": float(result.loss[-1, r])},
                        history={"loss/total": result.loss[:, r].numpy(), "act/target": result.activation[:, r].numpy()})
    tracker.log_artifacts(run_id, {
        "embeddings/initial.npy": npy_bytes(result.initial[r].numpy().astype(np.float32)),
        "embeddings/final.npy": npy_bytes(result.final[r].numpy().astype(np.float32)),
        "tokens.json": json_bytes({"ids": [int(i) for i in outcome.ids[r]], "tokens": outcome.tokens[r]}),
    })


def log_parent(tracker: Tracker, run_id: str, outcome: Outcome) -> None:
    s = outcome.summary
    tracker.log_metrics(run_id, {"n_unique_tokens": s["n_unique_tokens"], "n_tokens_total": s["n_tokens_total"],
                                 "unique_fraction": s["unique_fraction"]})
    tracker.log_artifacts(run_id, {"summary.json": json_bytes(s), "environment/pip-freeze.txt": pip_freeze()})
