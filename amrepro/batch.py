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

from . import nulls
from .config import AmreproError, Config
from .decode import nearest_tokens, token_activation
from .experiment import Outcome, Prepared, _controls, check_memory, outcome_of
from .model import LoadedModel
from .objectives import reference_loss
from .optimize import optimize
from .readers import check_positions, site_reader, site_width
from .seeding import initial_embeddings
from .targets import Target, check_target


def prepare_many(config: Config, targets: list[Target], lm: LoadedModel) -> list[Prepared]:
    """One Prepared per target (its Config is config with --target set to it, as `amrepro run --target`
    would have), every check done before anything runs. The targets must share block and site."""
    config.validate()
    if not targets:
        return []
    sites = {(t.block, t.site) for t in targets}
    if len(sites) > 1:
        raise AmreproError(f"one batch reads one site, got {len(sites)}: "
                           f"{', '.join(f'blocks.{b}.{s}' for b, s in sorted(sites))}.")
    check_positions(lm, config.n_tokens)
    width = site_width(lm, targets[0])
    preps = []
    for target in targets:
        check_target(target, lm.n_layers, width)
        one = dataclasses.replace(config, target=target.name)
        preps.append(Prepared(one, lm, target, reader=None, controls=_controls(one, lm, target)))
    rows = sum(config.runs * (1 + len(p.controls)) for p in preps)
    check_memory(lm, targets[0], config, rows=rows)
    # the null's pool depends on the vocabulary, runs, n_tokens and seed, not on the target: drawn and decoded
    # once for the batch (for GPT-2 a 20k x 50k matmul, seconds per target otherwise)
    pool = nulls.decoded_start_pool(lm.embedding, lm.embedding_std(), nulls.pool_size(config.runs, config.n_tokens),
                                    config.seed)
    return [dataclasses.replace(p, start_pool=pool) for p in preps]


def execute_many(preps: list[Prepared], on_epoch: Callable[[int], None] | None = None) -> list[Outcome]:
    """Optimize every target's rows as one batch; one Outcome per target, in the order of preps."""
    if not preps:
        return []
    c, lm = preps[0].config, preps[0].lm
    # row block of target t: its own runs, then each of its controls' runs (experiment.prepare's order)
    blocks = [(p.target, *p.controls) for p in preps]
    index = [t.index for block in blocks for t in block for _ in range(c.runs)]  # [rows]
    seeds = c.seeds * (len(index) // c.runs)  # every target (and control) from the same seeds
    start = initial_embeddings(c.seeds, c.n_tokens, lm.embedding_std(), lm.d_model)  # [runs, pos, d_model]
    start = start.repeat(len(index) // c.runs, 1, 1)  # [rows, pos, d_model]: the same starts, drawn once
    with site_reader(lm, preps[0].target, index=index) as reader:
        result = optimize(reader, start, reference_loss(c.l2), seeds, c.epochs, c.lr, lm.device, on_epoch)
        ids, cosine = nearest_tokens(result.final, lm.embedding)  # [rows, pos] each
        decoded = token_activation(reader, ids, lm.embedding)  # [rows]
    outcomes, row = [], 0
    for prep, block in zip(preps, blocks):
        share = slice(row, row + len(block) * c.runs)
        outcomes.append(outcome_of(prep, result.rows(share), ids[share], cosine[share], decoded[share]))
        row = share.stop
    return outcomes
