"""Determinism: every switch is flipped here, and every random draw comes from an explicit generator derived
from a seed (never a global one). The streams, each apart from the others:
- a run's start vectors (adam): initial_embeddings below, torch.Generator(seed of the run);
- a run's start tokens and candidate swaps (pez, gcg, epo): methods.problem.Problem.generators, the same per-run seed;
- the primary null's pool of starts: nulls.pool_seed(--seed) (torch, for adam and the token methods alike);
- the nulls' Monte Carlo draws: nulls.null_models, numpy default_rng([--seed, 2]) (uniform) and [--seed, 3]
  (starts); the bootstrap intervals: metrics.reproducibility_stats, default_rng([--seed, 1]);
- --controls and their permutation test: specificity.py, default_rng([--seed, 7]) and [--seed, 8];
- --targets [random:K] of a sweep: sweep.parse_targets, default_rng([--seed, 0x5EE9, block, crc32(site)]).
"""

from __future__ import annotations

import os

import torch
import torch.utils.deterministic


def configure_determinism(device: torch.device) -> None:
    """Bit-identical results for the same seed on the same device and versions."""
    if device.type == "cuda":
        # cuBLAS needs a fixed workspace for deterministic GEMMs; must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would silently change the fp32 science
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    # torch.use_deterministic_algorithms(True) also sets the flag of the inductor compiler, which it imports
    # for that: ~1.5 s of every start, for a compiler amrepro never uses. The flag that eager kernels read is
    # this one; the public call stays the fallback should a torch release drop it.
    set_flag = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_flag is not None:
        set_flag(True, warn_only=False)
    else:
        torch.use_deterministic_algorithms(True)
    # Deterministic mode also fills every fresh torch.empty with NaN, a debugging aid that costs ~10% of a
    # GPT-2 step here (thousands of extra fill kernels). No kernel of ours reads memory it did not write, so
    # results do not change (the bit-identity tests hold with it off).
    torch.utils.deterministic.fill_uninitialized_memory = False


def initial_embeddings(seeds: list[int], n_tokens: int, std: float, d_model: int) -> torch.Tensor:
    """x_r ~ N(0, std) of shape [n_tokens, d_model] for each seed, stacked to [runs, n_tokens, d_model].

    Drawn on the CPU with one torch.Generator per seed, so run r's start depends on its seed alone (not on
    the batch it ran in, nor on the device it will be optimized on).
    """
    starts = [torch.randn(n_tokens, d_model, generator=torch.Generator(device="cpu").manual_seed(seed),
                          dtype=torch.float32) * std for seed in seeds]
    return torch.stack(starts)  # [runs, pos, d_model]
