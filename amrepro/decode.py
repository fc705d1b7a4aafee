"""From continuous embeddings back to tokens: the token whose input-embedding row has maximal cosine similarity."""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 2**26  # cosines held at once when decoding (256 MB of float32)


@torch.no_grad()
def nearest_tokens(embeddings: torch.Tensor, vocab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """embeddings [runs, pos, d_model], vocab [n_vocab, d_model] -> (ids [runs, pos], cosine [runs, pos])."""
    e = torch.nn.functional.normalize(embeddings.to(vocab.device, vocab.dtype), dim=-1)
    v = torch.nn.functional.normalize(vocab, dim=-1)
    # [runs, pos, n_vocab] -> [runs, pos], one matmul in the common case; for thousands of runs the cosines would
    # not fit, and a few runs at a time keeps them to CHUNK_ELEMENTS
    step = max(1, CHUNK_ELEMENTS // (e.shape[1] * v.shape[0]))
    parts = [(e[i:i + step] @ v.T).max(dim=-1) for i in range(0, e.shape[0], step)]
    return torch.cat([p.indices for p in parts]).cpu(), torch.cat([p.values for p in parts]).cpu()
