"""Writes tests/data/sae/{standard,jumprelu,topk}: tiny random SAEs in SAELens's on-disk format (SAELens 6's
SAE.save_model: cfg.json = SAEConfig.to_dict(), sae_weights.safetensors = the state dict W_enc [d_in, d_sae],
W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in], and threshold [d_sae] for JumpReLU), for blocks.8.hook_resid_pre
of the tiny GPT-2 (d_model 32). Written with safetensors + json only; re-run to regenerate.

Checked against sae-lens 6.54.12 (pip, in a throwaway venv): its save_model writes the same two files with the
same weight names and shapes and the same cfg.json keys as here (plus TopK's rescale_acts_by_decoder_norm), its
SAE.load_from_disk loads these folders as StandardSAE / JumpReLUSAE / TopKSAE, and its encode() agrees with
amrepro's reader on every latent (tests/data/sae/saelens_encode.npz holds its output; test_features.py checks it).

    python tests/make_sae_fixture.py

    python tests/make_sae_fixture.py [--saelens]
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

D_IN, D_SAE, HOOK = 32, 16, "blocks.8.hook_resid_pre"
ROOT = Path(__file__).parent / "data" / "sae"


def write(arch: str, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(D_SAE, D_IN, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)  # unit decoder rows, as SAELens initializes and folds them
    if arch == "topk":  # rows of other norms, so that rescale_acts_by_decoder_norm matters
        W_dec *= 0.5 + torch.rand(D_SAE, 1, generator=g)
    weights = {"W_enc": W_dec.T.contiguous() * 0.5, "W_dec": W_dec,
               "b_enc": 0.1 * torch.randn(D_SAE, generator=g), "b_dec": 0.1 * torch.randn(D_IN, generator=g)}
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", "architecture": arch,
           "metadata": {"model_name": "tiny-gpt2", "hook_name": HOOK, "hook_head_index": None, "context_size": 5,
                    "prepend_bos": False, "dataset_path": None, "sae_lens_version": "6.54.12",
                    "sae_lens_training_version": "6.54.12"}}
    if arch == "jumprelu":
        weights["threshold"] = 0.05 + 0.05 * torch.rand(D_SAE, generator=g)
    if arch == "topk":
        cfg.update(k=4, rescale_acts_by_decoder_norm=True)
    if arch == "standard":
        cfg["apply_b_dec_to_input"] = False  # both settings are exercised
    folder = ROOT / arch
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def saelens_reference() -> Path:
    """SAELens's own encode() of the three folders on fixed inputs, saved for test_features.py. Needs sae-lens,
    which amrepro does not install: run it in a throwaway venv (`pip install sae-lens`)."""
    import numpy as np
    from sae_lens import SAE

    x = torch.randn(3, 4, D_IN, generator=torch.Generator().manual_seed(0))  # [runs, pos, d_in]
    out = {"x": x.numpy()}
    for arch in ("standard", "jumprelu", "topk"):
        with torch.no_grad():
            out[arch] = SAE.load_from_disk(str(ROOT / arch), device="cpu").encode(x).numpy()  # [3, 4, d_sae]
    np.savez_compressed(ROOT / "saelens_encode.npz", **out)
    return ROOT / "saelens_encode.npz"


if __name__ == "__main__":
    import sys

    for seed, arch in enumerate(("standard", "jumprelu", "topk")):
        print(write(arch, seed))
    if "--saelens" in sys.argv:  # python tests/make_sae_fixture.py --saelens, where sae-lens is installed
        print(saelens_reference())
