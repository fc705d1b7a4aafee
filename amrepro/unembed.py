"""The logits a target promotes: its direction in the residual stream times the unembedding W_U, the "logit
weight" of Neuronpedia / SAEDashboard feature pages (direct effect only: the final LayerNorm and the later
blocks are ignored, so it says what writing along the direction pushes the next-token prediction towards).

Only where it means something: a causal LM whose LM head is tied to the input embeddings (amrepro loads the
base model, without an untied head, so W_U = E.T), and a target that is a direction of the residual stream:
a hook_resid_* neuron i (the unit vector e_i), or a direction target on a hook_resid_* site (its .npy file or
random direction, normalized as features.py reads it). An SAE latent is left out: what it promotes is its
decoder row, which amrepro does not read (it reads only the encoder)."""

from __future__ import annotations

import torch

from .model import LoadedModel

TOP = 10  # tokens shown at each end


def target_direction(lm: LoadedModel, target) -> torch.Tensor | None:
    """The unit direction [d_model] the target reads in the residual stream, or None where it reads none."""
    from . import features

    if target.site not in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post") or target.kind == "sae":
        return None
    E, width = lm.embedding, lm.d_model
    if target.kind == "neuron":
        if not 0 <= target.index < width:
            return None
        return torch.nn.functional.one_hot(torch.tensor(target.index), width).to(E.device, E.dtype)  # [d_model]
    return features.readout([target], width).W[0].to(E.device, E.dtype)  # [d_model]: the row the run optimizes


@torch.no_grad()
def promoted_logits(lm: LoadedModel, target, top: int = TOP) -> dict | None:
    """{"top": [...], "bottom": [...]} of {id, token, logit}: the tokens whose logits the target's direction raises
    most and lowers most; None for an encoder, an untied LM head or a target that is not a residual direction."""
    from .methods.fluency import is_causal

    direction = target_direction(lm, target)
    if direction is None or not getattr(lm.model.config, "tie_word_embeddings", False):
        return None
    causal = getattr(lm, "_amrepro_causal", None)  # one probe forward per loaded model, not per target
    if causal is None:
        causal = lm._amrepro_causal = is_causal(lm)
    if not causal:
        return None
    logits = lm.embedding @ direction  # [vocab]: (d @ W_U) with W_U = E.T
    k = min(top, logits.numel())
    ends = {"top": torch.topk(logits, k), "bottom": torch.topk(-logits, k)}
    return {end: [{"id": int(i), "token": lm.token_strings([int(i)])[0], "logit": float(logits[i])}
                  for i in found.indices.tolist()] for end, found in ends.items()}
