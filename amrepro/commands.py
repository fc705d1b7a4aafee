"""One function per CLI command: connects the experiment (science), tracking (MLflow) and report (terminal)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from . import figures, metrics, report
from .config import AmreproError, Config, NoResult
from .experiment import Outcome, execute, prepare
from .provenance import environment, pip_freeze
from .specificity import specificity_words
from .tracking import Tracker, json_bytes, npy_bytes


def child_params(config: Config, r: int) -> dict[str, str]:
    """Every hyperparameter, with this run's own seed; run_index and batch_seed locate it in its batch."""
    params = config.to_params()
    params.update(seed=str(config.seed + r), run_index=str(r), batch_seed=str(config.seed))
    return params


def run(config: Config, experiment: str | None = None) -> Outcome:
    config.validate()
    tracker = Tracker(experiment)  # a store that is down fails here, before the model loads
    with _saying_what_was_saved(tracker), tracker:  # any exception from here on ends every open run FAILED, Ctrl-C ends them KILLED
        tracker.attach_mlflow_run()  # under `mlflow run`, its run is open (and failed on error) from now on
        prep = prepare(config, note=report.note)
        parent = tracker.start_parent(config.to_params(), {**environment(prep.lm.device), **prep.lm.fingerprint()},
                                      run_name=f"{prep.target.name} x{config.runs}")
        children = [tracker.start_child(parent, f"seed-{seed}", child_params(config, r))
                    for r, seed in enumerate(config.seeds)]
        with report.epoch_progress(config.epochs, config.runs) as on_epoch:
            outcome = execute(prep, on_epoch)
        for r, child in enumerate(children):
            log_child(tracker, child, outcome, r)
            why = outcome.diverged.get(r)
            if why:  # divergence is not a result: the run says why and ends FAILED
                tracker.log_tags(child, {"error": f"diverged: {why}"})
            tracker.end(child, "FAILED" if why else "FINISHED")
        log_parent(tracker, parent, outcome)
        if outcome.summary["statistics"] is None:
            tracker.log_tags(parent, {"error": f"all {config.runs} runs diverged"})
            tracker.end(parent, "FAILED")
            report.print_outcome(outcome, parent, tracker.uri)
            raise NoResult(f"all {config.runs} runs diverged ({outcome.diverged[0]}), so there is nothing to "
                           "compare; lower --lr or --l2. The runs are marked FAILED.")
        tracker.end(parent)
    report.print_outcome(outcome, parent, tracker.uri)
    return outcome


@contextmanager
def _saying_what_was_saved(tracker: Tracker):
    """On Ctrl-C, tell the user what the store now holds (the tracker has already ended the open runs)."""
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{tracker.n_finished} finished run(s) kept, {tracker.n_stopped} unfinished "
                                f"run(s) marked KILLED in {tracker.uri}.") from None


def log_child(tracker: Tracker, run_id: str, outcome: Outcome, r: int) -> None:
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
                        history={"loss/total": result.loss[:, r].numpy(), "act/target": result.activation[:, r].numpy()})
    files["tokens.json"] = json_bytes({"ids": [int(i) for i in outcome.ids[r]], "tokens": outcome.tokens[r]})
    tracker.log_artifacts(run_id, files)


def log_parent(tracker: Tracker, run_id: str, outcome: Outcome) -> None:
    s = outcome.summary
    counts = {"runs/diverged": len(outcome.diverged), "runs/ok": s["n_runs_ok"]}
    tracker.log_artifacts(run_id, {"summary.json": json_bytes(s), "environment/pip-freeze.txt": pip_freeze()})
    if s["statistics"] is None:  # every run diverged: no statistic exists, and none is logged
        tracker.log_metrics(run_id, counts)
        tracker.log_tags(run_id, {"verdict": f"no result: all {len(outcome.diverged)} runs diverged"})
        return
    tracker.log_metrics(run_id, {"n_unique_tokens": s["n_unique_tokens"], "n_tokens_total": s["n_tokens_total"],
                                 "unique_fraction": s["unique_fraction"], **counts, **s["statistics"]["metrics"]})
    tracker.log_tags(run_id, {"verdict": s["statistics"]["verdict"][:5000]})
    if outcome.specificity is not None:  # --controls
        tracker.log_metrics(run_id, outcome.specificity["metrics"])
        tracker.log_tags(run_id, {"specificity": specificity_words(outcome.specificity)[:5000]})
    result, ok = outcome.result, outcome.ok
    for path, figure in figures.all_figures(result.loss.numpy()[:, ok], result.activation.numpy()[:, ok],
                                            [s for s, keep in zip(result.seeds, ok) if keep],
                                            [t for t, keep in zip(outcome.tokens, ok) if keep], outcome.ids[ok],
                                            result.final_activation.numpy()[ok],
                                            outcome.decoded_activation[ok],
                                            hubs=s["statistics"]["nulls"]["decoded_starts"]).items():
        tracker.log_figure(run_id, figure, path)


def decode(run_id: str) -> bool:
    """Re-derive the tokens of a child run (or every child of a parent) from its logged final embeddings.
    True when they equal the logged tokens.json."""
    import torch

    from .decode import nearest_tokens
    from .model import load_model
    from .tracking import RunReader

    reader = RunReader()
    parent, selected = reader.family(run_id)
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
    parent, selected = reader.family(run_id)
    logged_env = {k: v for k, v in parent.data.tags.items() if k.startswith("env.")}
    config = Config.from_params(parent.data.params)
    _check_family_params(config, parent, selected)
    config = dataclasses.replace(config, device=device or logged_env.get("env.device", config.device))
    logged = [(c, reader.npy(c, "embeddings/initial.npy"), reader.npy(c, "embeddings/final.npy"),
               reader.json(c, "tokens.json")["ids"]) for c in selected]

    tracker = Tracker()
    with _saying_what_was_saved(tracker), tracker:
        prep = prepare(config, note=report.note)
        env_now = {**environment(prep.lm.device), **prep.lm.fingerprint()}
        weights = (parent.data.tags.get("model.weights_sha256"), env_now["model.weights_sha256"])
        differences = {k: (logged_env.get(k, "?"), env_now[k]) for k in _NUMERIC_ENV if logged_env.get(k) != env_now[k]}
        new_run = tracker.start_parent(config.to_params(), {**env_now, "amrepro.reproduces": run_id},
                                       run_name=f"reproduce {run_id[:8]}", experiment_id=parent.info.experiment_id)
        with report.epoch_progress(config.epochs, config.runs) as on_epoch:
            outcome = execute(prep, on_epoch)
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
