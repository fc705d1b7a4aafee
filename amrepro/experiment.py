"""The experiment, without side effects: validate -> load -> optimize all seeds -> decode -> statistics.

One path for one target and for many (run, compare, sweep, reproduce): `prepare_many` checks each target once,
probing the one site's width once, before any MLflow run exists; `execute_many` optimizes the targets' rows as ONE
batch. A lone target (`prepare` / `execute`) is a batch of one.

Row block t is what `amrepro run --target T_t` optimizes alone: with --controls K, (1 + K) x runs rows, the
target's runs first, then each control's from the SAME seeds (specificity.py says why). Rows never interact (Adam
is elementwise, the forward row-wise), so a target's share is its run alone up to the rounding of batched kernels
(tests/test_batch.py); only a batch of the same shape is bit-identical, so a sweep's parent records its batch
(layout.BATCH_TAG).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import features, methods, metrics, nulls, spikes
from .config import AmreproError, Config
from .decode import nearest_tokens
from .methods import problem
from .model import LoadedModel, load_model, resolve_device
from .optimize import Result
from .readers import check_positions, site_reader, site_width
from .seeding import configure_determinism
from .specificity import choose_controls, specificity, specificity_words
from .targets import Target, check_target
from .unembed import promoted_logits


@dataclass
class Prepared:
    """One target of a batch, every check done."""
    config: Config  # what `amrepro run` of this target alone would get
    lm: LoadedModel
    target: Target
    controls: tuple[Target, ...]  # --controls: the other targets of the site, read by rows runs.. of its share
    width: int  # the site's width
    per_row: bool  # read with per-row indices even alone: one of prepare_many's batch (a sweep's)
    start_pool: tuple[np.ndarray, str] | None = None  # the primary null's pool and its description (once per batch)


@dataclass
class Outcome:
    config: Config
    target: Target
    result: Result
    ids: np.ndarray  # [runs, pos] decoded token ids
    tokens: list[list[str]]  # [runs][pos] decoded token strings
    cosine: np.ndarray  # [runs, pos] cosine of each final vector to its decoded token
    decoded_activation: np.ndarray  # [runs] mean target activation of the decoded tokens as real input
    summary: dict
    diverged: dict[int, str]  # run index -> why that run is not a result (its loss became non-finite)
    specificity: dict | None = None  # --controls: specificity.specificity() plus the controls' tokens

    @property
    def ok(self) -> np.ndarray:
        """[runs] bool: the runs that stayed finite; statistics are computed on these alone."""
        return np.array([r not in self.diverged for r in range(len(self.result.seeds))])


def prepare(config: Config, lm: LoadedModel | None = None, note: Callable[[str], None] | None = None) -> Prepared:
    """The target of config (--target, or --layer/--dim) alone: a batch of one. note(text), if given, hears what
    loading the model has to say (e.g. a one-off GGUF conversion)."""
    config.validate()
    target = Target.parse(config.target_name)  # a typo in the name fails before the model loads
    return prepare_many(config, [target], lm, note, alone=True)[0]


def prepare_many(config: Config, targets: list[Target], lm: LoadedModel | None = None,
                 note: Callable[[str], None] | None = None, alone: bool = False) -> list[Prepared]:
    """One Prepared per target, its Config config with --target set to it (as `amrepro run --target` would
    have). The targets must share block and site: one batch reads one site. alone: prepare's lone target, whose
    config stays as given (--layer/--dim) and which is read with the single-target kernels."""
    config.validate()
    if not targets:
        return []
    sites = {t.batch_key for t in targets}  # one site (and one SAE or direction file)
    if len(sites) > 1:
        raise AmreproError(f"one batch reads one site, got {len(sites)}: "
                           f"{', '.join(sorted({t.prefix for t in targets}))}.")
    device = setup_device(config)
    lm = lm or load_model(config.model, device, note=note)
    check_positions(lm, config.n_tokens)
    problem.check(config, lm)  # e.g. epo refuses an encoder
    width = site_width(lm, targets[0])  # one probe forward per batch
    preps = []
    for target in targets:
        check_target(target, lm.n_layers, width)
        if target.source:  # its file (a direction, an SAE and its latent) against the site, before anything runs
            features.readout([target], width)
        one = config if alone else dataclasses.replace(config, target=target.name)
        preps.append(Prepared(one, lm, target, _controls(one, target, width), width, per_row=not alone))
    check_memory(lm, targets[0], config, rows=sum(config.runs * (1 + len(p.controls)) for p in preps))
    # the null's pool depends on the vocabulary, runs, n_tokens and seed, not on the target: drawn and decoded
    # once per batch (for GPT-2 a 20k x 50k matmul, seconds per target otherwise)
    pool = problem.start_pool(config, lm, nulls.pool_size(config.runs, config.n_tokens))
    return [dataclasses.replace(prep, start_pool=pool) for prep in preps]


def setup_device(config: Config) -> torch.device:
    """The config's device, made deterministic, with its thread count: what an optimizing process does first."""
    device = resolve_device(config.device)
    configure_determinism(device)
    if config.threads:
        torch.set_num_threads(config.threads)
    return device


def _controls(config: Config, target: Target, width: int) -> tuple[Target, ...]:
    """--controls K: K other indices of the target's site, drawn reproducibly from the seed."""
    if not config.controls:
        return ()
    if target.source:  # other latents of the SAE, or random unit directions (features.py)
        return features.controls(target, config.controls, config.seed, width)
    picked = choose_controls(target.index, width, config.controls, config.seed, f"blocks.{target.block}.{target.site}")
    return tuple(Target(target.block, target.site, i) for i in picked)


def _available_bytes(device: torch.device) -> int | None:
    """Memory free for the run now: MemAvailable of /proc/meminfo (CPU), cudaMemGetInfo (GPU); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def memory_needed(lm: LoadedModel, target: Target, config: Config) -> tuple[int, int]:
    """(bytes per run, bytes per pair of runs): a generous estimate of what --runs costs.

    Per run: the optimized vectors with their gradient, Adam's two moments, start and final copies; the
    activations every block keeps for the backward (attention scores grow with n_tokens^2); the loss history.
    Per pair: the run-to-run statistics are [runs, runs] matrices (agreement also [runs, runs, pos])."""
    c, hf = config, lm.model.config
    pos, d = c.n_tokens, lm.d_model
    heads = getattr(hf, "num_attention_heads", None) or getattr(hf, "n_head", 1)
    d_mlp = getattr(hf, "intermediate_size", None) or getattr(hf, "n_inner", None) or 4 * d
    blocks = target.block + 1
    per_block = (8 * d + 2 * d_mlp) * pos + 3 * heads * pos * pos  # floats kept for the backward, per run
    per_run = 4 * (8 * pos * d + 2 * blocks * per_block + 2 * c.epochs)  # x2: autograd keeps more than the fast path
    per_pair = pos + 6 * 8  # bool agreement per position + a few float64 [runs, runs] matrices
    return per_run, per_pair


def check_memory(lm: LoadedModel, target: Target, config: Config, rows: int) -> None:
    """Refuse a --runs that cannot fit, with the largest one that would, instead of failing hours later.
    rows: the optimized rows, (1 + K) x runs with --controls K."""
    available = _available_bytes(lm.device)
    if available is None:
        return
    per_run, per_pair = memory_needed(lm, target, config)
    budget = 0.8 * available  # leave room for the store, the figures and the rest of the machine
    per_run *= rows / config.runs  # each run brings its controls' rows along
    need = config.runs * per_run + config.runs**2 * per_pair
    if need <= budget:
        return
    # largest r with r * per_run + r^2 * per_pair <= budget
    fits = int((-per_run + (per_run**2 + 4 * per_pair * budget) ** 0.5) / (2 * per_pair))
    raise AmreproError(f"--runs {config.runs} needs about {need / 2**30:.1f} GiB on {lm.device.type} "
                       f"(optimization state and run-to-run statistics), but only {available / 2**30:.1f} GiB is "
                       f"available; at most about {max(fits, 1)} runs fit here.")


def execute(prep: Prepared, on_epoch: Callable[[int], None] | None = None) -> Outcome:
    return execute_many([prep], on_epoch)[0]


def execute_many(preps: list[Prepared], on_epoch: Callable[[int], None] | None = None) -> list[Outcome]:
    """One Outcome per target, in the order of preps."""
    if not preps:
        return []
    c, lm = preps[0].config, preps[0].lm
    blocks = [(p.target, *p.controls) for p in preps]  # row block of target t: its runs, then its controls'
    seeds = c.seeds * sum(len(block) for block in blocks)  # every target (and control) from the same seeds
    with batch_reader(preps) as reader:
        result, ids, cosine, decoded = optimize_rows(lm, reader, seeds, c, on_epoch)
    outcomes, row = [], 0
    for prep, block in zip(preps, blocks):
        share = slice(row, row + len(block) * c.runs)
        outcomes.append(outcome_of(prep, result.rows(share), ids[share], cosine[share], decoded[share]))
        row = share.stop
    return outcomes


def batch_reader(preps: list[Prepared]):
    """The reader of a batch's rows. `amrepro run` of a target without controls reads its index in every row
    with the single-target kernels; every other batch (controls, a sweep's batch, even of one target) reads
    per-row indices, which round differently on some sites: each keeps the reads its logged runs were made with."""
    index = [t for p in preps for t in (p.target, *p.controls) for _ in range(p.config.runs)]  # [rows] targets
    per_row = preps[0].per_row or len(set(index)) > 1
    return site_reader(preps[0].lm, preps[0].target, index=index if per_row else None, width=preps[0].width)


def optimize_rows(lm: LoadedModel, reader, seeds: list[int], config: Config,
                  on_epoch: Callable[[int], None] | None = None):
    """(result, ids [rows, pos], cosine [rows, pos], decoded activation [rows]) of config.method on one batch,
    one row per seed, through the entered reader (which may read one target per row: a batch of targets, --controls)."""
    result = methods.get(config.method)(problem.Problem(lm, reader, seeds, config), on_epoch)
    if result.ids is None:  # adam: continuous vectors, decoded to their nearest tokens
        ids, cosine = nearest_tokens(result.final, lm.embedding)  # [rows, pos] each
    else:  # pez, gcg, epo: real tokens already; final holds exactly their embedding rows
        ids, cosine = result.ids, torch.ones(result.ids.shape)  # [rows, pos] each
    E = lm.embedding
    with torch.no_grad():  # the activation at each position, for the dashboard's token colours
        tokens_at = reader(E[ids.to(E.device)])  # [rows, pos]: the decoded tokens fed back as real input
        final_at = tokens_at if result.ids is not None else reader(result.final.to(E.device))  # [rows, pos]
    decoded = tokens_at.mean(dim=1).cpu()  # [rows]: the mean activation of the decoded tokens
    result.positions = {"tokens": tokens_at.cpu(), "final": final_at.cpu()}
    return result, ids, cosine, decoded


def outcome_of(prep: Prepared, result: Result, ids: torch.Tensor, cosine: torch.Tensor,
               decoded: torch.Tensor) -> Outcome:
    """Tokens, statistics and verdict of prep's rows ((1 + K) x runs), once optimized and decoded."""
    c, lm = prep.config, prep.lm
    spec = None
    if prep.controls:
        # NaN rows would poison every pairwise similarity: specificity needs every row finite
        spec = _specificity(prep, ids, result) if (result.diverged_at < 0).all() else None
        n = c.runs  # from here on: the target's own rows only
        result, ids, cosine, decoded = result.rows(slice(n)), ids[:n], cosine[:n], decoded[:n]
    initial_ids, _ = nearest_tokens(result.initial, lm.embedding)  # [runs, pos]: the un-optimized baseline
    tokens = [lm.token_strings(row) for row in ids.tolist()]
    # A diverged run (NaN/inf) "decodes" to whatever argmax makes of NaN: it is left out of every statistic.
    diverged = {r: why for r in range(c.runs) if (why := result.divergence(r)) is not None}
    ok = np.array([r not in diverged for r in range(c.runs)])  # [runs]
    kept = [t for t, keep in zip(tokens, ok) if keep]
    summary = metrics.unique_summary(ids.numpy()[ok], kept) if ok.any() else {}
    summary.update(target=prep.target.name, model=c.model, seeds=c.seeds, token_ids=ids.tolist(), tokens=tokens,
                   initial_token_ids=initial_ids.tolist(), n_runs_ok=int(ok.sum()),
                   diverged=[{"seed": c.seeds[r], "run_index": r, "reason": why} for r, why in diverged.items()],
                   method=c.method,
                   loss_spikes=spikes.loss_spikes(result.loss.numpy()),  # [runs]: None, or the run's worst spike
                   promoted_logits=promoted_logits(lm, prep.target))  # None unless a causal LM's residual direction
    if result.frontier is not None:  # epo: each run's final population, activation against fluency
        summary["frontier"] = result.frontier
    stats = _statistics(prep, ids, result, decoded, cosine, initial_ids, ok) if ok.any() else None
    summary["statistics"] = stats
    if stats is not None:
        if diverged:  # the verdict never hides runs it left out
            stats["verdict"] = (f"{len(diverged)} of {c.runs} runs diverged and are left out; statistics "
                                f"of the other {int(ok.sum())}. " + stats["verdict"])
        for words in (spikes.spike_words(summary["loss_spikes"], c.seeds), spec and specificity_words(spec)):
            if words:
                stats["verdict"] += " " + words
    if prep.controls:
        summary["specificity"] = spec or {"controls": [t.name for t in prep.controls],
                                          "not_computed": "a target or control run diverged"}
    return Outcome(c, prep.target, result, ids.numpy(), tokens, cosine.numpy(), decoded.numpy(), summary, diverged,
                   spec)


def _statistics(prep: Prepared, ids, result: Result, decoded, cosine, initial_ids, ok: np.ndarray) -> dict:
    """metrics.reproducibility_stats of the finite runs (ok [runs]), against the primary null (nulls.py)."""
    c, lm = prep.config, prep.lm
    pool, described = prep.start_pool
    stats = metrics.reproducibility_stats(
        ids.numpy()[ok], result.final.numpy()[ok], result.final_activation.numpy()[ok], decoded.numpy()[ok],
        cosine.numpy()[ok], initial_ids.numpy()[ok], vocab_size=lm.embedding.shape[0], seed=c.seed,
        start_pool=pool, activation=result.activation.numpy()[:, ok], start_name=methods.start_name(c.method))
    stats["nulls"]["decoded_starts"]["description"] = described + "; each draw distinct pool entries"
    for hub in stats["nulls"]["decoded_starts"]["hub_tokens"]:
        hub["token"] = lm.token_strings([hub["id"]])[0]
    return stats


def _specificity(prep: Prepared, ids: torch.Tensor, result: Result) -> dict:
    """specificity() of all T*runs rows (ids [T*runs, pos]), plus the controls' tokens and final activations."""
    T, runs, final = 1 + len(prep.controls), prep.config.runs, result.final  # final [T*runs, pos, d_model]
    spec = specificity(ids.view(T, runs, -1).numpy(), final.view(T, runs, *final.shape[1:]).numpy(),
                       [t.name for t in (prep.target, *prep.controls)], seed=prep.config.seed)
    spec["controls"] = [t.name for t in prep.controls]
    spec["control_token_ids"] = ids[runs:].view(T - 1, runs, -1).tolist()  # [K][runs][pos]
    spec["control_tokens"] = [[prep.lm.token_strings(row) for row in rows] for rows in spec["control_token_ids"]]
    spec["control_final_activation"] = result.final_activation[runs:].view(T - 1, runs).tolist()  # [K][runs]
    return spec
