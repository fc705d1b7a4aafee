"""Optimization methods, one file each, one shape: method(problem, on_step) -> optimize.Result.

- adam.py: the reference. Continuous vectors, Adam, decoded to their nearest tokens afterwards (unchanged).
- pez.py: continuous vectors whose forward runs on their nearest tokens (Wen et al. 2023, "Hard prompts made easy").
- gcg.py: token swaps ranked by the one-hot gradient, a batch of one-swap candidates per step (Zou et al. 2023).
- epo.py: gcg with a population trading activation against fluency (Thompson et al. 2024, `dreamy`).

pez, gcg and epo end in real tokens: Result.ids holds them and their target activation IS the score. Every
random choice (start, candidate sampling) draws from the row's own generator, seeded by the row's seed, so a
run depends on its seed alone and `amrepro reproduce` is bit-identical. candidates.py is the one place that
evaluates token sequences forward-only through the stop-at-block reader, every row's candidates in one batch.

The null of each method is its own start distribution, decoded as its results are (nulls.py): adam's starts are
N(0, std(E)) vectors decoded to their nearest tokens; pez, gcg and epo start from tokens drawn uniformly from the
vocabulary, which "decode" to themselves, so their chance level is uniform random tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..config import AmreproError, Config
from ..model import LoadedModel

OnStep = Callable[[int], None] | None


@dataclass
class Problem:
    """What every method gets: the model, the entered site reader (x [rows, pos, d_model] -> act [rows, pos],
    differentiable; a per-row index reads several targets of one site), one seed per row, the Config."""
    lm: LoadedModel
    reader: object
    seeds: list[int]
    config: Config

    @property
    def rows(self) -> int:
        return len(self.seeds)

    def generators(self) -> list[torch.Generator]:
        """One CPU generator per row, seeded by the row's seed: the row's draws depend on its seed alone."""
        return [torch.Generator(device="cpu").manual_seed(seed) for seed in self.seeds]


def uniform_tokens(generators: list[torch.Generator], n_tokens: int, vocab_size: int) -> torch.Tensor:
    """The discrete methods' starts: n_tokens ids drawn uniformly per row from its own generator. [rows, pos]"""
    return torch.stack([torch.randint(vocab_size, (n_tokens,), generator=g) for g in generators])


class BestTokens:
    """Each run's best token sequence so far and its activation, with the best activation after every step
    (the `act/tokens` history): what pez and gcg return, whatever their current sequence is."""

    def __init__(self, ids: torch.Tensor, act: torch.Tensor, steps: int):
        self.ids, self.act = ids.clone(), act.clone()  # [rows, pos], [rows]
        self.history = torch.empty(steps, len(act))  # [steps, rows]

    def update(self, step: int, ids: torch.Tensor, act: torch.Tensor) -> None:
        better = act > self.act  # [rows]
        self.ids[better], self.act[better] = ids[better], act[better]
        self.history[step] = self.act


def get(name: str):
    """The method function of --method NAME."""
    from . import adam, epo, gcg, pez

    methods = {"adam": adam.run, "pez": pez.run, "gcg": gcg.run, "epo": epo.run}
    if name not in methods:
        raise AmreproError(f"--method must be one of {', '.join(methods)}, got {name!r}.")
    return methods[name]


def check(config: Config, lm: LoadedModel) -> None:
    """Checks a method needs the model for, done by experiment.prepare before any MLflow run exists."""
    if config.method == "epo":
        from .fluency import check_causal

        check_causal(lm, "--method epo")


def start_name(method: str) -> str:
    """What the verdict calls the method's primary null: its own starts, decoded as its results are."""
    return "decoded random starts" if method == "adam" else "random start tokens"


def start_pool(config: Config, lm: LoadedModel, size: int) -> tuple[np.ndarray, str]:
    """(token ids [size], description): i.i.d. draws of the method's own start distribution, decoded as its
    results are, for the primary null (nulls.null_models' start_pool)."""
    from .. import nulls

    if config.method == "adam":
        pool = nulls.decoded_start_pool(lm.embedding, lm.embedding_std(), size, config.seed)
        return pool, (f"the method's start vectors (N(0, std(E)) i.i.d.) decoded to their max-cosine tokens: "
                      f"a pool of {size} decoded once")
    # pez, gcg, epo start from uniform tokens; a generator apart from every run's (nulls.pool_seed)
    generator = torch.Generator(device="cpu").manual_seed(nulls.pool_seed(config.seed))
    pool = torch.randint(lm.embedding.shape[0], (size,), generator=generator).numpy()
    return pool, (f"the method's start tokens, drawn uniformly from the vocabulary (they decode to themselves): "
                  f"a pool of {size}")
