"""Targets by TransformerLens-style name: 'blocks.8.hook_resid_pre[91]' -> Target(block=8, site, index=91).

Besides a site's own dimensions (neurons), a target can read a *feature* of the site's vector (features.py):
- `blocks.L.SITE@FILE.npy`: the dot product with a direction from a .npy file of the site's width, normalized;
- `blocks.L.SITE@sae:PATH[i]`: latent i of a sparse autoencoder saved in SAELens's format (a folder);
- `blocks.L.SITE@random:S[k]`: the k-th random unit direction of seed S (the controls of a direction target).
The part after '@' is the target's `source` ("" for a neuron); paths may not contain ',' (sweep lists).

`--layer L --dim D` is the reference's shorthand for blocks.L.hook_resid_pre[D] = HF hidden_states[L][..., D]
(the residual stream after L blocks = blocks.{L-1}.hook_resid_post).

Residual sites are a block's input and output, i.e. HF's hidden_states, on every architecture. For post-LN BERT
these are *normalized* streams (TransformerLens' BERT hook_resid_post is the sum before that LayerNorm, and its
hook_resid_mid the sum before the attention LayerNorm); amrepro keeps hidden_states' meaning instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import AmreproError

# site -> (module path inside a block, whether the site is that module's input or output).
# "" is the block itself: its input is resid_pre, its output resid_post, on every architecture.
RESIDUAL_SITES = {"hook_resid_pre": ("", "input"), "hook_resid_post": ("", "output")}
_GPT2_SITES = {"hook_resid_mid": ("ln_2", "input"), "hook_attn_out": ("attn", "output"),
               "mlp.hook_post": ("mlp.act", "output")}
SITES_BY_MODEL_TYPE = {
    "gpt2": _GPT2_SITES,
    "gpt_neo": _GPT2_SITES,
    # BERT is post-LN: resid_mid is the attention sublayer's normalized output, the MLP's input.
    "bert": {"hook_resid_mid": ("attention", "output"), "hook_attn_out": ("attention.output.dense", "output"),
             "mlp.hook_post": ("intermediate", "output")},
    # GPT-NeoX (Pythia) runs attention and MLP in parallel by default: then there is no resid_mid (see below).
    "gpt_neox": {"hook_attn_out": ("attention", "output"), "mlp.hook_post": ("mlp.act", "output")},
    # Llama (pre-RMSNorm, SwiGLU MLP: down_proj(act(gate_proj(x)) * up_proj(x))). The MLP's neurons are the
    # product, which no module outputs: it is the *input* of down_proj (TransformerLens' mlp.hook_post).
    "llama": {"hook_resid_mid": ("post_attention_layernorm", "input"), "hook_attn_out": ("self_attn", "output"),
              "mlp.hook_post": ("mlp.down_proj", "input")},
}
ALL_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "mlp.hook_post")
# blocks.L.SITE[i], or a feature: blocks.L.SITE@SOURCE with SOURCE 'sae:PATH[i]', 'random:S[k]' or 'FILE.npy' (no index)
_NAME = re.compile(r"blocks\.(\d+)\.([a-z_.]+)(?:\[(\d+)\]|@(sae:.+|random:\d+)\[(\d+)\]|@(.+\.npy))")
_EXPECTED = (f"expected blocks.L.SITE[i], blocks.L.SITE@FILE.npy or blocks.L.SITE@sae:PATH[i] with SITE one of "
             f"{', '.join(ALL_SITES)}, e.g. blocks.8.hook_resid_pre[91] or blocks.6.mlp.hook_post[1234]")


@dataclass(frozen=True)
class Target:
    block: int
    site: str
    index: int  # the site's dimension (neuron), the SAE latent, the random direction's number; 0 for a .npy
    source: str = ""  # "" (neuron), "sae:PATH", "random:S" or "PATH.npy": see the module docstring

    @property
    def kind(self) -> str:
        """'neuron', 'sae', 'random' (a random direction) or 'direction' (a .npy file)."""
        if not self.source:
            return "neuron"
        return self.source.split(":", 1)[0] if self.source.startswith(("sae:", "random:")) else "direction"

    @property
    def prefix(self) -> str:
        """The name without its index: 'blocks.8.hook_resid_pre' or 'blocks.8.hook_resid_pre@sae:PATH'."""
        return f"blocks.{self.block}.{self.site}" + (f"@{self.source}" if self.source else "")

    @property
    def name(self) -> str:
        return self.prefix if self.kind == "direction" else f"{self.prefix}[{self.index}]"

    @property
    def batch_key(self) -> tuple:
        """Targets with the same key can share one batch: one site, and one SAE (or one direction file)."""
        return (self.block, self.site, self.source)

    @classmethod
    def parse(cls, text: str) -> "Target":
        text = text.strip()
        match = _NAME.fullmatch(text)
        if not match or match.group(2) not in ALL_SITES:
            raise AmreproError(f"unknown target '{text}': {_EXPECTED}.")
        block, site, index, source, feature_index, npy = match.groups()
        return cls(block=int(block), site=site, index=int(index or feature_index or 0), source=source or npy or "")

    @classmethod
    def from_prefix(cls, prefix: str, index: int) -> "Target":
        """The target `prefix[index]` (layout.batch_targets); a direction file has no index."""
        return cls.parse(prefix if prefix.endswith(".npy") else f"{prefix}[{index}]")


def site_location(model_type: str, site: str, config=None) -> tuple[str, str]:
    """(module path inside the block, 'input' or 'output') of a site on this architecture. config (the HF
    model config, optional) refines architectures whose layout depends on it (sequential GPT-NeoX)."""
    sites = {**RESIDUAL_SITES, **SITES_BY_MODEL_TYPE.get(model_type, {})}
    # GPT-NeoX with use_parallel_residual=False is sequential: the MLP's LayerNorm reads resid_pre + attn_out.
    # (With parallel residuals that LayerNorm reads resid_pre itself, so the same hook would be wrong.)
    if model_type == "gpt_neox" and config is not None and not getattr(config, "use_parallel_residual", True):
        sites["hook_resid_mid"] = ("post_attention_layernorm", "input")
    if site not in sites:
        why = (" (attention and MLP run in parallel: there is no resid_mid)"
               if model_type == "gpt_neox" and site == "hook_resid_mid" else "")
        raise AmreproError(f"site '{site}' is not available for {model_type} models{why}; "
                           f"valid sites: {', '.join(s for s in ALL_SITES if s in sites)}.")
    return sites[site]


def check_target(target: Target, n_layers: int, width: int) -> None:
    """Range checks with the valid range in the message; width is the site's size (d_model or d_mlp). A feature's
    index is checked against its SAE's size, and its file against the width, where it is read (features.py)."""
    if not 0 <= target.block < n_layers:
        raise AmreproError(f"block {target.block} is out of range: the model has {n_layers} blocks "
                           f"(valid: 0..{n_layers - 1}; --layer L reads the residual stream before block L).")
    if not target.source and not 0 <= target.index < width:
        raise AmreproError(f"index {target.index} is out of range for {target.site}, which has {width} "
                           f"dimensions (valid: 0..{width - 1}).")
