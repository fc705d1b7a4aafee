"""`amrepro sweep`: --targets SPEC -> chunks of one site -> Worker.run_chunk on Ray workers (or in this process),
which log each target straight to the tracking store as `amrepro run` does; then the sweep run's table and summary.

Workers and retries. A Worker loads the model once and then takes chunks. Ray restarts a worker whose process
died and retries its chunk there (max_restarts / max_task_retries). A chunk is owned by one worker at a time, so
a target parent that is not FINISHED when a chunk starts was left by a dead attempt (or by an interrupted sweep
that is being resumed): it is ended KILLED, deleted (layout.discard) and redone; a FINISHED one is kept and
skipped. Targets are looked up by the tags amrepro.sweep and amrepro.target, never by name or order.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import time
import zlib
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from . import experiment, features, layout, lean, parent_metrics, signals, study
from .config import AmreproError, Config
from .context import Context, environment_tags, saying_what_was_saved
from .model import load_model
from .nulls import binomial_tail
from .stats import ALPHA, CLAIMS, REPRODUCIBILITY
from .targets import ALL_SITES, Target, check_target
from .tracking import short

MAX_RETRIES = 3  # Ray restarts of a dead worker, and retries of the chunk it held
KILL_WAIT_SECONDS = 30  # after Ctrl-C/SIGTERM, how long the killed workers are waited for
CHUNK_MAX = 64  # targets per batch by default: one forward for 64 x runs rows, and little rework after a death
_RANDOM_STREAM = 0x5EE9  # numpy stream of --targets [random:K], apart from the controls' stream
_ITEM = re.compile(r"blocks\.(\d+)\.([a-z_.]+)(@sae:.+)?\[([^\]]*)\]")  # the site's dims, or an SAE's latents


# --- --targets SPEC ---------------------------------------------------------------------------------------
def parse_targets(spec: str, width: Callable[[int, str], int], n_layers: int, seed: int) -> list[Target]:
    """The sweep's targets in order, duplicates dropped, from SPEC (its grammar: cli.sweep's --targets); random:K
    draws from the seed, the site and an SAE's path. width(block, site) is the site's size."""
    items = [item.strip() for item in re.split(r",(?![^\[]*\])", spec) if item.strip()]
    if not items:
        raise AmreproError("--targets is empty: give e.g. 'blocks.8.hook_resid_pre[0:768]'.")
    targets: list[Target] = []
    for item in items:
        if item.endswith(".npy"):  # a direction: one target, its file checked against the site
            direction = Target.parse(item)
            check_target(direction, n_layers, 1)
            features.readout([direction], width(direction.block, direction.site))
            targets.append(direction)
            continue
        match = _ITEM.fullmatch(item)
        if not match or match.group(2) not in ALL_SITES:
            raise AmreproError(f"cannot read '{item}' of --targets: expected blocks.B.SITE[SEL] with SITE one of "
                               f"{', '.join(ALL_SITES)} and SEL an index i, a range a:b or random:K, e.g. "
                               "blocks.8.hook_resid_pre[0:768] or blocks.6.mlp.hook_post[random:64].")
        block, site, sel = int(match.group(1)), match.group(2), match.group(4).replace(" ", "")
        source = (match.group(3) or "@")[1:]  # "" (the site's dimensions) or "sae:PATH"
        check_target(Target(block, site, 0), n_layers, 1)  # the block's range, before asking for a width
        n = width(block, site)
        if source:  # an SAE's latents: the SAE must read this site; SEL picks among its d_sae latents
            n = features.sae_of(Target(block, site, 0, source), n).d_sae
        if re.fullmatch(r"\d+", sel):  # a range or a draw is within the site by construction
            indices = [int(sel)]
            check_target(Target(block, site, indices[0]), n_layers, n)
        elif m := re.fullmatch(r"(\d+):(\d+)", sel):
            a, b = int(m.group(1)), int(m.group(2))
            if not 0 <= a < b <= n:
                raise AmreproError(f"range [{sel}] of '{item}' must satisfy 0 <= a < b <= {n} (the site has {n} "
                                   "dimensions; b is excluded).")
            indices = list(range(a, b))
        elif m := re.fullmatch(r"random:(\d+)", sel):
            k = int(m.group(1))
            if not 1 <= k <= n:
                raise AmreproError(f"[random:{k}] of '{item}' must draw 1 to {n} of the site's {n} dimensions.")
            key = [seed, _RANDOM_STREAM, block, zlib.crc32(site.encode())]
            rng = np.random.default_rng(key + ([zlib.crc32(source.encode())] if source else []))
            indices = sorted(int(i) for i in rng.choice(n, k, replace=False))
        else:
            raise AmreproError(f"cannot read [{sel}] of '{item}': use an index i, a range a:b or random:K.")
        targets += [Target(block, site, i, source) for i in indices]
    return list(dict.fromkeys(targets))


def chunks(targets: list[Target], size: int) -> list[list[Target]]:
    """At most size targets of one site (a batch reads one site) per chunk, in the order the sites first appear."""
    by_site: dict[tuple, list[Target]] = {}
    for target in targets:
        by_site.setdefault(target.batch_key, []).append(target)
    return [same[i:i + size] for same in by_site.values() for i in range(0, len(same), size)]


def chunk_size(n_targets: int, workers: int, requested: int) -> int:
    """requested, else enough chunks to keep every worker busy, at most CHUNK_MAX targets each."""
    return requested or max(1, min(CHUNK_MAX, math.ceil(n_targets / max(workers, 1))))


# --- the worker -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """What every worker of a sweep is given (Ray sends it to each actor): the science and where to log it."""
    config: Config
    uri: str
    experiment_id: str
    sweep_id: str
    frozen: bytes  # pip freeze, logged with every target
    layout: str  # what each target logs: "lean" or "seeds" (lean.py, layout.py)


class Worker:
    """Loads the model once, then runs chunks of targets: one batch each, logged target by target."""

    def __init__(self, job: Job, lm=None, keep: bool = False):
        device = experiment.setup_device(job.config)  # determinism and threads, in this process too (workers 0)
        self.job, self.lm = job, lm or load_model(job.config.model, device)
        self.ctx = Context(uri=job.uri)
        self.env = {**environment_tags(self.lm), **({lean.LAYOUT_TAG: "lean"} if job.layout == "lean" else {})}
        # --workers 0 keeps each target's outcome file, as `amrepro run` does (a store that fails: exit 3, then
        # `amrepro log FILE`); a Ray worker keeps none: Ray recomputes a dead worker's chunk
        self.keep = keep

    def run_chunk(self, names: list[str]) -> dict:
        """Optimize and log the chunk's targets without a FINISHED parent: {"study": their study.TargetRuns,
        "seconds": {"science": null pool, optimize, decode, statistics; "tracking": the rest}}."""
        ctx, job, started = self.ctx, self.job, time.perf_counter()
        runs = [r for r in layout.sweep_parents(ctx.store, job.sweep_id, job.experiment_id)
                if r.tags.get(layout.TARGET_TAG) in names]
        # kept: logged by an earlier attempt of this chunk that died later; the other parents are redone
        finished = {r.tags[layout.TARGET_TAG] for r in runs if r.status == "FINISHED"}
        for run in runs:
            if run.tags[layout.TARGET_TAG] not in finished:
                layout.discard(ctx.store, run, f"left {run.status} by a worker that died or a sweep that was "
                               f"interrupted (pid {run.tags.get(layout.PID_TAG)}); the target was redone")
        todo = [Target.parse(name) for name in names if name not in finished]
        before = time.perf_counter()
        preps = experiment.prepare_many(job.config, todo, self.lm)  # science: draws and decodes the null's starts
        science = time.perf_counter() - before
        tags = {**self.env, layout.SWEEP_TAG: job.sweep_id, layout.PARENT_TAG: job.sweep_id,
                layout.BATCH_TAG: layout.batch_tag([p.target for p in preps]) if preps else ""}
        # an exception ends this chunk's open runs FAILED (a dead process leaves them to discard()); with keep, a
        # store that fails after the science is StoreLost naming the kept files
        with saying_what_was_saved(ctx) if self.keep else nullcontext(), ctx:
            parents = [self._start(p.config, {**tags, layout.TARGET_TAG: p.target.name}) for p in preps]
            before = time.perf_counter()
            outcomes = experiment.execute_many(preps)
            science += time.perf_counter() - before
            paths = {}
            for parent, outcome in zip(parents, outcomes) if self.keep else ():  # every outcome file, then the logging
                ctx.keep(outcome, parent, job.experiment_id, outcome.config.to_params(), self.env, job.frozen)
                paths[parent] = ctx.outcome_path
            for parent, outcome in zip(parents, outcomes):
                ctx.outcome_path = paths.get(parent)
                if job.layout == "lean":  # as `amrepro run` logs it; then its outcome file (--workers 0) goes
                    lean.log_target(ctx, parent, outcome, job.frozen, params=outcome.config.to_params())
                else:
                    layout.log_runs(ctx, parent, job.experiment_id, outcome, job.frozen)
        return {"study": [study.record(o) for o in outcomes],
                "seconds": {"science": science, "tracking": time.perf_counter() - started - science}}

    def _start(self, config: Config, tags: dict[str, str]) -> str:
        """A target parent, before its science: lean, one create_run with every tag; seeds, as `amrepro run`."""
        if self.job.layout == "lean":
            return lean.start_target(self.ctx, self.job.experiment_id, layout.run_name(config), tags)
        return self.ctx.start_parent(config.to_params(), tags, run_name=layout.run_name(config),
                                     experiment_id=self.job.experiment_id)


# --- before anything exists: the workers fit, the cluster answers ----------------------------------------
# A Ray worker process with torch, transformers and MLflow imported, before any model: issue 17 measured 16
# actors taking memory from 2.4 to 10.6 GB on the tiny model (~0.5 GiB each); rounded up.
WORKER_PROCESS_BYTES = 600 * 2**20
RAY_PROBE_SECONDS = 5.0  # a cluster address that does not answer a TCP connection within this is refused


def check_workers(lm, targets: list[Target], config: Config, workers: int, chunk: int, cpus: int,
                  local: bool) -> str | None:
    """Before any run (and a local Ray) exists: refuse workers that cannot fit in this machine's memory (each loads
    the model and optimizes chunk x runs rows), or with workers 0 this process's largest batch; a note when the
    workers outnumber the cores. local: no --ray-address (the only case whose memory is known here)."""
    size = chunk_size(len(targets), workers, chunk)
    if not workers:  # the largest batch, which would otherwise be refused inside the first one, after the sweep run
        size = max(len(c) for c in chunks(targets, size))
        try:
            experiment.check_memory(lm, targets[0], config, rows=size * config.runs * (1 + config.controls))
        except AmreproError as error:
            raise AmreproError(f"a batch of {size} targets: {str(error).rstrip('.')}, or fewer targets per batch "
                               f"(--chunk).") from None
        return None
    actors = min(workers, len(chunks(targets, size)))  # run_chunks starts no more actors than there are chunks
    weights = sum(t.numel() * t.element_size() for t in (*lm.model.parameters(), *lm.model.buffers()))
    per_run, per_pair = experiment.memory_needed(lm, targets[0], config)
    rows = config.runs * size  # a batch optimizes every target of the chunk from the same seeds
    per_worker = WORKER_PROCESS_BYTES + weights + rows * per_run + rows * config.runs * per_pair
    available = experiment._available_bytes(lm.device) if local else None
    if available is not None and actors * per_worker > 0.8 * available:
        fits = int(0.8 * available // per_worker)
        raise AmreproError(f"--workers {workers} starts {actors} Ray workers of about {per_worker / 2**30:.1f} GiB "
                           f"each (the model, a batch of {size} targets x {config.runs} runs, the worker process): "
                           f"{actors * per_worker / 2**30:.1f} GiB, but only {available / 2**30:.1f} GiB is "
                           f"available; at most about {max(fits, 1)} workers fit here"
                           + ("." if fits >= 1 else ", or a smaller --chunk or --runs."))
    if actors > cpus:
        return (f"note: {actors} workers on {cpus} cores: they take turns on the cores, so workers beyond {cpus} "
                "add memory, not speed.")
    return None


def start_ray(address: str | None, workers: int, threads: int):
    """Join the cluster at address (or RAY_ADDRESS), else start a local Ray with workers x threads CPUs."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    found = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)/?", (address or "").strip())
    if found:  # host:port (not auto): ray.init would retry an address that does not answer for minutes
        host, port = found.group(1), int(found.group(2))
        try:
            with socket.create_connection((host, port), timeout=RAY_PROBE_SECONDS):
                pass
        except OSError as error:
            why = error.strerror or f"{type(error).__name__}, no answer in {RAY_PROBE_SECONDS:.0f} s"
            raise AmreproError(f"cannot join Ray at {address}: nothing answers at {host}:{port} ({why}); start the "
                               "cluster (`ray start --head`) or correct --ray-address / RAY_ADDRESS.") from None
    import ray

    where = {"address": address} if address else {"num_cpus": workers * threads, "include_dashboard": False}
    try:
        ray.init(**where, logging_level=logging.ERROR, log_to_driver=False)
    except Exception as error:  # noqa: BLE001 - ConnectionError, a bad address, ...
        raise AmreproError(f"cannot start or join Ray{' at ' + address if address else ''}: {short(error)}") from None
    finally:
        # ray.init replaces the SIGTERM handler with its own (a native stack dump, exit 134, every run left
        # RUNNING): amrepro's come back, so SIGTERM and Ctrl-C end the sweep as with --workers 0
        signals.install()
    return ray


def run_chunks(work: list[list[Target]], job: Job, workers: int, lm,
               on_chunk: Callable[[list], None]) -> tuple[list[str], dict[str, float]]:
    """Every chunk, in this process (workers 0) or on Ray actors: a sentence per chunk that failed for good (its
    targets stay for --resume) and the workers' seconds of science and tracking; on_chunk(its TargetRuns) after each."""
    queue = [[t.name for t in chunk] for chunk in work]
    failures: list[str] = []
    seconds = Counter(science=0.0, tracking=0.0)

    def done(out: dict) -> None:
        seconds.update(out["seconds"])
        on_chunk(out["study"])

    if workers == 0:
        worker = Worker(job, lm=lm, keep=True)
        for chunk in queue:
            done(worker.run_chunk(chunk))
        return failures, seconds
    import ray

    # on GPUs, workers share them out (4 workers on 1 GPU: 0.25 each), so one worker's logging overlaps another's
    # optimization; "auto" uses a GPU when the cluster has one, as the worker's own resolve_device would
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    gpus = min(1.0, cluster_gpus / workers) if job.config.device != "cpu" and cluster_gpus else 0
    remote = ray.remote(Worker).options(num_cpus=max(job.config.threads, 1), num_gpus=gpus,
                                        max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES)
    actors = [remote.remote(job) for _ in range(min(workers, len(queue)))]
    pending: dict = {}  # chunk in flight -> (its actor, its names)

    def give(actor) -> None:
        if queue:
            chunk = queue.pop(0)
            pending[actor.run_chunk.remote(chunk)] = (actor, chunk)

    try:
        for actor in actors:  # a chunk to every actor, and the next one whenever it is done
            give(actor)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            actor, chunk = pending.pop(ref)
            try:
                done(ray.get(ref))
            except ray.exceptions.RayActorError as error:  # dead more than MAX_RETRIES times: give its chunk up
                failures.append(f"a worker died {MAX_RETRIES + 1} times on {chunk[0]}..{chunk[-1]}: "
                                f"{_last_line(error)}")
                continue  # the actor is gone for good; the others take the rest of the queue
            except ray.exceptions.RayTaskError as error:
                failures.append(f"{chunk[0]}..{chunk[-1]} failed: {_last_line(error.cause or error)}")
            give(actor)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the workers stop now (killed, never restarted), and are waited
        with signals.ignored():  # for (their chunks fail once they are dead), so that none writes after the
            for actor in actors:  # caller has ended the runs they left open (commands.sweep)
                ray.kill(actor, no_restart=True)
            if pending:
                ray.wait(list(pending), num_returns=len(pending), timeout=KILL_WAIT_SECONDS)
        raise
    finally:
        # every chunk has returned (its logging done) or failed: the workers are killed now. Left to ray.shutdown,
        # a worker only notices that its raylet is gone and exits on its own, seconds later (5-40 s under load),
        # still using CPU after the command has returned. Only our actors: a --ray-address cluster stays up.
        for actor in actors:
            ray.kill(actor, no_restart=True)
    if queue:  # every worker died for good
        failures.append(f"{sum(len(c) for c in queue)} targets were not started: no worker was left")
    return failures, seconds


def _last_line(error: BaseException) -> str:
    """The last line of a worker's error: Ray puts the traceback first."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


# --- the sweep run's table, metrics and map ---------------------------------------------------------------
def table(targets: list[Target], parents: dict[str, object]) -> dict[str, list]:
    """One row per target, in the sweep's order: its parent run and statistics (parent_metrics.read; None where the
    parent has none: not run, all seeds diverged, a single seed, or logged before the statistic existed)."""
    runs = [parents.get(t.name) for t in targets]
    figures = [parent_metrics.read(run) if run else {} for run in runs]
    columns = {"target": [t.name for t in targets], "parent_run_id": [run.id if run else None for run in runs],
               "status": [run.status if run else "NOT RUN" for run in runs]}
    return columns | {name: [None if f.get(key) is None else float(f[key]) for f in figures]
                      for name, key in parent_metrics.TABLE_COLUMNS.items()}  # column -> the parent metric it reads


def summary(columns: dict[str, list]) -> tuple[dict[str, float], str]:
    """sweep/* metrics and one sentence. Each target's claim is the verdict's (p < ALPHA under the method's own
    starts AND at least MIN_EVENTS coincidences), so among targets with no preference at most about ALPHA of them
    pass by chance: the fraction is compared with ALPHA by a one-sided binomial test, never read on its own.
    "any above chance" counts the claims that seeds agree (stats.REPRODUCIBILITY), not the within-run repeats."""
    n_targets = len(columns["target"])
    with_stats = [i for i, v in enumerate(columns["agreement_above_chance"]) if v is not None]
    n = len(with_stats)
    metrics = {"sweep/n_targets": n_targets, "sweep/n_finished": columns["status"].count("FINISHED"),
               "sweep/n_with_statistics": n, "sweep/alpha_per_target": ALPHA}
    above, within = [], []  # the claims whose count chance explains poorly, and the others
    for stat in CLAIMS:
        # a target logged before this claim existed has no flag: it is not counted, for this claim only
        logged = [i for i in with_stats if columns[stat.claim][i] is not None]
        k, m = sum(columns[stat.claim][i] == 1.0 for i in logged), len(logged)
        metrics[f"sweep/n_{stat.claim}"] = k
        if m:
            metrics[f"sweep/frac_{stat.claim}"] = k / m
            p = metrics[f"sweep/pvalue_{stat.claim}"] = binomial_tail(k, m, ALPHA)
            (above if p < ALPHA else within).append(f"{stat.label} {k}/{m} ({k / m:.0%}, p = {p:.2g})")
    any_claim = sum(any(columns[s.claim][i] == 1.0 for s in REPRODUCIBILITY) for i in with_stats)
    metrics["sweep/n_any_above_chance"] = any_claim
    if not n:
        return metrics, f"no target of {n_targets} has statistics yet."
    metrics["sweep/frac_any_above_chance"] = any_claim / n
    # the chance level and the test said once, then each group of claims once
    groups = " ".join(f"{head}: {'; '.join(claims)}." for head, claims in
                      (("More targets than chance explains", above), ("Within chance", within)) if claims)
    return metrics, (f"{n} of {n_targets} targets with statistics; chance alone passes about {ALPHA:.0%} of targets "
                     f"per claim (p: one-sided binomial test against that). {groups}")
