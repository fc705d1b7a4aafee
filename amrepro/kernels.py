"""Which CPU GEMM kernel the GPT-2 fast path (gpt2.py) uses: chosen by measurement, once per process.

The step's GEMMs are small (runs x pos = 50 rows against 768 x 3072 weights), so how a kernel streams the
weights matters more than its peak rate, and which kernel wins depends on the CPU: on an AMD EPYC oneDNN with
pre-packed weights is 2-4x MKL (whose AVX-512 paths are Intel-only), on an Intel Xeon MKL's own packed GEMM
can win. So no kernel is chosen by vendor: the first reader of a process times each candidate on its own
weights and row count (a block's four weights, both directions: every GEMM shape of the step) and the whole
process keeps the fastest. The measurement is cached per CPU model, torch, threads and shapes
($AMREPRO_CACHE/kernels.json, default ~/.cache/amrepro), so that every process on the machine (a sweep's Ray
workers, a later `amrepro run`) makes the same choice, hence the same bits, without probing.

Candidates (CPU; CUDA always uses plain: cuBLAS reads a transposed operand at full speed):
- onednn: weights reordered once into oneDNN's blocked layout (torch.ops.mkldnn._linear_pointwise);
- mkl:    weights packed once for MKL's cblas_sgemm_compute (torch.ops.mkl._mkl_linear);
- plain:  addmm on the weights as stored (torch's BLAS, MKL sgemm in the x86 wheels).

Kernels round differently, so the bits depend on the choice: the same device, thread count and kernel give the
same bits. The choice is an environment tag (tags(): env.kernels), and `amrepro reproduce` forces the logged
one (as_logged) instead of probing again. AMREPRO_KERNELS=onednn|mkl|plain forces a kernel (tests, bench).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

from .provenance import cpu_name

KERNELS = ("onednn", "mkl", "plain")
# The probe is a fraction of a second of GEMMs, and its choice is cached for good: on a busy machine it can pick
# a kernel 4% "faster" that is 2.4x slower in the real step (measured here: mkl chosen at 519 vs 539 ms, then
# 11.9 vs 4.9 ms per seed-step, AMD EPYC). So oneDNN, the engine's kernel before the probe existed, stays unless
# another kernel takes at most PROBE_MARGIN of its time.
PROBE_DEFAULT, PROBE_MARGIN = "onednn", 0.8
ENV_VAR = "AMREPRO_KERNELS"
TAG = "env.kernels"
_PROBE_ROUNDS = 5  # interleaved rounds; the fastest round of each kernel counts (robust to a busy neighbour)
_PROBE_BUDGET_S = 1.0  # fewer rounds when the shapes are large (GCG's 1920-row GEMMs)

_state: dict = {"forced": None, "chosen": None, "probe": None}


def available(kernel: str) -> bool:
    if kernel == "onednn":
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    if kernel == "mkl":
        return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    return kernel == "plain"


def _check(kernel: str, where: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"{where}: unknown GEMM kernel {kernel!r}; use one of {', '.join(KERNELS)}.")
    return kernel


def force(kernel: str | None) -> None:
    """Use this kernel from now on in this process (None: choose by measurement again)."""
    _state["forced"] = None if kernel is None else _check(kernel, "force")
    _state["chosen"] = None


@contextlib.contextmanager
def as_logged(tags: dict[str, str]):
    """Within: the kernel a logged run used (its env.* tags), instead of a new probe; `reproduce` runs in here.
    Runs logged before the tag existed used oneDNN on the CPU whenever it was available, so they get that; a
    run that logged 'none' (chosen after its tags were written, e.g. in a sweep's workers) gets the choice
    cached for this machine, as its workers did. (CUDA ignores it: it always uses plain.)"""
    logged = tags.get(TAG) or "onednn"
    saved = dict(_state)
    if logged in KERNELS:
        force(logged if available(logged) else "plain")
    try:
        yield logged
    finally:
        _state.update(saved)


def forced() -> str | None:
    """force() (reproduce's logged kernel) first, then $AMREPRO_KERNELS; None: choose by measurement."""
    env = os.environ.get(ENV_VAR)
    return _state["forced"] or (_check(env, ENV_VAR) if env else None)


def tags() -> dict[str, str]:
    """env.kernels: the kernel this process's GPT-2 fast path used ('none' before any), and what the probe
    measured (ms per round of the step's GEMMs) when it was measured."""
    out = {TAG: _state["chosen"] or forced() or "none"}
    if _state["probe"]:
        out["env.kernels_probe"] = ", ".join(f"{k} {v:.2f} ms" for k, v in _state["probe"].items())
    return out


class Linear:
    """x @ W + b for a Conv1D weight W [in, out], and its input gradient dy @ W^T, with one kernel.

    Packed kernels reorder W^T and W once, for `rows`-row inputs (other row counts stay correct: oneDNN only
    loses its layout hint, MKL falls back to its plain GEMM). The packed copies cost 2x the weight's memory."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, rows: int, kernel: str):
        self.weight, self.bias, self.kernel, self.rows = weight, bias, kernel, rows  # [in, out], [out]
        if kernel == "onednn":
            reorder = torch.ops.mkldnn._reorder_linear_weight
            self.w_fwd = reorder(weight.t().contiguous(), rows)  # [out, in] blocked: y = x @ W + b
            self.w_bwd = reorder(weight.contiguous(), rows)  # [in, out] blocked: dx = dy @ W^T
        elif kernel == "mkl":
            self.t_fwd, self.t_bwd = weight.t().contiguous(), weight.contiguous()  # [out, in], [in, out]
            self.w_fwd = torch.ops.mkl._mkl_reorder_linear_weight(self.t_fwd, rows)
            self.w_bwd = torch.ops.mkl._mkl_reorder_linear_weight(self.t_bwd, rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [n, in] -> [n, out]
        if self.kernel == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.w_fwd, self.bias, "none", [], "")
        if self.kernel == "mkl":
            return torch.ops.mkl._mkl_linear(x, self.w_fwd, self.t_fwd, self.bias, self.rows)
        return torch.addmm(self.bias, x, self.weight)

    def grad(self, dy: torch.Tensor) -> torch.Tensor:  # [n, out] -> [n, in]
        if self.kernel == "onednn":
            return torch.ops.mkldnn._linear_pointwise(dy, self.w_bwd, None, "none", [], "")
        if self.kernel == "mkl":
            return torch.ops.mkl._mkl_linear(dy, self.w_bwd, self.t_bwd, None, self.rows)
        return dy @ self.weight.t()


def choose(device: torch.device, weights: list[tuple[torch.Tensor, torch.Tensor]], rows: int) -> str:
    """plain on CUDA; else the forced kernel; else this process's choice; else the fastest (cached) on these
    (weight [in, out], bias [out]) pairs with `rows`-row inputs."""
    if device.type != "cpu":
        return "plain"
    kernel = forced()
    if kernel is not None:
        if not available(kernel):
            raise ValueError(f"GEMM kernel {kernel!r} is not available in this torch build.")
        _state["chosen"] = kernel
        return kernel
    if _state["chosen"] is None:
        key = (f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {rows} rows | "
               + " ".join("x".join(map(str, w.shape)) for w, _ in weights))
        path = Path(os.environ.get("AMREPRO_CACHE") or "~/.cache/amrepro").expanduser() / "kernels.json"
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
        measured = cache.get(key) or probe(weights, rows)
        if not all(available(k) for k in measured):  # a cache written by another torch build
            measured = probe(weights, rows)
        if key not in cache:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({**cache, key: measured}, indent=1))
                tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one
            except OSError:
                pass  # no cache: the next process probes again
        _state["probe"] = measured
        _state["chosen"] = pick(measured)
    return _state["chosen"]


def pick(measured: dict[str, float]) -> str:
    """The fastest kernel of a probe, unless it beats PROBE_DEFAULT by less than the margin (noise)."""
    best = min(measured, key=measured.get)
    if PROBE_DEFAULT in measured and measured[best] > PROBE_MARGIN * measured[PROBE_DEFAULT]:
        return PROBE_DEFAULT
    return best


def probe(weights: list[tuple[torch.Tensor, torch.Tensor]], rows: int) -> dict[str, float]:
    """Milliseconds of one round of every GEMM of these weights (forward and input gradient) with `rows`-row
    inputs, per available kernel: the fastest of up to _PROBE_ROUNDS interleaved rounds."""
    linears = {k: [Linear(w, b, rows, k) for w, b in weights] for k in KERNELS if available(k)}
    gen = torch.Generator().manual_seed(0)
    xs = [(torch.randn(rows, w.shape[0], generator=gen), torch.randn(rows, w.shape[1], generator=gen))
          for w, _ in weights]  # [rows, in], [rows, out]

    def one_round(kernel: str) -> float:
        start = time.perf_counter()
        for lin, (x, dy) in zip(linears[kernel], xs):
            lin(x)
            lin.grad(dy)
        return time.perf_counter() - start

    best = {k: one_round(k) for k in linears}  # warm-up (first calls create oneDNN primitives)
    best = {k: one_round(k) for k in linears}
    rounds = min(_PROBE_ROUNDS, max(1, int(_PROBE_BUDGET_S / max(sum(best.values()), 1e-9))))
    for _ in range(rounds - 1):
        for k in linears:
            best[k] = min(best[k], one_round(k))
    return {k: 1e3 * v for k, v in best.items()}
