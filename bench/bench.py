"""Benchmark: amrepro's engine against the reference notebook's loop and against the machine's GEMM rate.

    python bench/bench.py                      # the full benchmark (a few minutes on 2 CPU cores)
    python bench/bench.py --epochs 10 --repeats 2 --skip-full-run    # smoke run, < 1 minute
    python bench/bench.py --device cuda        # the same figures on a GPU
    python bench/bench.py --epochs 10 --repeats 1 --full-epochs 20 --out /tmp/bench.json   # + a short full run

One process, one run. The model is GPT-2 small's shape (GPT2Config() defaults) with random weights -- the cost
does not depend on the weight values -- saved with save_pretrained and loaded through amrepro.model.load_model,
so the engine runs its real code path. Figures (printed as a table, written to --out, by default
bench/results/latest.json):

- ms per seed-step: one Adam step of one seed. Reference: bench/reference.py (the notebook: full 12-layer HF
  forward with hidden_states, batch 1, weights left trainable). Engine: amrepro.optimize.optimize with the
  reader from amrepro.readers.site_reader, all RUNS seeds batched (time of a whole optimize call, including its
  final no-grad forward, divided by epochs x runs). Medians over REPEATS, reference and engine interleaved so
  that both see the same background load; both extrapolated to RUNS x 500 epochs.
- GFLOP/s: the experiment's matmul FLOPs counted analytically (forward through the blocks the target needs,
  plus the input-gradient backward; no weight gradients) over the engine's step time, as a fraction of two
  fp32 GEMM rooflines measured in the same process: a 2048^3 matmul (the best of torch.mm and, on the CPU,
  oneDNN), and the step's own GEMMs (RUNS x N_TOKENS = 50 rows against each weight, both directions), each
  at the best rate any of amrepro's kernels reaches on that shape (step_roofline). The second is the one a
  50-row step can approach; the first is the machine's peak.
- the GEMM kernel: amrepro.kernels chooses it by measurement (the engine line names it); --kernel all also
  times the engine with each kernel forced, interleaved, to check that the probe picked the fastest.
- the full run: `amrepro run` (amrepro.commands.run.run, the seeds layout, RUNS x 500 epochs) in this process
  on a fresh sqlite store in a temp folder, its wall time split by wrapping, from here, the functions that do
  each part (run_parts): the MLflow share (every method of tracking.Store, the only code that talks to the
  store), the figures (figures.render: building and PNG rendering; their upload is MLflow's), the dashboard
  (dashboard.page), the science (experiment.prepare and execute), provenance, the outcome file, and the rest.
  The store is created (and mlflow imported) once before the timed run; those one-off costs are reported on
  their own lines. --full-epochs shortens it for a quick check; tests/test_bench.py runs it on a tiny model.
- peak RSS of each phase (VmHWM, reset between phases where Linux allows), `amrepro --help` start-up time.

Noise: on a shared 2-core VM a busy neighbour stalls every 2-thread OpenMP kernel (load average is recorded
at both ends; compare runs only when it stayed low). The reference is also memory-bound (it streams and
accumulates 0.5 GB of weight gradients per step) and swings between ~90 and ~140 ms/seed-step from one
process to the next on the same machine, while the compute-bound engine moves by ~10%: quote the ratio with
its conditions, and every repeat is in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import io
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the working tree's amrepro, also when it is not installed
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import reference  # noqa: E402  (bench/reference.py)
from amrepro import kernels  # noqa: E402
from amrepro.config import Config  # noqa: E402
from amrepro.experiment import batch_reader, prepare  # noqa: E402
from amrepro.objectives import reference_loss  # noqa: E402
from amrepro.optimize import optimize  # noqa: E402
from amrepro.readers import HookedReader  # noqa: E402
from amrepro.seeding import initial_embeddings  # noqa: E402

FULL_EPOCHS = 500  # the figure users care about: RUNS seeds x 500 epochs


# --- timing helpers ---------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds of fn(), with the device drained before and after (CUDA kernels run asynchronously)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last reset_peak_rss() (VmHWM), else since start."""
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def busy_cpus() -> float:
    """CPUs kept busy by *other* processes is what makes a shared machine noisy: report the load average."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# --- the model --------------------------------------------------------------------------------------------------
def write_model(folder: Path) -> None:
    """GPT-2 small's shape with random weights, and a small byte-level BPE tokenizer (no network here).
    Token ids beyond the tokenizer's vocabulary decode to '' -- decoding is not what is measured."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2Model, GPT2TokenizerFast

    torch.manual_seed(0)
    GPT2Model(GPT2Config()).save_pretrained(folder)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["activation maximization of one neuron, from many seeds. " * 50], vocab_size=300,
                            min_frequency=1, special_tokens=["<|endoftext|>"])
    GPT2TokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                      unk_token="<|endoftext|>").save_pretrained(folder)


def experiment_flops(cfg, layer: int, runs: int, n_tokens: int) -> dict:
    """Matmul FLOPs of one step for target blocks.LAYER.hook_resid_pre (= resid_post of block LAYER-1), as
    amrepro computes it: LAYER-1 full blocks, then block LAYER-1 with only one column of its MLP output
    projection; the backward is the input gradient only (dx = dy @ W^T: the same FLOPs as the forward GEMM;
    attention: 2 matmuls forward, 4 backward). Elementwise work (layer norm, GELU, softmax, Adam) is not counted."""
    D, M = cfg.n_embd, runs * n_tokens  # M: rows of every GEMM (all runs and positions batched)
    d_mlp = cfg.n_inner or 4 * D
    attention = 2 * runs * n_tokens * n_tokens * D  # q@k^T or att@v over all heads: 2*R*H*P*P*hd
    weights_full = D * 3 * D + D * D + D * d_mlp + d_mlp * D  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    weights_last = weights_full - d_mlp * D + d_mlp  # one column of mlp.c_proj
    gemm = 2 * M * ((layer - 1) * weights_full + weights_last)
    forward = gemm + layer * 2 * attention
    backward = gemm + layer * 4 * attention
    return {"forward": forward, "backward": backward, "total": forward + backward}


def gemm_roofline(device: torch.device, repeats: int) -> dict:
    """fp32 GFLOP/s of a 2048^3 matmul: torch.mm (MKL on CPU, cuBLAS without TF32 on CUDA) and, on the CPU,
    oneDNN with a pre-packed weight (what the engine's GEMMs use). The roofline is the better of the two."""
    n = 2048
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    rates = {}
    candidates = {"torch.mm": lambda: torch.mm(a, b)}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), n)
        candidates["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    for name, fn in candidates.items():
        fn()
        rates[name] = 2 * n**3 / statistics.median(timed(fn, device) for _ in range(max(5, repeats))) / 1e9
    return {"gflops_by_kernel": rates, "gflops": max(rates.values()), "best": max(rates, key=rates.get)}


def kernel_rates(rows: int, d_in: int, d_out: int, device: torch.device, repeats: int) -> dict[str, float]:
    """fp32 GFLOP/s of x [rows, d_in] @ W [d_in, d_out] + b with each GEMM kernel the engine may use
    (amrepro.kernels: oneDNN and MKL with pre-packed weights, plain addmm; only plain on CUDA), interleaved."""
    w, b = torch.randn(d_in, d_out, device=device), torch.randn(d_out, device=device)
    x = torch.randn(rows, d_in, device=device)
    names = [k for k in kernels.KERNELS if kernels.available(k)] if device.type == "cpu" else ["plain"]
    linears = {k: kernels.Linear(w, b, rows, k) for k in names}
    calls = max(1, int(2e8 / (2 * rows * d_in * d_out)))  # ~0.2 GFLOP per timing: small GEMMs take ~0.1 ms
    times: dict[str, list[float]] = {k: [] for k in names}
    for k in names:
        linears[k](x)  # warm-up: oneDNN creates its primitive on the first call
    for _ in range(max(5, repeats)):
        for k, lin in linears.items():
            times[k].append(timed(lambda: [lin(x) for _ in range(calls)], device) / calls)
    return {k: 2 * rows * d_in * d_out / statistics.median(t) / 1e9 for k, t in times.items()}


def step_roofline(cfg, layer: int, runs: int, n_tokens: int, device: torch.device, repeats: int) -> dict:
    """The roofline of the step's own GEMMs: every weight GEMM the engine runs in one step (forward x @ W and
    input gradient dy @ W^T, with runs x n_tokens rows), each at the best rate any kernel reaches on its shape,
    measured here. GFLOP/s = their FLOPs over the sum of those best times (attention's tiny bmm not included)."""
    D, M = cfg.n_embd, runs * n_tokens
    d_mlp = cfg.n_inner or 4 * D
    # (d_in, d_out): how many forward GEMMs of that shape one step runs; each has a backward of (d_out, d_in)
    forward = {(D, 3 * D): layer, (D, D): layer, (D, d_mlp): layer, (d_mlp, D): layer - 1}
    counts: dict[tuple[int, int], int] = {}
    for (i, o), n in forward.items():
        for shape in ((i, o), (o, i)):
            counts[shape] = counts.get(shape, 0) + n
    shapes, flops, seconds = [], 0.0, 0.0
    for (i, o), n in counts.items():
        if n == 0:
            continue
        rates = kernel_rates(M, i, o, device, repeats)
        best = max(rates, key=rates.get)
        flops += n * 2 * M * i * o
        seconds += n * 2 * M * i * o / (rates[best] * 1e9)
        shapes.append({"rows": M, "in": i, "out": o, "count": n, "gflops_by_kernel": rates, "best": best})
    return {"gflops": flops / seconds / 1e9, "gemm_flops": flops, "gemm_s": seconds, "shapes": shapes}


# --- the two loops ----------------------------------------------------------------------------------------------
class Engine:
    """amrepro's science path, as experiment.execute runs it: prepare -> batch_reader -> initial embeddings ->
    optimize.

    The reader stays open across timed repeats, as it does across the epochs of one real run: its one-off
    set-up (packing the weights, ~0.2 s here) belongs to a run, not to a step; the full run includes it."""

    def __init__(self, model: str, device: str, runs: int, layer: int, dim: int, n_tokens: int, hooked: bool):
        self.config = Config(model=model, layer=layer, dim=dim, runs=runs, n_tokens=n_tokens, device=device)
        self.prep = prepare(self.config)
        lm = self.prep.lm
        # hooked: the generic path (HF modules under autograd, stopped at the target) for comparison
        self.site_reader = HookedReader(lm, self.prep.target) if hooked else batch_reader([self.prep])
        self.start = initial_embeddings(self.config.seeds, n_tokens, lm.embedding_std(), lm.d_model)
        self.reader = type(self.site_reader).__name__
        self.read = self.site_reader.__enter__()

    def close(self) -> None:
        self.site_reader.__exit__(None, None, None)

    def run(self, epochs: int):
        c = self.config
        return optimize(self.read, self.start, reference_loss(c.l2), c.seeds, epochs, c.lr, self.prep.lm.device)

    def seconds_per_seed_step(self, epochs: int) -> float:
        return timed(lambda: self.run(epochs), self.prep.lm.device) / (epochs * self.config.runs)


class Reference:
    """bench/reference.py on the same saved weights, one seed at a time (batch 1), as the notebook runs."""

    def __init__(self, model: str, device: str, start: torch.Tensor, layer: int, dim: int):
        self.device = torch.device(device)
        self.model = reference.load_reference_model(model, self.device)
        self.start, self.layer, self.dim = start, layer, dim

    def run(self, epochs: int) -> torch.Tensor:
        return reference.reference_train(self.model, self.start, self.layer, self.dim, epochs)

    def seconds_per_seed_step(self, epochs: int) -> float:
        return timed(lambda: self.run(epochs), self.device) / epochs


# --- the full run with MLflow -------------------------------------------------------------------------------------
def store_methods() -> list[str]:
    """The methods of amrepro.tracking.Store, the only code that talks to MLflow: connecting and every public
    method (listed from the class, so that a method added later is timed too)."""
    import inspect

    from amrepro.tracking import Store

    public = [name for name, fn in vars(Store).items() if inspect.isfunction(fn) and not name.startswith("_")]
    return ["__init__", *public]


def run_parts() -> dict[str, tuple[object, list[str]]]:
    """What a full run's wall time is split into: part -> (module or class, the functions timed). `amrepro run`
    looks each of them up on its module when it calls it, so wrapping the module's attribute times every call.
    The parts do not nest; the rest of the wall time is "other" (Context's bookkeeping, hashing, printing)."""
    from amrepro import dashboard, experiment, figures, outcome_file, provenance, tracking

    return {"mlflow": (tracking.Store, store_methods()),  # every store request, the figures' upload included
            "science": (experiment, ["prepare", "execute"]),  # load, optimize, decode, statistics and nulls
            "figures": (figures, ["render"]),  # building the seeds layout's figures and rendering their PNGs
            "dashboard": (dashboard, ["page"]),  # dashboard.html
            "provenance": (provenance, ["environment", "pip_freeze"]),
            "outcome_file": (outcome_file, ["save"])}  # the results kept on disk until the last store write


@contextlib.contextmanager
def timing_wrappers(targets: dict[str, tuple[object, list[str]]]):
    """Wrap obj.attr for every (obj, attrs) in targets so that calls add their seconds to times[group][attr] and
    count in calls[group]; nested calls within one group count once (in the outermost). A name the object does
    not have is an AttributeError: the bench no longer matches amrepro. Restores everything on exit."""
    times: dict[str, dict[str, float]] = {group: {} for group in targets}
    calls = {group: 0 for group in targets}
    depth = {group: 0 for group in targets}
    saved = []

    def wrap(group, name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            depth[group] += 1
            calls[group] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[group] -= 1
                if depth[group] == 0:
                    times[group][name] = times[group].get(name, 0.0) + time.perf_counter() - start
        return wrapper

    try:
        for group, (obj, names) in targets.items():
            for name in names:
                fn = getattr(obj, name)
                saved.append((obj, name, fn))
                setattr(obj, name, wrap(group, name, fn))
        yield times, calls
    finally:
        for obj, name, fn in reversed(saved):
            setattr(obj, name, fn)


def full_run(model: str, device: str, runs: int, layer: int, dim: int, n_tokens: int, epochs: int,
             uri: str | None = None) -> dict:
    """`amrepro run` (amrepro.commands.run.run, the seeds layout) in this process, on a fresh sqlite store in a
    temp folder (uri: a given store instead; tests pass one whose tables exist), its wall time split into
    run_parts(). A part that was never called means amrepro moved it: an error, not a 0 in the figures."""
    from amrepro.commands.run import run
    from amrepro.tracking import Store

    folder = Path(tempfile.mkdtemp(prefix="amrepro-bench-run-"))
    keep_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
                                                "MLFLOW_EXPERIMENT_NAME", "AMREPRO_OUTCOMES")}
    keep_cwd = os.getcwd()
    try:
        os.chdir(folder)  # ./mlruns artifacts and ./amrepro-outcomes land in the temp folder
        for key in keep_env:
            os.environ.pop(key, None)
        os.environ["MLFLOW_TRACKING_URI"] = uri or f"sqlite:///{folder / 'mlflow.db'}"
        start = time.perf_counter()
        importlib.import_module("mlflow")  # paid once per `amrepro run` process; reported on its own
        import_s = time.perf_counter() - start
        start = time.perf_counter()
        Store()  # a fresh sqlite store creates its tables: once per store, not per run (the run's Store connects)
        store_s = time.perf_counter() - start

        config = Config(model=model, layer=layer, dim=dim, runs=runs, epochs=epochs, n_tokens=n_tokens,
                        device=device)
        reset_peak_rss()
        # no progress lines or token table (stdout); warnings still reach stderr
        with timing_wrappers(run_parts()) as (times, calls), contextlib.redirect_stdout(io.StringIO()):
            wall = timed(lambda: run(config), torch.device(device))
        rss = peak_rss_mb()
        never = [group for group, n in calls.items() if n == 0]
        if never:
            raise RuntimeError(f"`amrepro run` never called the functions timed as {', '.join(never)}: update "
                               "bench/bench.py's run_parts() to where amrepro does that work now.")
        logged = Store().search(None, "attributes.status = 'FINISHED'")
        mlflow_s = sum(times["mlflow"].values())
        parts = {group: sum(t.values()) for group, t in times.items()}
        parts["other"] = wall - sum(parts.values())
        return {"wall_s": wall, "mlflow_s": mlflow_s, "mlflow_share": mlflow_s / wall,
                "mlflow_share_with_import": (mlflow_s + import_s) / (wall + import_s),
                "mlflow_by_method_s": {k: round(v, 4) for k, v in sorted(times["mlflow"].items(),
                                                                          key=lambda kv: -kv[1])},
                "parts_s": {k: round(v, 4) for k, v in parts.items()},
                "shares": {k: round(v / wall, 4) for k, v in parts.items()}, "calls": calls,
                "runs_finished": len(logged), "mlflow_import_s": import_s, "store_creation_s": store_s,
                "peak_rss_mb": rss}
    finally:
        os.chdir(keep_cwd)
        for key, value in keep_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(folder, ignore_errors=True)


def help_startup(repeats: int) -> dict:
    """Wall time of `amrepro --help` in a fresh process (the installed script, else python -m amrepro)."""
    exe = shutil.which("amrepro")
    command = [exe, "--help"] if exe else [sys.executable, "-m", "amrepro", "--help"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True, env=env, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return {"command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(command)),
            "median_s": statistics.median(times), "all_s": times}


# --- main -------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--runs", type=int, default=10, help="seeds optimized as one batch by the engine")
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--dim", type=int, default=91)
    parser.add_argument("--n-tokens", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40, help="engine epochs per timed repeat")
    parser.add_argument("--ref-epochs", type=int, default=0, help="reference epochs per repeat (default: epochs/2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (medians are reported)")
    parser.add_argument("--hooked", action="store_true", help="also time the generic HookedReader engine")
    parser.add_argument("--kernel", default="auto", choices=("auto", "all", *kernels.KERNELS),
                        help="the engine's GEMM kernel: auto = chosen by amrepro's probe (what a run does); all = "
                             "auto, and each kernel forced, timed interleaved (does the probe pick the fastest?)")
    parser.add_argument("--skip-full-run", action="store_true", help="skip the RUNS x 500 run with MLflow")
    parser.add_argument("--full-epochs", type=int, default=FULL_EPOCHS, help="epochs of that run (quick checks)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    args = parser.parse_args()
    if args.layer < 1:
        parser.error("--layer must be at least 1 (layer 0 is the input itself: nothing to compute)")
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device here.")
        # deterministic cuBLAS needs its workspace fixed before the first GEMM (here: the roofline's), as
        # amrepro.seeding does for a normal run
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    ref_epochs = args.ref_epochs or max(2, args.epochs // 2)
    load_start = busy_cpus()
    out: dict = {"args": vars(args), "machine": {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}}

    roofline = gemm_roofline(device, args.repeats)
    with tempfile.TemporaryDirectory(prefix="amrepro-bench-model-") as model_dir:
        write_model(Path(model_dir))
        reset_peak_rss()
        if args.kernel not in ("auto", "all"):
            kernels.force(args.kernel)
        engine = Engine(model_dir, args.device, args.runs, args.layer, args.dim, args.n_tokens, hooked=False)
        engine.run(3)  # warm-up: chooses the kernel, packs the weights, first-touch allocations
        out["engine_peak_rss_mb"] = peak_rss_mb()
        out["engine_kernel"] = getattr(engine.site_reader, "kernel", None)
        out["kernel_tags"] = kernels.tags()
        forced = {}  # --kernel all: one more engine per kernel, its weights packed for that kernel
        if args.kernel == "all" and device.type == "cpu":
            for k in (k for k in kernels.KERNELS if kernels.available(k)):
                kernels.force(k)
                forced[k] = Engine(model_dir, args.device, args.runs, args.layer, args.dim, args.n_tokens, False)
                forced[k].run(3)
            kernels.force(None)
        flops = experiment_flops(engine.prep.lm.model.config, args.layer, args.runs, args.n_tokens)
        ref = Reference(model_dir, args.device, engine.start[0], args.layer, args.dim)
        ref.run(2)  # warm-up
        hooked = None
        if args.hooked:
            hooked = Engine(model_dir, args.device, args.runs, args.layer, args.dim, args.n_tokens, hooked=True)
            hooked.run(2)

        engine_s, ref_s, hooked_s = [], [], []
        forced_s: dict[str, list[float]] = {k: [] for k in forced}
        for _ in range(args.repeats):  # interleaved: every figure sees the same background load
            ref_s.append(ref.seconds_per_seed_step(ref_epochs))
            engine_s.append(engine.seconds_per_seed_step(args.epochs))
            if hooked:
                hooked_s.append(hooked.seconds_per_seed_step(args.epochs))
            for k, e in forced.items():
                forced_s[k].append(e.seconds_per_seed_step(args.epochs))
        for e in forced.values():
            e.close()
        del forced

        # the same science: engine run 0 and the reference from the same start after the same steps
        check_epochs = ref_epochs
        diff = float((engine.run(check_epochs).final[0] - ref.run(check_epochs).cpu()).abs().max())
        out["with_reference_peak_rss_mb"] = peak_rss_mb()
        if hooked:
            hooked.close()
        del ref, hooked
        gc.collect()

        step = statistics.median(engine_s) * args.runs  # seconds per step of all runs
        cfg = engine.prep.lm.model.config
        own = step_roofline(cfg, args.layer, args.runs, args.n_tokens, device, args.repeats)
        ref_ms, engine_ms = 1e3 * statistics.median(ref_s), 1e3 * statistics.median(engine_s)
        out.update({
            "reference_ms_per_seed_step": ref_ms, "reference_ms_all": [1e3 * s for s in ref_s],
            "engine_ms_per_seed_step": engine_ms, "engine_ms_all": [1e3 * s for s in engine_s],
            "engine_reader": engine.reader,
            "hooked_ms_per_seed_step": 1e3 * statistics.median(hooked_s) if hooked_s else None,
            "speedup": ref_ms / engine_ms,
            "speedup_min_over_min": min(ref_s) / min(engine_s),
            "reference_s_for_full": ref_ms / 1e3 * args.runs * FULL_EPOCHS,
            "engine_s_for_full": engine_ms / 1e3 * args.runs * FULL_EPOCHS,
            "max_abs_diff_vs_reference": diff, "diff_epochs": check_epochs,
            "flops_per_step": flops, "achieved_gflops": flops["total"] / step / 1e9,
            "roofline": roofline, "roofline_fraction": flops["total"] / step / 1e9 / roofline["gflops"],
            "roofline_step_shapes": own, "step_roofline_fraction": flops["total"] / step / 1e9 / own["gflops"],
            "engine_ms_by_forced_kernel": {k: 1e3 * statistics.median(v) for k, v in forced_s.items()},
            "engine_ms_all_by_forced_kernel": {k: [1e3 * t for t in v] for k, v in forced_s.items()},
        })
        engine.close()
        del engine
        gc.collect()
        if not args.skip_full_run:
            out["full_run"] = full_run(model_dir, args.device, args.runs, args.layer, args.dim, args.n_tokens,
                                       args.full_epochs)
    out["help"] = help_startup(max(3, args.repeats))
    out["loadavg"] = {"start": load_start, "end": busy_cpus()}
    if device.type == "cuda":
        out["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print_table(out, args)


def print_table(out: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    full = f"{args.runs} x {FULL_EPOCHS}"
    table = Table(title=f"amrepro benchmark ({out['machine']['device']}, {out['machine']['cpus']} CPUs, "
                        f"torch {out['machine']['torch']})", header_style="bold")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target / note")
    table.add_row("reference ms / seed-step", f"{out['reference_ms_per_seed_step']:.1f}",
                  f"{full}: {out['reference_s_for_full']:.0f} s")
    table.add_row(f"engine ms / seed-step ({out['engine_reader']}, {out['engine_kernel']})",
                  f"{out['engine_ms_per_seed_step']:.2f}",
                  f"{full}: {out['engine_s_for_full']:.0f} s")
    if out["hooked_ms_per_seed_step"]:
        table.add_row("engine ms / seed-step (HookedReader)", f"{out['hooked_ms_per_seed_step']:.2f}", "generic path")
    table.add_row("speed-up (medians)", f"{out['speedup']:.1f}x",
                  f">= 15x; best-of: {out['speedup_min_over_min']:.1f}x")
    table.add_row("max |engine - reference|", f"{out['max_abs_diff_vs_reference']:.1e}",
                  f"after {out['diff_epochs']} steps, same start")
    table.add_row("GFLOP / step (fwd + input bwd)", f"{out['flops_per_step']['total'] / 1e9:.2f}", "matmuls only")
    table.add_row("achieved GFLOP/s", f"{out['achieved_gflops']:.0f}", "")
    rates = ", ".join(f"{k} {v:.0f}" for k, v in out["roofline"]["gflops_by_kernel"].items())
    table.add_row("GEMM roofline GFLOP/s (2048^3)", f"{out['roofline']['gflops']:.0f}", rates)
    table.add_row("fraction of roofline (2048^3)", f"{out['roofline_fraction']:.2f}", "")
    own = out["roofline_step_shapes"]
    shape = ", ".join(f"{s['in']}->{s['out']} {s['best']} {s['gflops_by_kernel'][s['best']]:.0f}" for s in own["shapes"])
    table.add_row(f"GEMM roofline GFLOP/s (the step's {own['shapes'][0]['rows']}-row GEMMs)", f"{own['gflops']:.0f}",
                  f"best kernel per shape: {shape}")
    table.add_row("fraction of the step-shape roofline", f"{out['step_roofline_fraction']:.2f}", ">= 0.7")
    for k, ms in out["engine_ms_by_forced_kernel"].items():
        table.add_row(f"engine ms / seed-step, {k} forced", f"{ms:.2f}", "")
    if "full_run" in out:
        f = out["full_run"]
        table.add_row(f"amrepro run {args.runs} x {args.full_epochs} wall s", f"{f['wall_s']:.1f}",
                      ", ".join(f"{k} {v:.1f} s" for k, v in f["parts_s"].items()))
        table.add_row("MLflow share of the run", f"{100 * f['mlflow_share']:.1f}%",
                      f"<= 5%; {100 * f['mlflow_share_with_import']:.1f}% with `import mlflow` "
                      f"({f['mlflow_import_s']:.1f} s)")
        table.add_row("shares of the run", "", ", ".join(f"{k} {100 * v:.1f}%" for k, v in f["shares"].items()))
        table.add_row("new sqlite store (once per store)", f"{f['store_creation_s']:.1f} s", "not in the share")
        table.add_row("peak RSS, amrepro run (MB)", f"{f['peak_rss_mb']:.0f}", "")
    table.add_row("peak RSS, engine alone (MB)", f"{out['engine_peak_rss_mb']:.0f}", "model + packed weights")
    table.add_row("peak RSS, + reference (MB)", f"{out['with_reference_peak_rss_mb']:.0f}", "")
    table.add_row("`amrepro --help` s", f"{out['help']['median_s']:.2f}", "< 1 s")
    table.add_row("load average start / end", f"{out['loadavg']['start']:.1f} / {out['loadavg']['end']:.1f}",
                  "other processes on the machine")
    Console().print(table)


if __name__ == "__main__":
    main()
