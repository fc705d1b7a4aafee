"""The optimization loop: pure (no MLflow, no printing), all runs batched, returns a Result.

Adam is elementwise and the runs never interact in the forward pass, so optimizing the stacked
[runs, pos, d_model] tensor is the same optimization as running each seed alone (tests prove it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .objectives import Objective, activation


@dataclass
class Result:
    seeds: list[int]
    initial: torch.Tensor  # [runs, pos, d_model], float32, CPU
    final: torch.Tensor  # [runs, pos, d_model], float32, CPU
    loss: torch.Tensor  # [epochs, runs]: loss at each epoch, before its step
    activation: torch.Tensor  # [epochs, runs]: mean target activation at each epoch, before its step
    final_activation: torch.Tensor  # [runs]: mean target activation of the final embeddings

    def run(self, r: int) -> "Result":
        """The result of run r alone, as if it had run in a batch of one."""
        pick = slice(r, r + 1)
        return Result([self.seeds[r]], self.initial[pick], self.final[pick], self.loss[:, pick],
                      self.activation[:, pick], self.final_activation[pick])


def optimize(reader: Callable[[torch.Tensor], torch.Tensor], initial: torch.Tensor, objective: Objective,
             seeds: list[int], epochs: int, lr: float, device: torch.device,
             on_epoch: Callable[[int], None] | None = None) -> Result:
    """Minimize objective(reader(x), x) for every run at once with Adam(lr), starting from initial."""
    x = initial.to(device).clone().requires_grad_(True)  # [runs, pos, d_model]
    optimizer = torch.optim.Adam([x], lr=lr)
    mean_act = activation()
    # history stays on the device: no host sync per epoch on a GPU
    losses = torch.empty(epochs, len(seeds), device=device)  # [epochs, runs]
    acts = torch.empty(epochs, len(seeds), device=device)  # [epochs, runs]
    for epoch in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        act = reader(x)  # [runs, pos]
        loss = objective(act, x)  # [runs]
        loss.sum().backward()  # d(sum)/d(loss_r) = 1: each run gets its own gradient
        optimizer.step()
        losses[epoch] = loss.detach()
        acts[epoch] = mean_act(act, x).detach()
        if on_epoch is not None:
            on_epoch(epoch)
    final = x.detach()
    with torch.no_grad():
        final_act = mean_act(reader(final), final)
    return Result(seeds=list(seeds), initial=initial.detach().cpu().clone(), final=final.cpu().clone(),
                  loss=losses.cpu(), activation=acts.cpu(), final_activation=final_act.cpu())
