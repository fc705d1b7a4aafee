"""`amrepro reproduce RUN_ID`: re-run the batch a logged run belongs to and compare with its artifacts."""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import lean, report
from ..config import AmreproError, Config
from ..context import Context, environment_tags, read_seeds
from ..layout import (BATCH_SEED, BATCH_TAG, NOTE_TAG, REPRODUCES_TAG, REPRODUCTION, REPRODUCTION_VERDICT_TAG,
                      RUN_INDEX, SEED, WEIGHTS_TAG, batch_targets, json_bytes)
from ..targets import Target

# environment tags whose difference can explain a final embedding that is not bit-identical
_NUMERIC_ENV = ("env.git_commit", "env.git_dirty", "env.torch", "env.transformers", "env.numpy", "env.device",
                "env.device_name", "env.cuda", "env.threads", "env.platform", "env.kernels")


def reproduce(run_id: str, device: str | None = None, tolerance: float = 1e-4) -> bool:
    """Re-run the batch a parent or child run belongs to and compare with its logged artifacts.

    The whole batch is re-run even for one child: the runs never interact, but the BLAS kernels chosen for a
    batch of 10 and a batch of 1 round differently, so only the same batch can be bit-identical."""
    ctx = Context()
    parent, seeds = read_seeds(run_id, ctx.store)  # either layout; a bad id is answered before torch is imported
    from .. import experiment, features, kernels

    logged_env = {k: v for k, v in parent.tags.items() if k.startswith("env.")}
    config = Config.from_params(parent.params)
    _check_family_params(config, parent, seeds)
    config = dataclasses.replace(config, device=device or logged_env.get("env.device", config.device))

    # the batch the run was optimized in: alone (amrepro run), or with the other targets of its sweep batch
    own, batch = Target.parse(config.target_name), parent.tags.get(BATCH_TAG)
    targets = batch_targets(batch) if batch else [own]
    if own not in targets:
        raise AmreproError(f"the run's batch tag names {len(targets)} targets, but not its own target "
                           f"{own.name}: the tag was edited; delete it to re-run the target alone.")
    # the logged GEMM kernel, not a new probe: another kernel rounds differently (kernels.py)
    with ctx.session(attach=False, leftovers=False), kernels.as_logged(logged_env):
        preps = (experiment.prepare_many(config, targets, note=report.note) if batch else
                 [experiment.prepare(config, note=report.note)])
        features.check_unchanged(own, parent.tags)  # the same direction or SAE file, or no rerun
        env_now = environment_tags(preps[0].lm)
        weights = (parent.tags.get(WEIGHTS_TAG), env_now[WEIGHTS_TAG])
        differences = {k: (logged_env.get(k, "?"), env_now[k]) for k in _NUMERIC_ENV if logged_env.get(k) != env_now[k]}
        # not nested under the parent (mlflow.parentRunId): the UI would fetch an older parent onto its first
        # page for this newest run, without its seeds (docs/mlflow.md, "Finding the seeds"); its page links there
        new_run = ctx.start_parent(config.to_params(), {**env_now, REPRODUCES_TAG: run_id, NOTE_TAG: (
            f"Reproduces run {run_id} by re-running the batch of [{parent.name or parent.id}](#/experiments/"
            f"{parent.experiment_id}/runs/{parent.id}): the verdict is the tag `{REPRODUCTION_VERDICT_TAG}`, each "
            f"seed's comparison {REPRODUCTION}.")},
            run_name=f"reproduce {run_id[:8]}", experiment_id=parent.experiment_id)
        with report.epoch_progress(config.n_steps, config.runs) as on_epoch:
            outcome = experiment.execute_many(preps, on_epoch)[targets.index(own)]
        initial, final = outcome.result.initial.numpy(), outcome.result.final.numpy()  # [runs, pos, d_model]
        rows = [{"seed": s.seed, "run_id": s.run_id,
                 "initial_identical": initial[s.run_index].tobytes() == s.initial.tobytes(),
                 "final_identical": final[s.run_index].tobytes() == s.final.tobytes(),
                 "max_abs_diff": float(np.abs(final[s.run_index].astype(np.float64) - s.final).max()),
                 "tokens_identical": [int(i) for i in outcome.ids[s.run_index]] == s.ids} for s in seeds]
        verdict = _verdict(rows, differences, tolerance, weights)
        ctx.log_metrics(new_run, {"max_abs_diff_final": max(row["max_abs_diff"] for row in rows),
                                      "n_runs_bit_identical": sum(row["final_identical"] for row in rows)})
        ctx.log_artifacts(new_run, {REPRODUCTION: json_bytes(
            {"reproduces": run_id, "verdict": verdict, "runs": rows,
             "environment_differences": {k: {"logged": a, "now": b} for k, (a, b) in differences.items()}})})
        ctx.log(new_run, tags={REPRODUCTION_VERDICT_TAG: verdict})
        ctx.end(new_run)
    report.print_reproduction(run_id, rows, differences, verdict, new_run)
    return verdict.startswith("reproduced")


def _check_family_params(config: Config, parent, children) -> None:
    """A parent and its children are logged with the same hyperparameters; a param edited afterwards (in the UI
    or the store) would otherwise be re-run and blamed on something else. (A lean parent's seeds have no params
    of their own: their seeds, from its seeds.npz, must be the parent's.)"""
    for child in children:
        if child.params is None:
            if child.seed != config.seed + child.run_index:
                raise AmreproError(f"run {parent.id}'s {lean.ARTIFACT} holds seed {child.seed} as run "
                                   f"{child.run_index}, but its params start at seed {config.seed}: a param was "
                                   "edited after it was logged, so the run cannot be reproduced as logged.")
            continue
        params = {**child.params, SEED: child.params.get(BATCH_SEED, "")}
        try:
            mine = Config.from_params(params)
        except Exception:  # noqa: BLE001 - AmreproError for a missing or garbled param
            mine = None
        if mine != config:
            diff = [f"{name}: parent {getattr(config, name)!r}, child {getattr(mine, name, '?')!r}"
                    for name in config.__dataclass_fields__ if getattr(mine, name, None) != getattr(config, name)]
            raise AmreproError(f"the params of run {parent.id} and its child {child.params.get(SEED, '?')} "
                               f"disagree ({'; '.join(diff)}): one was edited after it was logged, so the run cannot "
                               "be reproduced as logged.")
        expected_seed = config.seed + int(child.params.get(RUN_INDEX, -1))
        if child.params.get(SEED) != str(expected_seed):
            raise AmreproError(f"child run {child.run_id} has seed {child.params.get(SEED)} but run_index "
                               f"{child.params.get(RUN_INDEX)} of a batch starting at seed {config.seed} means "
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
    changed = f"environment differs: {', '.join(differences)}"
    if differences and worst <= tolerance:
        return f"reproduced within {tolerance:g} (max |delta| {worst:.2e}; {changed})"
    return f"differs: final embeddings not bit-identical (max |delta| {worst:.2e})" + (
        f"; {changed}" if differences else " in the same environment")
