"""gcg's scoring of token sequences: forward-only through the stop-at-block site reader, every row's candidates
in one batch (chunked only to bound memory), and the one-hot gradient that ranks swaps.

With a per-row index (--controls), candidate c of row r must read row r's target: the candidates get a reader
whose index repeats each row's index once per candidate (built once per chunk shape and kept)."""

from __future__ import annotations

from contextlib import ExitStack

import torch

from ..readers import site_reader

MAX_SEQUENCES = 2048  # candidate sequences per forward: bounds the activations held at once


class Candidates(ExitStack):
    """A context manager: it holds the per-row readers it builds until it exits."""

    def __init__(self, problem):
        super().__init__()
        self.lm, self.reader = problem.lm, problem.reader
        self.index = getattr(self.reader, "index", None)  # [rows] or None
        self._readers: dict = {}

    def _reader_for(self, lo: int, hi: int, per_row: int):
        if self.index is None:
            return self.reader
        key = (lo, hi, per_row)
        if key not in self._readers:
            index = self.index[lo:hi].repeat_interleave(per_row)  # [(hi - lo) * per_row]
            reader = (self.reader.select(index) if hasattr(self.reader, "select")  # a feature: readout rows
                      else site_reader(self.lm, self.reader.target, index=index.cpu()))
            self._readers[key] = self.enter_context(reader)
        return self._readers[key]

    @torch.no_grad()
    def activation(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [rows, C, pos] -> mean target activation over positions [rows, C], forward only."""
        rows, C, P = ids.shape
        E = self.lm.embedding
        step = max(1, MAX_SEQUENCES // C)  # whole rows per chunk, so each chunk's index is fixed
        out = []
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            x = E[ids[lo:hi].reshape(-1, P).to(E.device)]  # [(hi - lo) * C, pos, d_model]
            out.append(self._reader_for(lo, hi, C)(x).mean(dim=1).view(hi - lo, C))
        return torch.cat(out).cpu()  # [rows, C]

    def token_gradient(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d mean(act) / d one-hot [rows, pos, vocab], act [rows]) at the tokens ids [rows, pos].

        The one-hot gradient is d act / d x @ E^T, since x = onehot @ E: no [rows, pos, vocab] one-hot input."""
        E = self.lm.embedding
        x = E[ids.to(E.device)].detach().requires_grad_(True)  # [rows, pos, d_model]
        act = self.reader(x).mean(dim=1)  # [rows]
        (grad,) = torch.autograd.grad(act.sum(), x)  # rows never mix: each gets its own gradient
        onehot_grad = torch.mm(grad.reshape(-1, grad.shape[-1]), E.t()).view(*ids.shape, -1)  # [rows, pos, vocab]
        return onehot_grad.cpu(), act.detach().cpu()  # [rows, pos, vocab], [rows]


def one_swap(ids: torch.Tensor, top: torch.Tensor, n: int, generators: list[torch.Generator]) -> torch.Tensor:
    """n candidates per row, each ids with ONE position replaced by one of that position's top-k tokens, both
    drawn uniformly from the row's own generator. ids [rows, pos], top [rows, pos, k] -> [rows, n, pos]"""
    rows, P = ids.shape
    k = top.shape[-1]
    out = ids[:, None, :].repeat(1, n, 1)  # [rows, n, pos]
    for r, g in enumerate(generators):
        pos = torch.randint(P, (n,), generator=g)  # [n]
        pick = torch.randint(k, (n,), generator=g)  # [n]
        out[r, torch.arange(n), pos] = top[r, pos, pick]
    return out
