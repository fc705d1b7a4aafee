"""Benchmark of `amrepro sweep`: the cost of many targets in one batch, and a whole sweep on Ray workers.

    python bench/sweep.py                                   # 64 targets x 10 seeds x 100 epochs at layer 8
    python bench/sweep.py --layer 2 --ratio-epochs 6        # what bench/results/sweep.json holds (see README)
    python bench/sweep.py --targets 8 --epochs 5 --skip-ratio   # smoke run

The model is GPT-2 small's shape with random weights (bench.write_model), the targets blocks.LAYER.hook_resid_pre
[random:TARGETS]. Figures (printed, and written to bench/results/sweep.json):

- ratio: seconds per target-seed-epoch of one TARGETS-target batch (TARGETS x RUNS rows) over that of a
  single-target run (RUNS rows), both through batch.execute_many on the same loaded model with the process's
  torch threads; per-epoch time from the on_epoch timestamps (first epoch left out: warm-up), median.
- sweep: `amrepro sweep` end to end (commands.sweep) with WORKERS local Ray workers of cores/WORKERS threads each
  on a fresh sqlite store: wall seconds, targets per hour, and the workers' time split into science (optimize,
  decode, statistics), tracking (run lookups, creation, logging incl. figures) and the rest (Ray start, model
  loading, scheduling, idle workers), as shares of workers x wall.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def epoch_seconds(preps, execute_many) -> float:
    stamps = []
    execute_many(preps, on_epoch=lambda epoch: stamps.append(time.perf_counter()))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(gaps)


def ratio(model: str, layer: int, targets: int, runs: int, epochs: int) -> dict:
    import torch

    from amrepro.batch import execute_many, prepare_many
    from amrepro.config import Config
    from amrepro.model import load_model
    from amrepro.sweep import parse_targets

    lm = load_model(model, torch.device("cpu"))
    config = Config(model=model, runs=runs, epochs=epochs)
    chosen = parse_targets(f"blocks.{layer}.hook_resid_pre[random:{targets}]", lambda b, s: lm.d_model,
                           lm.n_layers, seed=0)
    one = epoch_seconds(prepare_many(config, chosen[:1], lm), execute_many)
    many = epoch_seconds(prepare_many(config, chosen, lm), execute_many)
    per_one, per_many = one / runs, many / (targets * runs)
    return {"threads": torch.get_num_threads(), "epochs": epochs, "epoch_seconds_1_target": one,
            f"epoch_seconds_{targets}_targets": many, "seconds_per_target_seed_epoch_1": per_one,
            f"seconds_per_target_seed_epoch_{targets}": per_many, "ratio": per_many / per_one}


def sweep(model: str, layer: int, targets: int, runs: int, epochs: int, workers: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="amrepro-sweep-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    os.chdir(folder)
    from mlflow import MlflowClient

    from amrepro import commands
    from amrepro.config import Config

    spec = f"blocks.{layer}.hook_resid_pre[random:{targets}]"
    start = time.perf_counter()
    commands.sweep(Config(model=model, runs=runs, epochs=epochs), spec, workers=workers)
    wall = time.perf_counter() - start
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=5000)
              if "targets" in r.data.params]
    m = run.data.metrics
    slots = workers * m["time/wall_seconds"]
    return {"spec": spec, "workers": workers, "threads_per_worker": int(run.data.params["threads"]),
            "command_wall_seconds": wall, "sweep_wall_seconds": m["time/wall_seconds"],
            "targets_per_hour": 3600 * targets / m["time/wall_seconds"],
            "science_seconds": m["time/science_seconds"], "tracking_seconds": m["time/tracking_seconds"],
            "share_science": m["time/science_seconds"] / slots, "share_tracking": m["time/tracking_seconds"] / slots,
            "share_ray_and_tracking": 1 - m["time/science_seconds"] / slots, "store": str(folder)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--targets", type=int, default=64)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--ratio-epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-ratio", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sweep.json"))
    args = parser.parse_args()
    from bench import busy_cpus, write_model

    folder = Path(tempfile.mkdtemp(prefix="amrepro-gpt2-shape-"))
    write_model(folder)
    out = {"args": vars(args), "cpus": os.cpu_count(), "load_average_start": busy_cpus()}
    if not args.skip_ratio:
        out["ratio"] = ratio(str(folder), args.layer, args.targets, args.runs, args.ratio_epochs)
        print(json.dumps(out["ratio"], indent=2), flush=True)
    if not args.skip_sweep:
        out["sweep"] = sweep(str(folder), args.layer, args.targets, args.runs, args.epochs, args.workers)
        print(json.dumps(out["sweep"], indent=2), flush=True)
    out["load_average_end"] = busy_cpus()
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
