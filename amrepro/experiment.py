"""The experiment, without side effects: validate -> load -> optimize all seeds -> decode -> statistics.

`prepare` does every check that can fail on user input *before* any MLflow run exists; `execute` is the
science. Both are shared by `amrepro run` and `amrepro reproduce`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import metrics, nulls
from .config import Config
from .decode import nearest_tokens, token_activation
from .model import LoadedModel, load_model, resolve_device
from .objectives import reference_loss
from .optimize import Result, optimize
from .readers import check_positions, site_reader
from .seeding import configure_determinism, initial_embeddings
from .targets import Target


@dataclass
class Prepared:
    config: Config
    lm: LoadedModel
    target: Target
    reader: object  # a site reader: x [runs, pos, d_model] -> act [runs, pos]


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


def prepare(config: Config, lm: LoadedModel | None = None) -> Prepared:
    config.validate()
    target = Target.parse(config.target_name)  # a typo in the name fails before the model loads
    device = resolve_device(config.device)
    configure_determinism(device)
    lm = lm or load_model(config.model, device)
    check_positions(lm, config.n_tokens)
    return Prepared(config, lm, target, site_reader(lm, target))


def execute(prep: Prepared, on_epoch: Callable[[int], None] | None = None) -> Outcome:
    c, lm = prep.config, prep.lm
    start = initial_embeddings(c.seeds, c.n_tokens, lm.embedding_std(), lm.d_model)  # [runs, pos, d_model]
    with prep.reader as reader:
        result = optimize(reader, start, reference_loss(c.l2), c.seeds, c.epochs, c.lr, lm.device, on_epoch)
        ids, cosine = nearest_tokens(result.final, lm.embedding)  # [runs, pos] each
        decoded = token_activation(reader, ids, lm.embedding)  # [runs]
    initial_ids, _ = nearest_tokens(result.initial, lm.embedding)  # [runs, pos]: the un-optimized baseline
    tokens = [lm.token_strings(row) for row in ids.tolist()]
    summary = metrics.unique_summary(ids.numpy(), tokens)
    summary.update(target=prep.target.name, model=c.model, seeds=c.seeds, token_ids=ids.tolist(), tokens=tokens,
                   initial_token_ids=initial_ids.tolist())
    # the primary null: the method's own start distribution, decoded like the results (nulls.py)
    pool = nulls.decoded_start_pool(lm.embedding, lm.embedding_std(), nulls.pool_size(c.runs, c.n_tokens), c.seed)
    summary["statistics"] = stats = metrics.reproducibility_stats(
        ids.numpy(), result.final.numpy(), result.final_activation.numpy(), decoded.numpy(), cosine.numpy(),
        initial_ids.numpy(), vocab_size=lm.embedding.shape[0], seed=c.seed, start_pool=pool,
        activation=result.activation.numpy())
    for hub in stats["nulls"]["decoded_starts"]["hub_tokens"]:
        hub["token"] = lm.token_strings([hub["id"]])[0]
    return Outcome(c, prep.target, result, ids.numpy(), tokens, cosine.numpy(), decoded.numpy(), summary)
