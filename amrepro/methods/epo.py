"""EPO (Thompson et al. 2024, "Fluent dreaming for language models"; Confirm-Solutions/dreamy, dreamy/epo.py):
GCG with a population. Member m of a run maximizes act - penalty_m * xent, where xent is the cross-entropy of
the prompt under the model's own LM head and the penalties are log-spaced from 0.1 to 10 (dreamy's
x_penalty_min/max); the final population is a Pareto frontier of activation against fluency.

Each step, for every run at once: each member's gradient of its own objective (one full forward and backward)
ranks top-k swaps per position; candidates // population one-swap candidates per member (drawn from the run's
own generator) are scored for activation and fluency in one full forward; then every member m takes, from
the pool of all the run's members and candidates, the sequence that maximizes ITS objective (members share
what any of them found, as in dreamy). The run's result is the member with the highest activation; its
cross-entropy is logged as xent/tokens, and the whole frontier goes to summary.json.

EPO needs the full forward (the LM head reads the last block), so it costs n_layers / (target block + 1) times
a GCG step of the same size.
"""

from __future__ import annotations

import torch

from ..optimize import Result
from . import Spec
from .candidates import MAX_SEQUENCES, one_swap
from .fluency import LOGIT_ELEMENTS, LMReader
from .problem import OnStep, Problem
from .tokens import token_result, uniform_tokens

SPEC = Spec(name="epo", summary="gcg with a population trading activation against fluency", budget="epo_steps",
            options=("epo_steps", "topk", "candidates", "population"), start="tokens", needs=("lm_head",))


def run(problem: Problem, on_step: OnStep = None) -> Result:
    c, lm, E = problem.config, problem.lm, problem.lm.embedding
    R, M, P = problem.rows, c.population, c.n_tokens
    C = max(1, c.candidates // M)  # candidates per member per step
    k = min(c.topk, E.shape[0])
    generators = problem.generators()
    member_gens = [g for g in generators for _ in range(M)]  # a run's members draw, in turn, from its generator
    # [M] penalties log-spaced from dreamy's x_penalty_min 0.1 to x_penalty_max 10 (a population of 1: the middle)
    lam = torch.logspace(-1, 1, M) if M > 1 else torch.ones(1)
    row_index = getattr(problem.reader, "index", None)  # [R] per-row targets (--controls) or None
    start = uniform_tokens(generators, P, E.shape[0])  # [R, pos]
    ids = start[:, None, :].repeat(1, M, 1)  # [R, M, pos]: every member starts from the run's start
    hist = {"act/tokens": torch.empty(c.epo_steps, R), "xent/tokens": torch.empty(c.epo_steps, R)}
    acts = torch.empty(c.epo_steps, R)  # [steps, R]: the best member's activation before the step
    with LMReader(lm, problem.reader.target, getattr(problem.reader, "readout", None)) as read:
        def index_for(n: int, lo: int = 0, hi: int = R):  # per-row target index repeated n times per row
            return None if row_index is None else row_index[lo:hi].repeat_interleave(n)

        for step in range(c.epo_steps):
            flat = ids.view(R * M, P)
            x = E[flat.to(E.device)].detach().requires_grad_(True)  # [R*M, pos, d_model]
            site_act, xent = read(x, flat, index_for(M))  # [R*M, pos], [R*M]
            act = site_act.mean(dim=1)  # [R*M]
            (grad,) = torch.autograd.grad((act - lam.to(act.device).repeat(R) * xent).sum(), x)
            onehot_grad = torch.mm(grad.reshape(-1, grad.shape[-1]), E.t()).view(R * M, P, -1)  # [R*M, pos, vocab]
            top = onehot_grad.topk(k, dim=-1).indices.cpu()  # [R*M, pos, k]
            cand = one_swap(flat, top, C, member_gens).view(R, M * C, P)  # [R, M*C, pos]
            cand_act, cand_xent = _score(read, E, cand, index_for)  # [R, M*C] each
            pool = torch.cat([ids, cand], dim=1)  # [R, M + M*C, pos]
            pool_act = torch.cat([act.detach().cpu().view(R, M), cand_act], dim=1)  # [R, M + M*C]
            pool_xent = torch.cat([xent.detach().cpu().view(R, M), cand_xent], dim=1)
            acts[step] = pool_act[:, :M].max(dim=1).values
            score = pool_act[:, None, :] - lam[None, :, None] * pool_xent[:, None, :]  # [R, M, pool]
            pick = score.argmax(dim=-1)  # [R, M]
            ids = pool.gather(1, pick[..., None].expand(R, M, P))  # [R, M, pos]
            m_act, m_xent = pool_act.gather(1, pick), pool_xent.gather(1, pick)  # [R, M]
            best = m_act.argmax(dim=1)  # [R]
            hist["act/tokens"][step] = m_act[torch.arange(R), best]
            hist["xent/tokens"][step] = m_xent[torch.arange(R), best]
            if on_step is not None:
                on_step(step)
    best_ids = ids[torch.arange(R), best]  # [R, pos]
    frontier = [[{"penalty": float(lam[m]), "token_ids": ids[r, m].tolist(), "activation": float(m_act[r, m]),
                  "xent": float(m_xent[r, m])} for m in range(M)] for r in range(R)]
    return token_result(problem, start, best_ids, acts, hist, frontier=frontier)


@torch.no_grad()
def _score(read: LMReader, E: torch.Tensor, cand: torch.Tensor, index_for):
    """(activation, xent) [R, n] of candidates cand [R, n, pos], forward only, whole rows per chunk."""
    R, n, P = cand.shape
    step = max(1, min(MAX_SEQUENCES, LOGIT_ELEMENTS // (P * E.shape[0])) // n)  # rows per chunk: bounds logits too
    acts, xents = [], []
    for lo in range(0, R, step):
        hi = min(R, lo + step)
        flat = cand[lo:hi].reshape(-1, P)
        site_act, xent = read(E[flat.to(E.device)], flat, index_for(n, lo, hi))
        acts.append(site_act.mean(dim=1).view(hi - lo, n).cpu())
        xents.append(xent.view(hi - lo, n).cpu())
    return torch.cat(acts), torch.cat(xents)
