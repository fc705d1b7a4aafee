"""Fluency: the cross-entropy of a token sequence under the model's own LM head, and the full forward that reads
the target's activation in the same pass (EPO scores both for every candidate; compare reports the first).

amrepro loads the base model (AutoModel); its LM head is the input embedding matrix when the model ties them
(GPT-2, SmolLM2, most small LMs): logits = last_hidden_state @ E^T, the final norm being part of the base model.
An encoder (MiniLM) has no next-token distribution: check_causal refuses it in one sentence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import AmreproError
from ..model import LoadedModel
from ..readers import HookedReader
from ..targets import Target

LOGIT_ELEMENTS = 2**25  # logits held at once (128 MB of float32): sequences per chunk = this / (pos * vocab)


@torch.no_grad()
def is_causal(lm: LoadedModel) -> bool:
    """True when position 0's output ignores later tokens (a decoder); False for a bidirectional encoder."""
    E = lm.embedding
    x = E[torch.tensor([[1, 2], [1, 3]], device=E.device)]  # [2, 2, d_model]: same first token
    h = lm.model(inputs_embeds=x).last_hidden_state  # [2, 2, d_model]
    return bool(torch.equal(h[0, 0], h[1, 0]))


def check_causal(lm: LoadedModel, what: str) -> None:
    if not is_causal(lm):
        raise AmreproError(f"{what} needs a causal language model (its fluency term is the model's own next-token "
                           f"cross-entropy), but {lm.name} is an encoder: its first position sees the later tokens.")
    if not getattr(lm.model.config, "tie_word_embeddings", False):
        raise AmreproError(f"{what} needs the model's LM head, but {lm.name} does not tie it to the input "
                           "embeddings and amrepro loads the base model without it.")


def _xent(hidden: torch.Tensor, ids: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy [N] of ids [N, pos] from last hidden states [N, pos, d_model]."""
    N, P = ids.shape
    if P < 2:
        return hidden.new_zeros(N)
    # one 2-D GEMM on a contiguous copy: a strided 3-D `hidden[:, :-1] @ E.T` is ~6x slower on the CPU
    logits = torch.mm(hidden[:, :-1].reshape(-1, hidden.shape[-1]), E.t())  # [N*(pos-1), vocab]
    return F.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="none").view(N, P - 1).mean(1)  # [N]


@torch.no_grad()
def prompt_xent(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy [N] (nats per predicted token) of each row of ids [N, pos] under the model itself."""
    E, (N, P) = lm.embedding, ids.shape
    step = max(1, LOGIT_ELEMENTS // (P * E.shape[0]))
    out = []
    for lo in range(0, N, step):
        chunk = ids[lo:lo + step].to(E.device)
        out.append(_xent(lm.model(inputs_embeds=E[chunk]).last_hidden_state, chunk, E).cpu())
    return torch.cat(out)


class LMReader(HookedReader):
    """The whole forward: (target activation [N, pos], cross-entropy [N]) of ids [N, pos]. index: per-row target
    indices [N] of the target's site and block, or None for target.index. A context manager (one hook)."""

    def __init__(self, lm: LoadedModel, target: Target, readout=None):
        """readout: a feature target's features.Readout (then index selects its rows), or None for a neuron."""
        super().__init__(lm, target)
        self.readout = readout

    def _capture(self, tensor) -> None:  # keeps the site and lets the forward run on: the LM head reads the end
        self._site = tensor[0] if isinstance(tensor, (tuple, list)) else tensor

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, index: torch.Tensor | None = None):
        """x [N, pos, d_model] (E[ids], may require grad), ids [N, pos] -> (act [N, pos], xent [N])."""
        hidden = self.lm.model(inputs_embeds=x).last_hidden_state  # [N, pos, d_model]
        site, self._site = self._site, None  # [N, pos, width]
        if self.readout is not None:
            act = self.readout(site, index)
        elif index is None:
            act = site[..., self.target.index]
        else:
            act = site.gather(-1, index.to(site.device).view(-1, 1, 1).expand(*site.shape[:2], 1)).squeeze(-1)
        return act, _xent(hidden, ids.to(x.device), self.lm.embedding)
