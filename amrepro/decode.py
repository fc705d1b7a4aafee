"""From continuous embeddings back to tokens: the token whose input-embedding row has maximal cosine
similarity, and the activation those real tokens reach when fed back."""

from __future__ import annotations

import torch


@torch.no_grad()
def nearest_tokens(embeddings: torch.Tensor, vocab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """embeddings [runs, pos, d_model], vocab [n_vocab, d_model] -> (ids [runs, pos], cosine [runs, pos])."""
    e = torch.nn.functional.normalize(embeddings.to(vocab.device, vocab.dtype), dim=-1)
    v = torch.nn.functional.normalize(vocab, dim=-1)
    cosine = e @ v.T  # [runs, pos, n_vocab]
    best, ids = cosine.max(dim=-1)
    return ids.cpu(), best.cpu()


@torch.no_grad()
def token_activation(reader, ids: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """Mean target activation [runs] when the tokens ids [runs, pos] are fed as real input.

    Feeding vocab[ids] as inputs_embeds is exactly what the model does with input_ids (an embedding lookup).
    """
    return reader(vocab[ids.to(vocab.device)]).mean(dim=1).cpu()
