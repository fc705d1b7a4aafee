"""Many targets in one batch: one forward pass serves targets x seeds rows.

Row block t of the batch is what `amrepro run --target T_t` would optimize on its own: its (1 + K) x runs rows
(the target's runs, then its --controls), from the same seeds. The reader reads a per-row index of ONE site
(readers.py), so the targets of a batch share their block and site; sweep.py groups targets by site.

The rows never interact (Adam is elementwise, the forward is row-wise), so each target's share of the batch is
its single-target run up to the rounding of batched kernels: tests/test_batch.py pins embeddings within 1e-6
and identical tokens. Each share then goes through experiment.outcome_of, the same tokens, statistics and verdict
as a single run.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from . import features, methods, nulls
from .config import AmreproError, Config
from .experiment import Outcome, Prepared, _controls, check_memory, optimize_rows, outcome_of
from .model import LoadedModel
from .readers import check_positions, site_reader, site_width
from .targets import Target, check_target


def prepare_many(config: Config, targets: list[Target], lm: LoadedModel) -> list[Prepared]:
    """One Prepared per target (its Config is config with --target set to it, as `amrepro run --target`
    would have), every check done before anything runs. The targets must share block and site."""
    config.validate()
    if not targets:
        return []
    sites = {t.batch_key for t in targets}  # one site (and one SAE or direction file)
    if len(sites) > 1:
        raise AmreproError(f"one batch reads one site, got {len(sites)}: "
                           f"{', '.join(sorted({t.prefix for t in targets}))}.")
    check_positions(lm, config.n_tokens)
    methods.check(config, lm)  # e.g. epo refuses an encoder
    width = site_width(lm, targets[0])
    preps = []
    for target in targets:
        check_target(target, lm.n_layers, width)
        if target.source:  # its file (a direction, an SAE and its latent) against the site, before anything runs
            features.readout([target], width)
        one = dataclasses.replace(config, target=target.name)
        preps.append(Prepared(one, lm, target, reader=None, controls=_controls(one, lm, target)))
    rows = sum(config.runs * (1 + len(p.controls)) for p in preps)
    check_memory(lm, targets[0], config, rows=rows)
    # the null's pool depends on the vocabulary, runs, n_tokens and seed, not on the target: drawn and decoded
    # once for the batch (for GPT-2 a 20k x 50k matmul, seconds per target otherwise)
    pool = methods.start_pool(config, lm, nulls.pool_size(config.runs, config.n_tokens))
    return [dataclasses.replace(p, start_pool=pool) for p in preps]


def execute_many(preps: list[Prepared], on_epoch: Callable[[int], None] | None = None) -> list[Outcome]:
    """Optimize every target's rows as one batch; one Outcome per target, in the order of preps."""
    if not preps:
        return []
    c, lm = preps[0].config, preps[0].lm
    # row block of target t: its own runs, then each of its controls' runs (experiment.prepare's order)
    blocks = [(p.target, *p.controls) for p in preps]
    index = [t for block in blocks for t in block for _ in range(c.runs)]  # [rows] targets
    seeds = c.seeds * (len(index) // c.runs)  # every target (and control) from the same seeds
    with site_reader(lm, preps[0].target, index=index) as reader:
        result, ids, cosine, decoded = optimize_rows(lm, reader, seeds, c, on_epoch)
    outcomes, row = [], 0
    for prep, block in zip(preps, blocks):
        share = slice(row, row + len(block) * c.runs)
        outcomes.append(outcome_of(prep, result.rows(share), ids[share], cosine[share], decoded[share]))
        row = share.stop
    return outcomes


def batch_tag(preps: list[Prepared]) -> str:
    """The targets of one batch, recorded on each of its target parents so that `amrepro reproduce` can re-run the
    same batch (a batch of other shape rounds differently): 'blocks.B.SITE:i,j,k' (one site per batch)."""
    return f"{preps[0].target.prefix}:" + ",".join(str(p.target.index) for p in preps)


def batch_targets(tag: str) -> list[Target]:
    """The targets of a batch_tag, in batch order."""
    site, indices = tag.rsplit(":", 1)
    return [Target.from_prefix(site, int(i)) for i in indices.split(",")]
