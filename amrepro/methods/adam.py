"""The reference: continuous vectors from N(0, std(E)), Adam on -mean(act) + l2 * sum(x**2), decoded to their
nearest tokens afterwards (by experiment.execute). Exactly the loop `amrepro run` always ran: optimize.optimize."""

from __future__ import annotations

from ..objectives import reference_loss
from ..optimize import Result, optimize
from ..seeding import initial_embeddings
from . import Spec
from .problem import OnStep, Problem

SPEC = Spec(name="adam", summary="the reference: continuous vectors, decoded to nearest tokens afterwards",
            budget="epochs", options=("epochs", "lr", "l2"), start="vectors")


def run(problem: Problem, on_step: OnStep = None) -> Result:
    c, lm = problem.config, problem.lm
    start = initial_embeddings(problem.seeds, c.n_tokens, lm.embedding_std(), lm.d_model)  # [rows, pos, d_model]
    return optimize(problem.reader, start, reference_loss(c.l2), problem.seeds, c.epochs, c.lr, lm.device, on_step)
