"""What the experiment hands a method (Problem, on_step) and asks of its declaration once the model is loaded:
the checks it needs (check) and its start distribution's null pool (start_pool). Apart from the registry
(methods/__init__.py), which Config reads, because these need Config, torch and the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .. import nulls
from ..config import Config
from ..model import LoadedModel
from . import spec
from .fluency import check_causal

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


def check(config: Config, lm: LoadedModel) -> None:
    """Checks a method needs the model for, done by experiment.prepare before any MLflow run exists."""
    if "lm_head" in spec(config.method).needs:
        check_causal(lm, f"--method {config.method}")


def start_pool(config: Config, lm: LoadedModel, size: int) -> tuple[np.ndarray, str]:
    """(token ids [size], description): i.i.d. draws of the method's own start distribution, decoded as its
    results are, for the primary null (nulls.null_models' start_pool)."""
    if spec(config.method).start == "vectors":
        pool = nulls.decoded_start_pool(lm.embedding, lm.embedding_std(), size, config.seed)
        return pool, (f"the method's start vectors (N(0, std(E)) i.i.d.) decoded to their max-cosine tokens: "
                      f"a pool of {size} decoded once")
    # uniform start tokens; a generator apart from every run's (nulls.pool_seed)
    generator = torch.Generator(device="cpu").manual_seed(nulls.pool_seed(config.seed))
    pool = torch.randint(lm.embedding.shape[0], (size,), generator=generator).numpy()
    return pool, (f"the method's start tokens, drawn uniformly from the vocabulary (they decode to themselves): "
                  f"a pool of {size}")
