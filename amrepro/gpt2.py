"""GPT-2 fast path: the forward pass written out nanoGPT-style on the HF GPT2Model's own weights, with a
hand-written backward that computes the gradient with respect to the input only.

Why it is faster than the HF module tree under autograd (bench/bench.py measures it):
- only the blocks the target needs run, and the last one skips what the target does not read (one column
  of an output projection instead of d_model);
- the weights are frozen, so the backward is just the input-gradient GEMMs dx = dy @ W^T: written by hand,
  with no autograd graph of a few hundred nodes to build and walk every step;
- on the CPU each weight is pre-packed once, for both directions, for the GEMM kernel that kernels.py measured
  fastest on this step's own shapes (oneDNN's blocked layout or MKL's packed format). With only
  runs x pos = 50 rows per GEMM, plain sgemm spends most of its time streaming and re-packing the weights on
  every call. The packed copies cost 2x the used weights in memory (packing is skipped when that would
  exceed a quarter of RAM).
Every op stays float32; tests/test_gpt2_fast.py pins values and gradients to HF and HookedReader.

Per-row targets (`index`, a LongTensor [rows]): row r reads index[r] of the same site and block, so one batch
serves several targets of a site (--controls, sweeps). Only the last block differs: it reads W[:, index[r]]
for row r (a bmm against [rows, in, 1] instead of one matvec) and the residual adds gather. Without `index`
the single-target ops run unchanged, bit for bit.

HF's Conv1D stores weights as [in, out]: y = b + x @ W.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kernels
from .kernels import Linear as _Linear
from .model import LoadedModel
from .targets import Target

_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
_PACK_RAM_FRACTION = 0.25  # pack the weights only if the packed copies fit in this share of RAM


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0  # unknown: do not pack


@dataclass
class _Block:
    """The weights one block needs for this target; None where the target reads none of that part."""
    ln_1: tuple  # (weight, bias, eps)
    attn: _Linear  # c_attn: [D] -> [3D] (q, k, v)
    proj: _Linear | None  # attn.c_proj, full
    ln_2: tuple | None
    fc: _Linear | None  # mlp.c_fc, full
    out: _Linear | None  # mlp.c_proj, full
    # last block only: (W[:, i] contiguous [in], b[i] []) of the one projection column read, or per row
    # (W[:, index].T contiguous [rows, in], b[index] [rows])
    column: tuple | None = None


@functools.cache
def _causal_mask(P: int, device: torch.device) -> torch.Tensor:
    """Additive causal mask, as HF's: 0 where a query may attend, float32 min above the diagonal. [P, P]"""
    future = torch.ones(P, P, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(P, P, device=device).masked_fill_(future, torch.finfo(torch.float32).min)


def _layer_norm(h: torch.Tensor, ln: tuple, tape: list | None):
    out, mean, rstd = torch.native_layer_norm(h, (h.shape[-1],), ln[0], ln[1], ln[2])
    if tape is not None:
        tape.append((h, mean, rstd))
    return out


def _layer_norm_grad(d_out: torch.Tensor, ln: tuple, saved: tuple) -> torch.Tensor:
    h, mean, rstd = saved
    return torch.ops.aten.native_layer_norm_backward(d_out, h, (h.shape[-1],), mean, rstd, ln[0], ln[1],
                                                     (True, False, False))[0]


class GPT2Reader:
    @staticmethod
    def supports(lm: LoadedModel) -> bool:
        c = lm.model.config
        return (lm.model_type == "gpt2" and c.activation_function in _ACTIVATIONS and c.scale_attn_weights
                and not c.scale_attn_by_inverse_layer_idx and not c.reorder_and_upcast_attn
                and not c.add_cross_attention
                # the hand-written backward gives gradients for the input only: frozen weights required
                and not any(p.requires_grad for p in lm.model.parameters()))

    def __init__(self, lm: LoadedModel, target: Target, index: torch.Tensor | None = None):
        """index: None reads target.index in every row; a LongTensor [rows] (calls must then pass exactly rows rows)."""
        self.model, self.target = lm.model, target
        self.index = None if index is None else torch.as_tensor(index, dtype=torch.long, device=lm.device)
        self.n_head = lm.model.config.n_head
        self.gelu = _ACTIVATIONS[lm.model.config.activation_function]
        self.site, self.last = target.site, target.block
        if self.site == "hook_resid_pre":  # resid_pre[L] is resid_post[L-1]; resid_pre[0] is the input stream
            self.site, self.last = ("stream", 0) if target.block == 0 else ("hook_resid_post", target.block - 1)
        self._blocks: list[_Block] | None = None  # built (and packed) on first use, dropped on __exit__
        self.kernel: str | None = None  # the GEMM kernel the blocks use (kernels.py), once built

    def __enter__(self) -> "GPT2Reader":
        return self  # no hooks to install: the reader is a plain function of x

    def __exit__(self, *exc) -> None:
        self._blocks = None  # frees the packed weight copies

    # --- weights ------------------------------------------------------------------------------------------
    def _build(self, rows: int, device: torch.device) -> list[_Block]:
        h = self.model.h[:0 if self.site == "stream" else self.last + 1]
        convs = [(b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj) for b in h]
        self.kernel = "plain"
        if h and device.type == "cpu":
            used = sum(m.weight.numel() for block in convs for m in block)
            if 2 * 4 * used <= _PACK_RAM_FRACTION * _physical_memory():
                # every block has the same shapes: its four weights are the step's GEMMs
                self.kernel = kernels.choose(device, [(m.weight, m.bias) for m in convs[0]], rows)

        def lin(conv) -> _Linear:
            return _Linear(conv.weight, conv.bias, rows, self.kernel)

        full_proj = self.site in ("hook_resid_post", "mlp.hook_post")  # ln_2 needs every dimension of resid_mid
        blocks = []
        conv = {"hook_attn_out": "attn.c_proj", "hook_resid_mid": "attn.c_proj", "mlp.hook_post": "mlp.c_fc",
                "hook_resid_post": "mlp.c_proj"}.get(self.site)
        for n, b in enumerate(h):
            last = n == self.last
            blocks.append(_Block(
                ln_1=(b.ln_1.weight, b.ln_1.bias, b.ln_1.eps),
                attn=lin(b.attn.c_attn),
                proj=lin(b.attn.c_proj) if not last or full_proj else None,
                ln_2=(b.ln_2.weight, b.ln_2.bias, b.ln_2.eps) if not last or full_proj else None,
                fc=lin(b.mlp.c_fc) if not last or self.site == "hook_resid_post" else None,
                out=lin(b.mlp.c_proj) if not last else None,
                column=self._column(b.get_submodule(conv)) if last else None))
        return blocks

    def _column(self, conv) -> tuple:
        if self.index is not None:
            return conv.weight[:, self.index].t().contiguous(), conv.bias[self.index]  # [rows, in], [rows]
        return conv.weight[:, self.target.index].contiguous(), conv.bias[self.target.index]  # [in], []

    # --- per-row helpers: with index None they are the single-target ops, unchanged --------------------------
    def _pick(self, h: torch.Tensor) -> torch.Tensor:
        """h [R, P, D] -> h[r, :, index[r]] [R, P]."""
        if self.index is None:
            return h[..., self.target.index]
        return h.gather(-1, self.index.view(-1, 1, 1).expand(h.shape[0], h.shape[1], 1)).squeeze(-1)

    def _pick_grad_(self, dh: torch.Tensor, dact: torch.Tensor) -> torch.Tensor:
        """dh[r, :, index[r]] += dact[r] in place: dh [R, P, D], dact [R, P]."""
        if self.index is None:
            dh[..., self.target.index] += dact
            return dh
        return dh.scatter_add_(-1, self.index.view(-1, 1, 1).expand(dh.shape[0], dh.shape[1], 1), dact[..., None])

    def _project(self, y: torch.Tensor, column: tuple, shape: torch.Size) -> torch.Tensor:
        """One projection column per row: y [R*P, in] -> y @ W[:, i] + b[i] as [R, P] (shape = (R, P))."""
        w, b = column
        if self.index is None:
            return (y @ w + b).view(shape)
        return torch.bmm(y.view(*shape, -1), w[:, :, None]).view(shape) + b[:, None]  # [R, P]

    def _project_grad(self, dact: torch.Tensor, column: tuple) -> torch.Tensor:
        """dact [R, P] -> d(act)/d(y) * dact [R*P, in]: the column itself, scaled by each row's gradient."""
        w = column[0]
        if self.index is None:
            return dact.reshape(-1, 1) * w  # [R*P, in]
        return (dact[..., None] * w[:, None, :]).view(-1, w.shape[-1])  # [R*P, in]

    # --- forward (appending what the backward needs to `tape` when it is a list) ---------------------------
    def _attention(self, blk: _Block, h: torch.Tensor, tape: list | None) -> torch.Tensor:
        """Merged attention heads before c_proj: h [R, P, D] -> [R*P, D]."""
        R, P, D = h.shape
        H, hd = self.n_head, D // self.n_head
        a = _layer_norm(h, blk.ln_1, tape)  # [R, P, D]
        qkv = blk.attn(a.view(R * P, D))  # [R*P, 3D]
        # one copy into head-major layout, then q, k, v are contiguous [R*H, P, hd] batches for bmm
        q, k, v = qkv.view(R, P, 3, H, hd).permute(2, 0, 3, 1, 4).reshape(3, R * H, P, hd)
        # mask + (q @ k^T) * hd^-0.5 in one call: [R*H, P, P]
        att = torch.baddbmm(_causal_mask(P, h.device), q, k.transpose(1, 2), alpha=hd**-0.5).softmax(-1)
        if tape is not None:
            tape.append((q, k, v, att))
        return torch.bmm(att, v).view(R, H, P, hd).transpose(1, 2).reshape(R * P, D)  # [R*P, D]

    def _mlp_hidden(self, blk: _Block, h: torch.Tensor, tape: list | None, fc=None) -> torch.Tensor:
        """gelu(ln_2(h) @ W_fc + b_fc): h [R, P, D] -> [R*P, d_mlp], or [R, P] when fc reads one unit's column."""
        a = _layer_norm(h, blk.ln_2, tape)  # [R, P, D]
        pre = (fc or blk.fc)(a.view(-1, a.shape[-1]))  # [R*P, d_mlp]
        if tape is not None:
            tape.append(pre)
        return F.gelu(pre, approximate=self.gelu)

    def _block(self, blk: _Block, h: torch.Tensor, tape: list | None) -> torch.Tensor:
        h = h + blk.proj(self._attention(blk, h, tape)).view(h.shape)  # resid_mid [R, P, D]
        return h + blk.out(self._mlp_hidden(blk, h, tape)).view(h.shape)  # resid_post [R, P, D]

    def _forward(self, x: torch.Tensor, tape: list | None) -> torch.Tensor:
        """x [R, P, D] -> target activation [R, P]."""
        R, P, D = x.shape
        if self.index is not None and self.index.shape != (R,):
            raise ValueError(f"this reader reads {self.index.shape[0]} per-row indices, got {R} rows")
        if self._blocks is None:
            self._blocks = self._build(R * P, x.device)
        h = x + self.model.wpe.weight[:P]  # [R, P, D]: GPT-2 adds positions to inputs_embeds too
        if self.site == "stream":
            return self._pick(h)
        for blk in self._blocks[:self.last]:  # full blocks before the one the target lives in
            h = self._block(blk, h, tape)
        return self._last_block(self._blocks[self.last], h, tape)

    def _last_block(self, blk: _Block, h: torch.Tensor, tape: list | None) -> torch.Tensor:
        y = self._attention(blk, h, tape)  # [R*P, D]
        if self.site in ("hook_attn_out", "hook_resid_mid"):
            act = self._project(y, blk.column, h.shape[:-1])  # [R, P]: one column of W_O
            return act + self._pick(h) if self.site == "hook_resid_mid" else act
        h = h + blk.proj(y).view(h.shape)  # resid_mid [R, P, D]: ln_2 needs every dimension
        if self.site == "mlp.hook_post":  # one hidden unit: [R, P]
            return self._mlp_hidden(blk, h, tape, lambda a: self._project(a, blk.column, h.shape[:-1]))
        u = self._mlp_hidden(blk, h, tape)  # resid_post: [R*P, d_mlp]
        return self._pick(h) + self._project(u, blk.column, h.shape[:-1])  # [R, P]: one column of W_out

    # --- backward: the same steps in reverse, popping the tape ----------------------------------------------
    def _attention_grad(self, blk: _Block, dy: torch.Tensor, tape: list) -> torch.Tensor:
        """dy [R*P, D] (gradient of the merged heads) -> gradient of the block input [R, P, D]."""
        q, k, v, att = tape.pop()  # [R*H, P, hd] x3, [R*H, P, P]
        ln_saved = tape.pop()
        RH, P, hd = q.shape
        H = self.n_head
        R = RH // H
        dyh = dy.view(R, P, H, hd).transpose(1, 2).reshape(RH, P, hd)  # [R*H, P, hd]
        datt = torch.bmm(dyh, v.transpose(1, 2))  # [R*H, P, P]
        dqkv = torch.empty(3, RH, P, hd, device=dy.device, dtype=dy.dtype)  # dq, dk, dv written in place
        torch.bmm(att.transpose(1, 2), dyh, out=dqkv[2])  # dv
        # masked entries have att = 0, so their score gradient is 0: no mask needed here
        dscores = torch._softmax_backward_data(datt, att, -1, att.dtype).mul_(hd**-0.5)  # [R*H, P, P]
        torch.bmm(dscores, k, out=dqkv[0])  # dq
        torch.bmm(dscores.transpose(1, 2), q, out=dqkv[1])  # dk
        dqkv = dqkv.view(3, R, H, P, hd).permute(1, 3, 0, 2, 4).reshape(R * P, 3 * H * hd)  # [R*P, 3D]
        da = blk.attn.grad(dqkv).view(R, P, H * hd)  # [R, P, D]
        return _layer_norm_grad(da, blk.ln_1, ln_saved)

    def _mlp_hidden_grad(self, blk: _Block, du: torch.Tensor, tape: list, fc_grad=None) -> torch.Tensor:
        """du [R*P, d_mlp] (or [R, P] with fc_grad of one unit's column) -> gradient of resid_mid [R, P, D]."""
        pre = tape.pop()  # [R*P, d_mlp]
        ln_saved = tape.pop()
        dpre = torch.ops.aten.gelu_backward(du, pre, approximate=self.gelu)  # [R*P, d_mlp]
        return _layer_norm_grad((fc_grad or blk.fc.grad)(dpre).view(ln_saved[0].shape), blk.ln_2, ln_saved)

    def _block_grad(self, blk: _Block, dh: torch.Tensor, tape: list) -> torch.Tensor:
        """Gradient of resid_post [R, P, D] -> gradient of resid_pre [R, P, D]."""
        R, P, D = dh.shape
        dh = self._mlp_hidden_grad(blk, blk.out.grad(dh.view(R * P, D)), tape).add_(dh)  # d resid_mid
        return self._attention_grad(blk, blk.proj.grad(dh.view(R * P, D)), tape).add_(dh)  # d resid_pre

    def _last_block_grad(self, blk: _Block, dact: torch.Tensor, tape: list) -> torch.Tensor:
        """dact [R, P] -> gradient of the last block's input [R, P, D]."""
        if self.site in ("hook_attn_out", "hook_resid_mid"):
            dh = self._attention_grad(blk, self._project_grad(dact, blk.column), tape)  # [R, P, D]
            return self._pick_grad_(dh, dact) if self.site == "hook_resid_mid" else dh
        if self.site == "mlp.hook_post":
            dmid = self._mlp_hidden_grad(blk, dact, tape, lambda dpre: self._project_grad(dpre, blk.column))
        else:  # resid_post
            dmid = self._pick_grad_(self._mlp_hidden_grad(blk, self._project_grad(dact, blk.column), tape), dact)
        return self._attention_grad(blk, blk.proj.grad(dmid.view(-1, dmid.shape[-1])), tape).add_(dmid)

    def _backward(self, dact: torch.Tensor, tape: list, shape: torch.Size, blocks: list[_Block]) -> torch.Tensor:
        """dact [R, P] -> dx [R, P, D]; the position embedding add passes the gradient through unchanged.
        `blocks` are the weights the forward used (still valid if the reader was closed in between)."""
        if self.site == "stream":
            return self._pick_grad_(dact.new_zeros(shape), dact)
        dh = self._last_block_grad(blocks[self.last], dact.contiguous(), tape)
        for blk in reversed(blocks[:self.last]):
            dh = self._block_grad(blk, dh, tape)
        assert not tape, "forward and backward disagree on what was saved"
        return dh

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [runs, pos, d_model] -> target activation [runs, pos], differentiable with respect to x."""
        if torch.is_grad_enabled() and x.requires_grad:
            return _ReadSite.apply(x, self)
        return self._forward(x, None)


class _ReadSite(torch.autograd.Function):
    """Plugs the hand-written backward into autograd, so objectives stay ordinary autograd code."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, reader: GPT2Reader) -> torch.Tensor:
        tape: list = []
        act = reader._forward(x, tape)  # [R, P]
        ctx.reader, ctx.tape, ctx.shape, ctx.blocks = reader, tape, x.shape, reader._blocks
        return act

    @staticmethod
    def backward(ctx, dact: torch.Tensor):
        tape, ctx.tape = ctx.tape, None  # the saved activations are freed as soon as they are used
        return ctx.reader._backward(dact, tape, ctx.shape, ctx.blocks), None
