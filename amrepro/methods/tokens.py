"""What the token methods (pez, gcg, epo) share: uniform random start tokens, the best sequence so far, and the
Result of real tokens."""

from __future__ import annotations

import torch

from ..optimize import Result
from .problem import Problem


def uniform_tokens(generators: list[torch.Generator], n_tokens: int, vocab_size: int) -> torch.Tensor:
    """The token methods' starts: n_tokens ids drawn uniformly per row from its own generator. [rows, pos]"""
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


def token_result(problem: Problem, start: torch.Tensor, ids: torch.Tensor, acts: torch.Tensor,
                 history: dict[str, torch.Tensor], **extra) -> Result:
    """A Result of real tokens: initial/final are the embedding rows of the start and result tokens, the loss
    is -activation, and final_activation is the activation of the result tokens read back alone."""
    E = problem.lm.embedding
    with torch.no_grad():
        final = E[ids.to(E.device)]  # [rows, pos, d_model]
        final_act = problem.reader(final).mean(dim=1).cpu()  # [rows]
    return Result(seeds=list(problem.seeds), initial=E[start.to(E.device)].detach().cpu().clone(),
                  final=final.detach().cpu().clone(), loss=-acts, activation=acts, final_activation=final_act,
                  diverged_at=torch.full((problem.rows,), -1, dtype=torch.long), ids=ids.clone(), history=history,
                  **extra)
