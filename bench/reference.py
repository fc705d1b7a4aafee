"""The yardstick: the reference notebook's training function, re-implemented faithfully and kept here only to
measure amrepro against (bench/bench.py) and to prove that amrepro optimizes the same thing
(tests/test_reference_equivalence.py). Not part of the package.

What the notebook does, and what is kept on purpose even where it is wasteful:
- the model is GPT2Model.from_pretrained("gpt2") in eval() mode, but NOT frozen: every backward also computes
  and accumulates gradients on all 124M weights, which are never used;
- one run at a time (batch 1), 5 vectors initialized as randn(5, 768) * wte.std();
- every step runs the full 12-layer forward with output_hidden_states=True and reads hidden_states[layer];
- loss = -mean over positions of dimension `dim` + 0.01 * sum(embeddings ** 2), Adam(lr=1e-3).
"""

from __future__ import annotations

import torch


def load_reference_model(path: str, device: str | torch.device = "cpu"):
    """The notebook's model: from_pretrained with default settings, eval(), weights left trainable."""
    from transformers import GPT2Model

    return GPT2Model.from_pretrained(path).eval().to(device)


def reference_init(model, n_tokens: int = 5) -> torch.Tensor:
    """The notebook's start: randn(n_tokens, d_model) * std(wte), from the global torch RNG. [pos, d_model]"""
    wte = model.wte.weight
    return torch.randn(n_tokens, wte.shape[1]) * wte.std()


def reference_train(model, initial: torch.Tensor, layer: int = 8, dim: int = 91, epochs: int = 300,
                    lr: float = 1e-3, l2: float = 0.01) -> torch.Tensor:
    """The notebook's training loop from `initial` [pos, d_model]; returns the final embeddings [pos, d_model]."""
    device = next(model.parameters()).device
    embeddings = initial.detach().clone().to(device).requires_grad_(True)  # [pos, d_model]
    optimizer = torch.optim.Adam([embeddings], lr=lr)
    for _ in range(epochs):
        optimizer.zero_grad()  # only the embeddings: the model's weight gradients keep accumulating, as in the notebook
        hs = model(inputs_embeds=embeddings.unsqueeze(0), output_hidden_states=True).hidden_states[layer]  # [1, pos, d_model]
        loss = -hs[0, :, dim].mean() + l2 * torch.sum(embeddings ** 2)
        loss.backward()
        optimizer.step()
    return embeddings.detach()
