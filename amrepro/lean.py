"""The lean layout of a target: ONE parent run, no seed runs; made for sweeps of a whole layer.

A lean target parent (tag amrepro.layout = lean) holds what a seeds-layout parent holds (layout.parent_record:
params, tags, the headline metrics and each seed's per-epoch curves, summary.json, the pip freeze), and instead
of seed runs:
- seeds.npz: every seed's initial and final embeddings, decoded token ids, full per-epoch histories (what
  `decode`, `reproduce` and `figures` read);
- seed_table.json: one row per seed, in the format of MlflowClient.log_table, so the UI shows it as a table.

Four store requests per target (start_target, log_target). Figures are rendered on demand (`amrepro figures
RUN_ID`) or for the targets a sweep flags. read_seeds reads both layouts.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from . import figures, layout, parent_metrics, signals
from .config import AmreproError
from .errors import NoResult
from .printable import token_repr
from .stats import REPRODUCIBILITY
from .tracking import process_tags

LAYOUT_TAG = "amrepro.layout"  # on lean parents (and a sweep run): "lean"; absent means "seeds"
LAYOUTS = ("seeds", "lean")
ARTIFACT, TABLE = "seeds.npz", "seed_table.json"
LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"  # what MlflowClient.log_table sets: the UI shows these as tables
BATCH_ENTITIES = 1000  # MLflow's log_batch limit (metrics + params + tags) per request; params, tags: 100 each
FIGURES_TAG = "amrepro.figures"  # on a lean parent whose figures were drawn: their paths
FLAGGED_MAX = 16  # figures a sweep renders by itself, at most (the rest: `amrepro figures RUN_ID`)


def check_layout(name: str) -> None:
    if name not in LAYOUTS:
        raise AmreproError(f"--layout must be one of {', '.join(LAYOUTS)}, got '{name}'.")


def layout_of(run) -> str:
    return run.tags.get(LAYOUT_TAG, "seeds")


# --- writer -----------------------------------------------------------------------------------------------
def start_target(ctx, experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
    """A lean target parent, created with every tag in one request (its params come with its results)."""
    with signals.shielded():  # a run that exists is in open_runs, whenever a Ctrl-C comes
        run_id = ctx.write(ctx.store.create, experiment_id, run_name,
                           {**tags, LAYOUT_TAG: "lean", layout.RUN_NAME_TAG: run_name, **process_tags()})
        ctx.open_runs.append(run_id)
    return run_id


def log_target(ctx, parent: str, outcome, frozen: bytes, params: dict[str, str] | None = None) -> None:
    """Log an outcome into its lean parent and end it (one upload, one log_batch); its outcome file goes.
    params: the parent's params when they are not logged yet (a sweep's target)."""
    files, tags = layout.parent_record(outcome, frozen)
    files.update({ARTIFACT: seeds_npz(outcome), TABLE: seed_table(outcome)})
    tags[LOGGED_ARTIFACTS_TAG] = json.dumps([{"path": TABLE, "type": "table"}])  # what log_table sets
    params = params or {}
    room = min(parent_metrics.ROW_BUDGET, BATCH_ENTITIES - len(params) - len(tags) - len(files))  # + sha256 tags
    with ctx.batched(parent):  # one request (MLflow would split a larger batch)
        ctx.log_artifacts(parent, files)  # one upload (over HTTP: one request per file), a sha256 tag per file
        ctx.log(parent, params, tags, parent_metrics.metric_rows(outcome, room))
    layout.end_parent(ctx, parent, outcome)


def seeds_npz(outcome) -> bytes:
    """Every seed's arrays in one file: what the seed runs' artifacts and metrics hold, and the full histories."""
    result = outcome.result
    arrays = {"seeds": np.asarray(result.seeds, dtype=np.int64),  # [runs]
              "initial": result.initial.numpy().astype(np.float32),  # [runs, pos, d_model]
              "final": result.final.numpy().astype(np.float32),  # [runs, pos, d_model]
              "ids": np.asarray(outcome.ids, dtype=np.int64),  # [runs, pos] decoded token ids
              "loss": result.loss.numpy(), "activation": result.activation.numpy(),  # [epochs, runs] each
              "final_activation": result.final_activation.numpy(),  # [runs]
              "decoded_activation": np.asarray(outcome.decoded_activation),  # [runs]
              "diverged_at": result.diverged_at.numpy()}  # [runs], -1: stayed finite
    arrays.update({f"history/{key}": values.numpy() for key, values in result.history.items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def seed_table(outcome) -> bytes:
    """One row per seed, what a user compares across seeds, as the bytes MlflowClient.log_table writes for a dict
    (pandas, orient 'split'), without its 4 requests."""
    import pandas as pd

    result = outcome.result
    finite = [r not in outcome.diverged for r in range(len(result.seeds))]
    columns = {"seed": [int(s) for s in result.seeds],
               "tokens": [" | ".join(token_repr(t, i) for t, i in zip(row, ids)) if ok else "(diverged)"
                          for row, ids, ok in zip(outcome.tokens, outcome.ids, finite)],  # '\ufffd' with its id
               "act (final)": [float(a) if ok else None for a, ok in zip(result.final_activation.tolist(), finite)],
               "act (decoded)": [float(a) if ok else None
                                 for a, ok in zip(outcome.decoded_activation.tolist(), finite)],
               "diverged": [not ok for ok in finite],
               "why": [outcome.diverged.get(r, "") for r in range(len(result.seeds))]}
    return pd.DataFrame(columns).to_json(orient="split", index=False, date_format="iso").encode()


# --- reader: both layouts, the same arrays ------------------------------------------------------------------
@dataclass
class Seed:
    seed: int
    run_index: int
    run_id: str  # the seed run (seeds layout) or the lean parent
    initial: np.ndarray  # [pos, d_model] float32
    final: np.ndarray  # [pos, d_model] float32
    ids: list[int]  # the decoded token ids that were logged
    params: dict[str, str] | None  # the seed run's params (seeds layout); None for lean (the parent's params)


def read_seeds(reader, run_id: str):
    """(parent run, [Seed] of its finished seeds) of a run id, in either layout; reader.note says what is left
    out (diverged, not logged). A seed run id selects that seed alone."""
    run = reader.run(run_id)
    if layout_of(run) != "lean":
        parent, children = reader.family(run_id)
        return parent, [Seed(int(c.params[layout.SEED]), int(c.params[layout.RUN_INDEX]), c.id,
                             reader.npy(c, layout.INITIAL), reader.npy(c, layout.FINAL),
                             reader.json(c, layout.TOKENS)["ids"], c.params) for c in children]
    arrays = read_arrays(reader, run)
    ok = arrays["diverged_at"] < 0
    if not ok.any():
        raise AmreproError(f"run {run_id} has nothing to decode: all its {len(ok)} runs diverged.")
    reader.note = None if ok.all() else (f"run {run_id}: {int(ok.sum())} of its {len(ok)} runs are used here, "
                                         f"{int((~ok).sum())} diverged.")
    return run, [Seed(int(arrays["seeds"][r]), r, run.id, arrays["initial"][r], arrays["final"][r],
                      [int(i) for i in arrays["ids"][r]], None) for r in np.flatnonzero(ok)]


def read_arrays(reader, run) -> dict[str, np.ndarray]:
    """seeds.npz of a lean parent, checked against its sha256 tag; one sentence when it was never logged."""
    if layout.SHA256_PREFIX + ARTIFACT not in run.tags:
        kept = layout._outcome_file_note(run.id)
        raise AmreproError(f"run {run.id} is {layout._state(run) or 'finished'} and its seeds were never logged, "
                           f"so there is nothing to read{'; ' + kept if kept else ''}.")
    with np.load(io.BytesIO(reader.artifact(run, ARTIFACT)), allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


# --- figures on demand --------------------------------------------------------------------------------------
def log_figures(ctx, reader, run) -> list[str]:
    """Draw a lean target's figures from its artifacts and log them into it, as the seeds layout does (one upload;
    one that cannot be drawn is a warning and a tag); the paths."""
    arrays = read_arrays(reader, run)
    summary, stats = layout.drawable(reader, run)
    ok = arrays["diverged_at"] < 0  # [runs]
    makers = figures.figure_makers(arrays["loss"][:, ok], arrays["activation"][:, ok],
                                   [int(s) for s in arrays["seeds"][ok]],
                                   [t for t, keep in zip(summary["tokens"], ok) if keep], arrays["ids"][ok],
                                   arrays["final_activation"][ok], arrays["decoded_activation"][ok],
                                   hubs=stats["nulls"]["decoded_starts"])
    layout.log_figures(ctx, run.id, makers)
    ctx.log(run.id, tags={FIGURES_TAG: ", ".join(makers)})
    return list(makers)


def flagged(columns: dict[str, list]) -> list[str]:
    """Parent run ids of the FINISHED targets of a sweep table with a claim that seeds agree above chance (the
    verdict's reproducibility claims, what the sweep's "any above chance" counts)."""
    rows = range(len(columns["target"]))
    return [columns["parent_run_id"][i] for i in rows if columns["status"][i] == "FINISHED"
            and any(columns[stat.claim][i] == 1.0 for stat in REPRODUCIBILITY)]


def log_run(ctx, parent: str, experiment_id: str, outcome, frozen: bytes, kind: str, resume: bool = False) -> None:
    """`amrepro run` (and `amrepro log` of its outcome file) in either layout: lean, log_target; seeds,
    layout.log_outcome (resume: see there). No result (every run diverged) is NoResult, once all is logged."""
    if kind != "lean":
        return layout.log_outcome(ctx, parent, experiment_id, outcome, frozen, resume)
    log_target(ctx, parent, outcome, frozen)
    if outcome.summary["statistics"] is None:
        raise NoResult(f"all {outcome.config.runs} runs diverged ({outcome.diverged[0]}), so there is nothing to "
                       "compare; lower --lr or --l2. The run is marked FAILED.")
