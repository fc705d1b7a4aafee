"""GCG (Zou et al. 2023; nanoGCG), maximizing the target's mean activation over real tokens.

Each step, for every run at once: the gradient of mean(act) with respect to the one-hot tokens ranks the top-k
replacement tokens per position; `candidates` sequences, each the current one with ONE position swapped to one
of its top-k tokens (position and token drawn from the run's own generator), are scored in one forward pass
through the stop-at-block reader; the best candidate becomes the current sequence (as GCG does, even when it
is worse), and the best sequence ever seen is the run's result. Its activation is the score: no decoding step.
"""

from __future__ import annotations

import torch

from ..optimize import Result
from . import Spec
from .candidates import Candidates, one_swap
from .problem import OnStep, Problem
from .tokens import BestTokens, token_result, uniform_tokens

SPEC = Spec(name="gcg", summary="token swaps ranked by the one-hot gradient", budget="steps",
            options=("steps", "topk", "candidates"), start="tokens")


def run(problem: Problem, on_step: OnStep = None) -> Result:
    c, E = problem.config, problem.lm.embedding
    generators = problem.generators()
    ids = uniform_tokens(generators, c.n_tokens, E.shape[0])  # [rows, pos]
    start = ids.clone()
    k = min(c.topk, E.shape[0])
    acts = torch.empty(c.steps, problem.rows)  # [steps, rows]: activation of the current tokens
    with Candidates(problem) as score:
        best = BestTokens(ids, score.activation(ids[:, None])[:, 0], c.steps)  # the start is the first best
        for step in range(c.steps):
            grad, act = score.token_gradient(ids)  # [rows, pos, vocab], [rows]
            acts[step] = act
            top = grad.topk(k, dim=-1).indices  # [rows, pos, k]: swaps that raise the activation most, to first order
            cand = one_swap(ids, top, c.candidates, generators)  # [rows, C, pos]
            cand_act = score.activation(cand)  # [rows, C]
            pick = cand_act.argmax(dim=1)  # [rows]
            ids = cand[torch.arange(problem.rows), pick]  # [rows, pos]
            best.update(step, ids, cand_act[torch.arange(problem.rows), pick])
            if on_step is not None:
                on_step(step)
    return token_result(problem, start, best.ids, acts, {"act/tokens": best.history})
