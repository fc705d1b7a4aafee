"""GPT-2 fast path: the forward pass written out nanoGPT-style on the HF GPT2Model's own weights.

Why: the target reads one dimension of one site, so the last block needed can skip most of its output
projection (one column of W instead of d_model), and a plain functional forward carries less Python and
autograd overhead than the HF module tree. HF's Conv1D stores weights as [in, out]: y = b + x @ W.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .model import LoadedModel
from .targets import Target

_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


class GPT2Reader:
    @staticmethod
    def supports(lm: LoadedModel) -> bool:
        c = lm.model.config
        return (lm.model_type == "gpt2" and c.activation_function in _ACTIVATIONS and c.scale_attn_weights
                and not c.scale_attn_by_inverse_layer_idx and not c.reorder_and_upcast_attn
                and not c.add_cross_attention)

    def __init__(self, lm: LoadedModel, target: Target):
        self.model, self.target = lm.model, target
        self.n_head = lm.model.config.n_head
        self.gelu = _ACTIVATIONS[lm.model.config.activation_function]

    def __enter__(self) -> "GPT2Reader":
        return self  # no hooks to install: the reader is a plain function of x

    def __exit__(self, *exc) -> None:
        pass

    def _attention(self, block, h: torch.Tensor) -> torch.Tensor:
        """Merged attention heads before c_proj: [runs, pos, d_model]."""
        R, P, D = h.shape
        a = F.layer_norm(h, (D,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
        qkv = torch.addmm(block.attn.c_attn.bias, a.reshape(R * P, D), block.attn.c_attn.weight)  # [R*P, 3D]
        q, k, v = qkv.view(R, P, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x [R, H, P, hd]
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(D // self.n_head))  # [R, H, P, P]
        causal = torch.ones(P, P, dtype=torch.bool, device=h.device).tril()
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        y = scores.softmax(dim=-1) @ v  # [R, H, P, hd]
        return y.transpose(1, 2).reshape(R, P, D)

    def _mlp_hidden(self, block, h: torch.Tensor, columns=slice(None)) -> torch.Tensor:
        """gelu(ln_2(h) @ W_fc + b_fc), optionally only some hidden units: [runs, pos, d_mlp or k]."""
        D = h.shape[-1]
        a = F.layer_norm(h, (D,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
        pre = torch.addmm(block.mlp.c_fc.bias[columns], a.reshape(-1, D), block.mlp.c_fc.weight[:, columns])
        return F.gelu(pre, approximate=self.gelu).view(*h.shape[:-1], -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        R, P, D = x.shape
        t, i = self.target, self.target.index
        h = x + self.model.wpe.weight[:P]  # [R, P, D]: GPT-2 adds positions to inputs_embeds too
        site, last = t.site, t.block
        if site == "hook_resid_pre":  # resid_pre[L] is resid_post[L-1]
            if t.block == 0:
                return h[..., i]
            site, last = "hook_resid_post", t.block - 1
        for block in self.model.h[:last]:  # full blocks before the one the target lives in
            h = h + (self._attention(block, h) @ block.attn.c_proj.weight + block.attn.c_proj.bias)
            u = self._mlp_hidden(block, h)  # [R, P, d_mlp]
            h = h + torch.addmm(block.mlp.c_proj.bias, u.view(R * P, -1), block.mlp.c_proj.weight).view(R, P, D)
        block = self.model.h[last]
        y = self._attention(block, h)  # [R, P, D]
        if site == "hook_attn_out":
            return y @ block.attn.c_proj.weight[:, i] + block.attn.c_proj.bias[i]
        if site == "hook_resid_mid":
            return h[..., i] + y @ block.attn.c_proj.weight[:, i] + block.attn.c_proj.bias[i]
        h = h + (y @ block.attn.c_proj.weight + block.attn.c_proj.bias)  # full: ln_2 needs every dimension
        if site == "mlp.hook_post":
            return self._mlp_hidden(block, h, columns=slice(i, i + 1))[..., 0]
        u = self._mlp_hidden(block, h)  # resid_post: [R, P, d_mlp]
        return h[..., i] + u @ block.mlp.c_proj.weight[:, i] + block.mlp.c_proj.bias[i]  # one column of W_out
