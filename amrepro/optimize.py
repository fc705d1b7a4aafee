"""The optimization loop: pure (no MLflow, no printing), all runs batched, returns a Result.

Adam is elementwise and the runs never interact in the forward pass, so optimizing the stacked
[runs, pos, d_model] tensor is the same optimization as running each seed alone (tests prove it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    # [runs] int64: the first epoch whose loss was non-finite (the run diverged), `epochs` when only the final
    # embeddings are, -1 when the run stayed finite. Runs never mix, so one diverged run leaves the others intact.
    diverged_at: torch.Tensor
    # Methods that end in real tokens (pez, gcg, epo) give their token ids [runs, pos] here (final = their
    # embedding rows); None for adam, whose tokens are decoded from `final` afterwards.
    ids: torch.Tensor | None = None
    # each method's own per-step metrics: metric key -> [steps, runs] (e.g. "act/tokens", "xent/tokens")
    history: dict[str, torch.Tensor] = field(default_factory=dict)
    frontier: list | None = None  # epo: per run, its final population [{penalty, token_ids, activation, xent}]
    # the target activation at each position [runs, pos] of the final embeddings ("final") and of the decoded
    # tokens fed back as real input ("tokens"); filled by experiment.optimize_rows, for the dashboard
    positions: dict[str, torch.Tensor] = field(default_factory=dict)

    def divergence(self, r: int) -> str | None:
        """Why run r is not a result (one phrase), or None when it stayed finite."""
        epoch = int(self.diverged_at[r])
        if epoch < 0:
            return None
        if epoch >= self.loss.shape[0]:
            return f"the embeddings became non-finite after the last step (epoch {epoch - 1})"
        return f"the loss became non-finite ({float(self.loss[epoch, r])}) at epoch {epoch}"

    def rows(self, pick: slice) -> "Result":
        """The result of the runs in pick alone (the rows of a batch are independent)."""
        return Result(self.seeds[pick], self.initial[pick], self.final[pick], self.loss[:, pick],
                      self.activation[:, pick], self.final_activation[pick], self.diverged_at[pick],
                      None if self.ids is None else self.ids[pick], {k: v[:, pick] for k, v in self.history.items()},
                      None if self.frontier is None else self.frontier[pick],
                      {k: v[pick] for k, v in self.positions.items()})


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
    # divergence is tracked on the device too: a NaN/inf loss is recorded, never acted on inside the loop
    diverged_at = torch.full((len(seeds),), -1, dtype=torch.long, device=device)  # [runs]
    for epoch in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        act = reader(x)  # [runs, pos]
        loss = objective(act, x)  # [runs]
        loss.sum().backward()  # d(sum)/d(loss_r) = 1: each run gets its own gradient
        optimizer.step()
        losses[epoch] = loss.detach()
        diverged_at.masked_fill_((diverged_at < 0) & ~torch.isfinite(losses[epoch]), epoch)  # [runs]
        acts[epoch] = mean_act(act, x).detach()
        if on_epoch is not None:
            on_epoch(epoch)
    final = x.detach()
    with torch.no_grad():
        final_act = mean_act(reader(final), final)
    diverged_at.masked_fill_((diverged_at < 0) & ~torch.isfinite(final).flatten(1).all(dim=1), epochs)  # [runs]
    return Result(seeds=list(seeds), initial=initial.detach().cpu().clone(), final=final.cpu().clone(),
                  loss=losses.cpu(), activation=acts.cpu(), final_activation=final_act.cpu(),
                  diverged_at=diverged_at.cpu())
