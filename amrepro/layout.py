"""The MLflow layout: every name amrepro writes and reads, the writers of its runs, and the rules that read them
back. Users' scripts depend on these names: they never change.

- top run of `amrepro run` (the one `mlflow run` created, via MLFLOW_RUN_ID, or a new one): every hyperparameter
  as a param; tags env.*, model.*, the verdict and the description; the headline metrics and each seed's per-epoch
  curves (parent_metrics.py; every statistic, exact, is in summary.json); summary.json, token_grid.json, the pip
  freeze and the figures;
- one seed run per seed under it (tag mlflow.parentRunId, named seed-N): params incl. its own seed, run_index
  and batch_seed, per-epoch metrics loss/total and act/target (step = epoch), act/final, act/decoded, loss/final,
  artifacts embeddings/initial.npy, embeddings/final.npy, tokens.json, each with a sha256/<path> tag;
- `amrepro sweep`: a sweep run (params: every hyperparameter but the target, plus `targets`; the table
  sweep_table.json, metrics sweep/*, the figure sweep_map.png), under it one parent per target as above, tagged
  amrepro.sweep = <sweep run id>, amrepro.target = <target name> and amrepro.batch = its batch, with seed runs;
- `amrepro sweep --methods a,b`: a top run (amrepro.kind = study) with one sweep run per method under it, each as
  above, and the study table (STUDY_* below);
- `amrepro compare`: a top run tagged amrepro.compare, one parent per method under it (compare.py);
- `amrepro reproduce`: a run tagged amrepro.reproduces = the run it re-ran, its description linking that run's
  parent; not nested (before, it was nested under that parent: such runs still read as reproductions).

The names, their writers and their readers stay in one file, so that a name changes in one place.
"""

from __future__ import annotations

import hashlib
import io
import json
import re

import numpy as np

from . import dashboard, figures, metrics, outcome_file, parent_metrics, report, signals
from .config import AmreproError, Config
from .errors import NoResult
from .headline import headline
from .printable import token_repr
from .specificity import specificity_words
from .targets import Target
from .tracking import HOST_TAG, PID_TAG, owner_alive, refuse_live  # process tags: amrepro.host, amrepro.pid

# --- names ------------------------------------------------------------------------------------------------
TAG_LIMIT = 5000  # characters MLflow keeps of a tag value
PARENT_TAG, RUN_NAME_TAG = "mlflow.parentRunId", "mlflow.runName"
NOTE_TAG, COLOR_TAG = "mlflow.note.content", "mlflow.runColor"  # the run page's description; a run's chart colour
ERROR_TAG, VERDICT_TAG, TOKENS_TAG, SPECIFICITY_TAG = "error", "verdict", "tokens", "specificity"
SHA256_PREFIX = "sha256/"  # sha256/<artifact path>: the artifact's checksum, checked when it is read back
SWEEP_TAG, TARGET_TAG = "amrepro.sweep", "amrepro.target"  # on target parents: the sweep run id, the target name
BATCH_TAG = "amrepro.batch"  # on target parents: the targets optimized in the same batch (batch_tag)
KIND_TAG = "amrepro.kind"  # "sweep" on a sweep run
WORKERS_TAG, RAY_ADDRESS_TAG = "amrepro.workers", "amrepro.ray_address"
COMPARE_TAG = "amrepro.compare"  # on a compare's top run: its methods
REPRODUCES_TAG, REPRODUCTION_VERDICT_TAG = "amrepro.reproduces", "amrepro.verdict"
LOGGED_FROM_TAG = "amrepro.logged_from"  # a parent `amrepro log` made anew: the parent id the outcome file names
FIGURES_FAILED_TAG = "amrepro.figures_failed"  # on a run: the figures that could not be drawn, and why
RUN_INDEX, BATCH_SEED, SEED = "run_index", "batch_seed", "seed"  # seed-run params
TARGET_NAME, RUNS = "target_name", "runs"  # parent params that every `amrepro run` parent has
WEIGHTS_TAG = "model.weights_sha256"
INITIAL, FINAL, TOKENS = "embeddings/initial.npy", "embeddings/final.npy", "tokens.json"  # seed-run artifacts
SUMMARY, PIP_FREEZE, TOKEN_GRID = "summary.json", "environment/pip-freeze.txt", "token_grid.json"
DASHBOARD = "dashboard.html"  # a target parent's page (dashboard.render); a compare's or sweep's index of them
HEADLINE_TAG = "amrepro.headline"  # on target parents: the verdict in one line (headline.headline)
UNSTABLE_TAG = "unstable"  # on a seed run whose loss spiked (spikes.SPIKE_RULE): where and how much
SWEEP_TABLE, SWEEP_MAP, REPRODUCTION = "sweep_table.json", "sweep_map.png", "reproduction.json"
# the study of a sweep (study.py): on each sweep run study.json, study_targets.json, metrics study/* and the tag
# `study`; on the top run of `amrepro sweep --methods` (tagged amrepro.kind = study, amrepro.methods) study.json,
# the table study_table.json (one row per method), the figure study.png and metrics study/<method>/<column>
STUDY_JSON, STUDY_TARGETS, STUDY_TABLE, STUDY_FIGURE = "study.json", "study_targets.json", "study_table.json", "study.png"
STUDY_TAG, METHODS_TAG = "study", "amrepro.methods"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array))
    return buffer.getvalue()


def json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=2, ensure_ascii=False).encode()


def run_name(config: Config) -> str:
    """'{model} {target} x{runs}': what a parent is, readable in the MLflow runs table."""
    return f"{report.model_label(config.model)} {config.target_name} x{config.runs}"


def batch_tag(targets: list) -> str:
    """The targets of one batch, recorded on each of its target parents so that `amrepro reproduce` can re-run the
    same batch (a batch of other shape rounds differently): 'blocks.B.SITE:i,j,k' (one site per batch)."""
    return f"{targets[0].prefix}:" + ",".join(str(t.index) for t in targets)


def batch_targets(tag: str) -> list:
    """The targets of a batch_tag, in batch order."""
    site, indices = tag.rsplit(":", 1)
    return [Target.from_prefix(site, int(i)) for i in indices.split(",")]


# --- writers ----------------------------------------------------------------------------------------------
def log_outcome(ctx, parent: str, experiment_id: str, outcome, frozen: bytes, resume: bool = False) -> None:
    """Log every seed run, then the parent, from the outcome saved in ctx.outcome_path (removed once all is
    logged), with a progress bar. resume: keep the children an interrupted logging finished, replace the others."""
    config, path = outcome.config, ctx.outcome_path
    done = set()
    if resume:
        for child in children(ctx.store, parent, experiment_id):
            index = child.params.get(RUN_INDEX)
            complete = child.status == "FINISHED" or (
                child.status == "FAILED" and child.tags.get(ERROR_TAG, "").startswith("diverged"))
            if complete and index is not None and int(index) not in done:
                done.add(int(index))
            else:  # half-logged by the interrupted attempt: replaced by a complete one below
                ctx.store.delete(child.id)
    count = {"logged": len(done)}

    def progress() -> str:
        if path is None:  # the outcome file could not be written (Context.keep)
            return (f"logging is in progress: {count['logged']} of {config.runs} runs logged; the results are in no "
                    "outcome file, so stopping now loses the rest. Press Ctrl-C again to stop anyway.")
        return (f"logging is in progress: {count['logged']} of {config.runs} runs logged; every result is kept in "
                f"{path}. Press Ctrl-C again to stop (`amrepro log {path}` logs the rest later).")

    with signals.logging_phase(progress), report.logging_progress(config.runs, len(done)) as advance:
        def logged_one() -> None:
            count["logged"] += 1
            advance()

        log_runs(ctx, parent, experiment_id, outcome, frozen, skip=done, on_run=logged_one)
    if outcome.summary["statistics"] is None:
        raise NoResult(f"all {config.runs} runs diverged ({outcome.diverged[0]}), so there is nothing to "
                       "compare; lower --lr or --l2. The runs are marked FAILED.")


def log_runs(ctx, parent: str, experiment_id: str, outcome, frozen: bytes, skip=(), on_run=lambda: None) -> None:
    """Every seed run (but the run indices in skip), then the parent, and its end (FAILED when every run
    diverged); its outcome file goes. on_run() after each seed run."""
    for r in range(outcome.config.runs):
        if r not in skip:
            log_seed_run(ctx, parent, experiment_id, outcome, r)
            on_run()
    files, tags = parent_record(outcome, frozen)
    stats = outcome.summary["statistics"]
    with ctx.batched(parent):  # everything of the parent but its end: one log_batch
        # the headline figures, and the seeds' curves that MLflow's chart view shows first (sections sort by name:
        # act/target, loss/total before null/..., pvalue, runs, stats), within the lean layout's row budget
        ctx.log(parent, tags=tags, metrics=parent_metrics.metric_rows(outcome, parent_metrics.ROW_BUDGET))
        ctx.log_artifacts(parent, files)
        if stats is not None:
            ctx.store.log_table(parent, report.token_columns(outcome), TOKEN_GRID)
        if stats is not None and outcome.config.figures:  # --figures false: `amrepro figures RUN_ID` draws them
            result, ok = outcome.result, outcome.ok
            log_figures(ctx, parent, figures.figure_makers(
                result.loss.numpy()[:, ok], result.activation.numpy()[:, ok],
                [s for s, keep in zip(result.seeds, ok) if keep], [t for t, keep in zip(outcome.tokens, ok) if keep],
                outcome.ids[ok], result.final_activation.numpy()[ok], outcome.decoded_activation[ok],
                hubs=stats["nulls"]["decoded_starts"]))
    end_parent(ctx, parent, outcome)


def end_parent(ctx, parent: str, outcome) -> None:
    """FAILED when every run diverged; its outcome file goes."""
    with signals.shielded():  # an ended parent has no outcome file left, whenever a Ctrl-C comes
        ctx.end(parent, "FAILED" if outcome.summary["statistics"] is None else "FINISHED")
        ctx.logged(parent)


def parent_record(outcome, frozen: bytes) -> tuple[dict[str, bytes], dict[str, str]]:
    """The artifacts and tags of a target parent in either layout (the lean one adds its seeds.npz and seed
    table; the seeds layout its token grid and figures)."""
    from . import features  # imports torch: late

    s = outcome.summary
    files = {SUMMARY: json_bytes(s), PIP_FREEZE: frozen, DASHBOARD: dashboard.page(outcome, run_name(outcome.config)),
             **features.file_artifacts(outcome.target)}  # a direction's .npy, a small SAE
    tags = {**features.target_tags(outcome.target),  # a feature: what it reads, its file's sha256
            HEADLINE_TAG: headline(s), **parent_metrics.table_row(outcome)}  # the sweep's index; its table's row
    if s["statistics"] is None:  # every run diverged: no statistic exists, and none is logged
        tags.update({VERDICT_TAG: f"no result: all {len(outcome.diverged)} runs diverged",
                     ERROR_TAG: f"all {outcome.config.runs} runs diverged"})
        return files, tags
    # the run page's description, cut at TAG_LIMIT characters by report.markdown_summary (summary.json: all)
    tags.update({VERDICT_TAG: s["statistics"]["verdict"][:TAG_LIMIT], NOTE_TAG: report.markdown_summary(outcome)})
    if outcome.specificity is not None:  # --controls (its p-values are headline metrics, the rest in summary.json)
        tags[SPECIFICITY_TAG] = specificity_words(outcome.specificity)[:TAG_LIMIT]
    return files, tags


def log_seed_run(ctx, parent: str, experiment_id: str, outcome, r: int) -> None:
    """Run r of the outcome as a seed run under parent: one create_run, one artifact upload, one log_batch, one
    set_terminated. A diverged run says why and ends FAILED: divergence is not a result."""
    from matplotlib.colors import to_hex

    config, result, why = outcome.config, outcome.result, outcome.diverged.get(r)
    child = ctx.start_child(parent, f"seed-{config.seeds[r]}", {}, experiment_id)
    files = {INITIAL: npy_bytes(result.initial[r].numpy().astype(np.float32)),
             FINAL: npy_bytes(result.final[r].numpy().astype(np.float32))}
    stop = int(result.diverged_at[r]) if why is not None else None  # a diverged run: its history up to then
    history = {"loss/total": result.loss[:stop, r].numpy(), "act/target": result.activation[:stop, r].numpy()}
    with ctx.batched(child):  # params, tags and metrics: one log_batch
        # every hyperparameter, with this run's own seed; run_index and batch_seed locate it in its batch
        ctx.log(child, params={**config.to_params(), SEED: str(config.seed + r), RUN_INDEX: str(r),
                               BATCH_SEED: str(config.seed)})
        if why is not None:  # NaN "decodes" to nothing meaningful
            ctx.log_metrics(child, scalars={"diverged/epoch": stop}, history=history)
            ctx.log(child, tags={ERROR_TAG: f"diverged: {why}"})
        else:
            scalars = {"act/final": float(result.final_activation[r]),
                       "act/decoded": float(outcome.decoded_activation[r]), "loss/final": float(result.loss[-1, r]),
                       # statistics hold the finite runs only: run r is their entry number ok[:r].sum()
                       **metrics.child_metrics(outcome.summary["statistics"], int(outcome.ok[:r].sum()))}
            # rounded for the runs table (exact: the parent's summary.json; loss/final: loss/total's last step)
            history.update({key: values[:, r].numpy() for key, values in result.history.items()})
            ctx.log_metrics(child, scalars={k: parent_metrics.shown(v) for k, v in scalars.items()}, history=history)
            files[TOKENS] = json_bytes({"ids": [int(i) for i in outcome.ids[r]], "tokens": outcome.tokens[r]})
            # the tokens as a column of the runs table ('\ufffd' with its id); the seed's colour of the figures
            readable = (token_repr(t, i) for t, i in zip(outcome.tokens[r], outcome.ids[r]))
            tags = {TOKENS_TAG: " | ".join(readable), COLOR_TAG: to_hex(figures.seed_colors(len(result.seeds))[r])}
            spike = (outcome.summary.get("loss_spikes") or [None] * (r + 1))[r]
            if spike is not None:  # the seed row says it
                tags[UNSTABLE_TAG] = f"loss spike at epoch {spike['epoch']} (+{spike['share']:.0%} of the loss range)"
            ctx.log(child, tags=tags)
        ctx.log_artifacts(child, files)
    ctx.end(child, "FAILED" if why is not None else "FINISHED")


def log_figures(ctx, run_id: str, makers: dict) -> None:
    """Each figure rendered on its own and logged; one that cannot be drawn is a warning line naming it and a
    tag on the run, never an error: the run's statistics, tables and seeds are logged all the same."""
    rendered, failed = figures.render(makers)
    if rendered:
        ctx.log_artifacts(run_id, rendered)
    if failed:
        ctx.log(run_id, tags={FIGURES_FAILED_TAG: "; ".join(f"{p}: {why}" for p, why in failed.items())[:TAG_LIMIT]})
        for path, why in failed.items():
            report.errors.print(f"warning: the figure {path} of run {run_id} could not be drawn ({why}); "
                                "everything else is logged.", soft_wrap=True, markup=False)


def figure_makers(reader, run_id: str) -> dict:
    """The figures of a seeds-layout target parent, as the run drew them (diverged runs left out), from each
    finished seed run's per-epoch history and tokens.json and the parent's summary.json."""
    parent, seeds = reader.family(run_id)
    summary, stats = drawable(reader, parent)
    histories = {key: np.array([reader.store.history(c.id, key) for c in seeds]).T  # [epochs, runs]
                 for key in ("loss/total", "act/target")}
    grids = [reader.json(c, TOKENS) for c in seeds]
    # the exact activations are summary.json's per_run lists (the seed runs' act/* metrics are rounded), which
    # hold the finite runs only: run r is their entry r minus the runs before it that diverged
    diverged = [d["run_index"] for d in summary.get("diverged") or []]
    entries = [int(c.params[RUN_INDEX]) - sum(d < int(c.params[RUN_INDEX]) for d in diverged) for c in seeds]
    return figures.figure_makers(histories["loss/total"], histories["act/target"], [int(c.params[SEED]) for c in seeds],
                                 [g["tokens"] for g in grids], np.array([g["ids"] for g in grids]),  # [runs, pos]
                                 np.array(stats["final_activation"]["per_run"])[entries],
                                 np.array(stats["decoded_activation"]["per_run"])[entries],
                                 hubs=stats["nulls"]["decoded_starts"])


def drawable(reader, run) -> tuple[dict, dict]:
    """A target parent's summary.json and its statistics; one sentence when it has none to draw."""
    summary = reader.json(run, SUMMARY)
    if summary.get("statistics") is None:
        raise AmreproError(f"run {run.id} has no result (all its runs diverged): there is nothing to draw.")
    return summary, summary["statistics"]


# --- queries ----------------------------------------------------------------------------------------------
def children(store, parent_id: str, experiment_id: str) -> list:
    """Every live run nested under parent_id (seed runs; a compare's method runs)."""
    return store.search([experiment_id], f"tags.{PARENT_TAG} = '{parent_id}'")


def sweep_parents(store, sweep_id: str, experiment_id: str) -> list:
    """Every live (not deleted) target parent of a sweep: how a worker finds a target before creating it."""
    return store.search([experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep_id}'")


def discard(store, run, why: str) -> None:
    """A target parent (and its seed runs) that a dead worker or an interrupted sweep left unfinished: ended
    KILLED with the reason, then deleted, so the target is redone by one new parent, never counted twice.
    Never one whose process is alive on this host (a sweep still running): refused in one sentence."""
    refuse_live([run], f"redoing its target {run.tags.get(TARGET_TAG)}", force=True)
    for child in children(store, run.id, run.experiment_id):
        if child.status == "RUNNING":
            store.end(child.id, "KILLED")
        store.delete(child.id)
    store.set_tag(run.id, ERROR_TAG, why[:TAG_LIMIT])
    # the target is redone (bit-identically): an outcome file of this parent would log a second parent of it
    outcome_file.path_for(run.id).unlink(missing_ok=True)
    if run.status == "RUNNING":
        store.end(run.id, "KILLED")
    store.delete(run.id)


# --- reading runs back (decode, reproduce) -----------------------------------------------------------------
class RunReader:
    """Reads amrepro runs back for `decode` and `reproduce`, refusing tampered or missing artifacts."""

    def __init__(self, store):
        self.store, self.uri = store, store.uri
        self.note: str | None = None

    def run(self, run_id: str):
        if not re.fullmatch(r"[0-9a-zA-Z_-]{1,64}", run_id or ""):
            raise AmreproError(f"'{run_id}' is not a run id (copy it from the MLflow UI, e.g. 2740715b24f34d20...).")
        try:
            return self.store.get(run_id)
        except Exception:  # noqa: BLE001 - MLflow raises its own RESOURCE_DOES_NOT_EXIST exception
            raise AmreproError(f"no run with id {run_id} in the tracking store {self.uri}.") from None

    def family(self, run_id: str):
        """(parent run, child runs) for a run id: the one child asked for, or every logged child of the parent
        asked for, by run_index. A parent that was interrupted or is still running gives its finished children
        and says so in self.note; one with none says what happened instead of "not made by amrepro"."""
        run = self.run(run_id)
        # a comparison, not a seed run (older ones are nested under the parent they re-ran)
        if original := run.tags.get(REPRODUCES_TAG):
            raise AmreproError(f"run {run_id} is a reproduction of run {original} (see its reproduction.json); "
                               f"decode or reproduce {original} itself.")
        if COMPARE_TAG in run.tags:  # its children are method runs, each a parent of seed runs
            raise AmreproError(f"run {run_id} is an `amrepro compare` run of {run.tags[COMPARE_TAG]}; "
                               "decode or reproduce one of its method runs.")
        # a seed run has a run_index; a method run of a compare is nested too, but is itself a parent
        parent_id = run.tags.get(PARENT_TAG) if RUN_INDEX in run.params else None
        parent = self.run(parent_id) if parent_id else run
        if TARGET_NAME not in parent.params:
            raise AmreproError(f"run {run_id} was not made by `amrepro run` (no amrepro params or child runs).")
        seeds = sorted((c for c in children(self.store, parent.id, parent.experiment_id) if RUN_INDEX in c.params),
                       key=lambda c: int(c.params[RUN_INDEX]))
        done = [c for c in seeds if c.status == "FINISHED"]  # diverged (FAILED) runs have no tokens
        n_runs = int(parent.params.get(RUNS, len(seeds)) or 0)
        state = _state(parent)
        kept = _outcome_file_note(parent.id)
        self.note = None
        if parent_id:  # one child asked for
            if run.status != "FINISHED":
                raise AmreproError(f"run {run_id} is {_state(run)}, so it has no tokens to decode"
                                   f"{'; ' + kept if kept else ''}.")
            if state:
                self.note = f"its parent run {parent.id} is {state}."
            return parent, [run]
        diverged = [c for c in seeds if c.status == "FAILED" and c.tags.get(ERROR_TAG, "").startswith("diverged")]
        missing = n_runs - len(done) - len(diverged)  # never logged: the run was interrupted or is still going
        if not done:
            if diverged and not missing:
                raise AmreproError(f"run {run_id} has nothing to decode: all its {n_runs} runs diverged.")
            raise AmreproError(f"run {run_id} is {state or 'without child runs'}"
                               f"{f' and none of its {n_runs} runs was logged' if state else ''}, so there is "
                               f"nothing to decode{'; ' + kept if kept else ''}.")
        if missing or diverged:
            parts = [f"{len(done)} of its {n_runs} runs are used here", diverged and f"{len(diverged)} diverged",
                     missing and f"{missing} were not logged{': ' + kept if kept else ''}"]
            self.note = f"run {run_id} is {state or 'finished'}: " + ", ".join(p for p in parts if p) + "."
        return parent, done

    def artifact(self, run, path: str) -> bytes:
        """The artifact's bytes, checked against the sha256/<path> tag written when it was logged."""
        expected = run.tags.get(SHA256_PREFIX + path)
        if expected is None:
            raise AmreproError(f"run {run.id} has no sha256 tag for {path}: it was not logged by amrepro.")
        try:
            data = self.store.download(run.id, path)
        except Exception:  # noqa: BLE001
            raise AmreproError(f"artifact {path} of run {run.id} is missing from the artifact store.") from None
        if hashlib.sha256(data).hexdigest() != expected:
            raise AmreproError(f"artifact {path} of run {run.id} does not match its sha256 tag: "
                               "it was changed after it was logged, so it cannot be trusted.")
        return data

    def npy(self, run, path: str) -> np.ndarray:
        return np.load(io.BytesIO(self.artifact(run, path)), allow_pickle=False)

    def json(self, run, path: str):
        return json.loads(self.artifact(run, path))


def _state(run) -> str:
    """'' for a FINISHED run, else what happened to it, in words."""
    status, tags = run.status, run.tags
    if status == "FINISHED":
        return ""
    if status == "RUNNING":
        where = f" (pid {tags.get(PID_TAG)} on {tags.get(HOST_TAG)})" if PID_TAG in tags else ""
        if owner_alive(tags) is False:
            return f"marked RUNNING but its process{where} is gone (`amrepro doctor` ends it KILLED)"
        return f"still running{where}"
    if status == "KILLED":
        return f"interrupted (KILLED: {tags.get(ERROR_TAG, 'no reason logged')})"
    return f"{status} ({tags.get(ERROR_TAG, 'no reason logged')})"


def _outcome_file_note(parent_id: str) -> str:
    path = outcome_file.path_for(parent_id)
    return f"its results are kept in {path}: `amrepro log {path}` logs them" if path.exists() else ""
