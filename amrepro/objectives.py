"""Objectives as small named callables that compose, lucent-style: `-activation() + 0.01 * l2()`.

An objective maps (act [runs, pos], x [runs, pos, d_model]) to one loss per run [runs]. Runs never mix, so
summing the per-run losses gives each run exactly the gradient it would get alone.
"""

from __future__ import annotations

from typing import Callable

import torch


class Objective:
    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], name: str):
        self.fn, self.name = fn, name

    def __call__(self, act: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.fn(act, x)

    def __add__(self, other: "Objective") -> "Objective":
        return Objective(lambda a, x: self(a, x) + other(a, x), f"{self.name} + {other.name}")

    def __sub__(self, other: "Objective") -> "Objective":
        return self + (-other)

    def __neg__(self) -> "Objective":
        return Objective(lambda a, x: -self(a, x), f"-{self.name}")

    def __mul__(self, weight: float) -> "Objective":
        return Objective(lambda a, x: weight * self(a, x), f"{weight:g} * {self.name}")

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"Objective({self.name})"


def activation() -> Objective:
    """Mean over positions of the target activation (the reference's `act.mean()`)."""
    return Objective(lambda act, x: act.mean(dim=1), "activation")


def l2() -> Objective:
    return Objective(lambda act, x: x.pow(2).sum(dim=(1, 2)), "l2")


def reference_loss(l2_weight: float) -> Objective:
    return -activation() + l2_weight * l2()
