"""The experiment, without side effects: validate -> load -> optimize all seeds -> decode -> statistics.

`prepare` does every check that can fail on user input *before* any MLflow run exists; `execute` is the
science. Both are shared by `amrepro run` and `amrepro reproduce`.

With --controls K, the batch holds (1 + K) x runs rows: the target's runs first, then each control target's runs
from the SAME seeds (specificity.py explains why). Everything but `specificity` describes the target's own rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import metrics
from .config import Config
from .decode import nearest_tokens, token_activation
from .model import LoadedModel, load_model, resolve_device
from .objectives import reference_loss
from .optimize import Result, optimize
from .readers import check_positions, site_reader, site_width
from .seeding import configure_determinism, initial_embeddings
from .specificity import choose_controls, specificity
from .targets import Target, check_target


@dataclass
class Prepared:
    config: Config
    lm: LoadedModel
    target: Target
    reader: object  # a site reader: x [runs, pos, d_model] -> act [runs, pos]
    controls: tuple[Target, ...] = ()  # --controls: the other targets of the site, read by rows runs.. of the batch


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
    specificity: dict | None = None  # --controls: specificity.specificity() plus the controls' tokens


def prepare(config: Config, lm: LoadedModel | None = None) -> Prepared:
    config.validate()
    target = Target.parse(config.target_name)  # a typo in the name fails before the model loads
    device = resolve_device(config.device)
    configure_determinism(device)
    lm = lm or load_model(config.model, device)
    check_positions(lm, config.n_tokens)
    controls = _controls(config, lm, target)
    # row t * runs + r reads target t (0: the user's) from seed r
    index = [t.index for t in (target, *controls) for _ in range(config.runs)] if controls else None
    return Prepared(config, lm, target, site_reader(lm, target, index=index), controls)


def _controls(config: Config, lm: LoadedModel, target: Target) -> tuple[Target, ...]:
    """--controls K: K other indices of the target's site, drawn reproducibly from the seed."""
    if not config.controls:
        return ()
    width = site_width(lm, target)
    check_target(target, lm.n_layers, width)
    picked = choose_controls(target.index, width, config.controls, config.seed, f"blocks.{target.block}.{target.site}")
    return tuple(Target(target.block, target.site, i) for i in picked)


def execute(prep: Prepared, on_epoch: Callable[[int], None] | None = None) -> Outcome:
    c, lm = prep.config, prep.lm
    seeds = c.seeds * (1 + len(prep.controls))  # every target from the same seeds, hence the same starts
    start = initial_embeddings(seeds, c.n_tokens, lm.embedding_std(), lm.d_model)  # [rows, pos, d_model]
    with prep.reader as reader:
        result = optimize(reader, start, reference_loss(c.l2), seeds, c.epochs, c.lr, lm.device, on_epoch)
        ids, cosine = nearest_tokens(result.final, lm.embedding)  # [rows, pos] each
        decoded = token_activation(reader, ids, lm.embedding)  # [rows]
    spec = None
    if prep.controls:
        spec = _specificity(prep, ids, result)
        n, r = c.runs, result  # from here on: the target's own rows only
        result = Result(r.seeds[:n], r.initial[:n], r.final[:n], r.loss[:, :n], r.activation[:, :n],
                        r.final_activation[:n])
        ids, cosine, decoded = ids[:n], cosine[:n], decoded[:n]
    initial_ids, _ = nearest_tokens(result.initial, lm.embedding)  # [runs, pos]: the un-optimized baseline
    tokens = [lm.token_strings(row) for row in ids.tolist()]
    summary = metrics.unique_summary(ids.numpy(), tokens)
    summary.update(target=prep.target.name, model=c.model, seeds=c.seeds, token_ids=ids.tolist(), tokens=tokens,
                   initial_token_ids=initial_ids.tolist())
    summary["statistics"] = metrics.reproducibility_stats(
        ids.numpy(), result.final.numpy(), result.final_activation.numpy(), decoded.numpy(), cosine.numpy(),
        initial_ids.numpy(), vocab_size=lm.embedding.shape[0], seed=c.seed)
    if spec is not None:
        summary["specificity"] = spec
    return Outcome(c, prep.target, result, ids.numpy(), tokens, cosine.numpy(), decoded.numpy(), summary, spec)


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
