"""PEZ (Wen et al. 2023, "Hard prompts made easy"): continuous vectors x, but every forward runs on their
nearest-token projection E[nearest(x)] (max cosine, as decode.py), and that gradient updates x with Adam.

The start is uniform random tokens' embeddings (the paper starts from random token embeddings), drawn from the
run's own generator. The projected tokens are real tokens whose activation is read in the same forward, so
the run's result is the best projected sequence it ever saw: no decoding gap.
"""

from __future__ import annotations

import torch

from ..decode import nearest_tokens
from ..optimize import Result
from . import Spec
from .problem import OnStep, Problem
from .tokens import BestTokens, token_result, uniform_tokens

SPEC = Spec(name="pez", summary="continuous vectors, forward on their nearest tokens", budget="steps",
            options=("steps", "pez_lr"), start="tokens")


def run(problem: Problem, on_step: OnStep = None) -> Result:
    c, E = problem.config, problem.lm.embedding
    start = uniform_tokens(problem.generators(), c.n_tokens, E.shape[0])  # [rows, pos]
    x = E[start.to(E.device)].detach().clone().requires_grad_(True)  # [rows, pos, d_model]
    optimizer = torch.optim.Adam([x], lr=c.pez_lr)
    acts = torch.empty(c.steps, problem.rows)  # [steps, rows]: activation of the projected tokens
    best = BestTokens(start, torch.full((problem.rows,), -torch.inf), c.steps)  # the first projection replaces it
    for step in range(c.steps):
        ids, _ = nearest_tokens(x.detach(), E)  # [rows, pos]
        p = E[ids.to(E.device)].detach().requires_grad_(True)  # [rows, pos, d_model]: real tokens
        act = problem.reader(p).mean(dim=1)  # [rows]
        (grad,) = torch.autograd.grad(-act.sum(), p)  # the projection's gradient ...
        optimizer.zero_grad(set_to_none=True)
        x.grad = grad  # ... applied to the continuous vectors
        optimizer.step()
        act = act.detach().cpu()
        acts[step] = act
        best.update(step, ids, act)
        if on_step is not None:
            on_step(step)
    return token_result(problem, start, best.ids, acts, {"act/tokens": best.history})
