"""Benchmark of `amrepro sweep`: the cost of many targets in one batch, and a whole sweep on Ray workers.

    python bench/sweep.py                                   # 64 targets x 10 seeds x 100 epochs at layer 8
    python bench/sweep.py --targets 8 --epochs 5 --skip-ratio   # smoke run

The model is GPT-2 small's shape with random weights (bench.write_model), the targets blocks.LAYER.hook_resid_pre
[random:TARGETS]. Figures (printed, and written to bench/results/sweep.json):

- ratio: seconds per target-seed-epoch of one TARGETS-target batch (TARGETS x RUNS rows, batch.execute_many) over
  that of a single-target `amrepro run` batch (RUNS rows, experiment.execute), on the same loaded model with the
  process's torch threads; per-epoch time from the on_epoch timestamps (first epoch left out: warm-up),
  interleaved REPEATS times, median of the ratios.
- sweep: `amrepro sweep` end to end (commands.sweep) with WORKERS local Ray workers of cores/WORKERS threads each
  on a fresh sqlite store: wall seconds, targets per hour, and the workers' time split into science (optimize,
  decode, statistics), tracking (run lookups, creation, logging incl. figures) and the rest (Ray start, model
  loading, scheduling, idle workers), as shares of workers x wall.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def epoch_seconds(run) -> float:
    """Median seconds between consecutive epochs of run(on_epoch) (the first epoch, with its set-up, left out)."""
    stamps = []
    run(lambda epoch: stamps.append(time.perf_counter()))
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def ratio(model: str, layer: int, targets: int, runs: int, epochs: int, repeats: int, device: str = "cpu") -> dict:
    """The optimization of a single-target `amrepro run` batch (RUNS rows, the reader experiment.prepare builds)
    and of a TARGETS-target batch (TARGETS x RUNS rows, the per-row-index reader batch.execute_many builds),
    interleaved REPEATS times so that both see the same background load; the ratio of each pair, median.
    Decoding and statistics are left out: they are per target and do not depend on the batch."""
    import torch

    from amrepro.config import Config
    from amrepro.experiment import prepare
    from amrepro.model import load_model
    from amrepro.objectives import reference_loss
    from amrepro.optimize import optimize
    from amrepro.readers import site_reader
    from amrepro.seeding import initial_embeddings
    from amrepro.sweep import parse_targets

    lm = load_model(model, torch.device(device))
    config = Config(model=model, runs=runs, epochs=epochs, device=device)
    chosen = parse_targets(f"blocks.{layer}.hook_resid_pre[random:{targets}]", lambda b, s: lm.d_model,
                           lm.n_layers, seed=0)
    single = prepare(dataclasses.replace(config, target=chosen[0].name), lm=lm)
    start = initial_embeddings(config.seeds, config.n_tokens, lm.embedding_std(), lm.d_model)  # [runs, pos, d]

    def run(reader, rows: int):
        def go(on_epoch):
            with reader as r:
                optimize(r, start.repeat(rows // runs, 1, 1), reference_loss(config.l2), config.seeds * (rows // runs),
                         epochs, config.lr, lm.device, on_epoch)
        return epoch_seconds(go)

    many = site_reader(lm, chosen[0], index=[t.index for t in chosen for _ in range(runs)])
    ones, manys = [], []
    for _ in range(repeats):
        ones.append(run(single.reader, runs) / runs)
        manys.append(run(many, targets * runs) / (targets * runs))
    ratios = [m / o for m, o in zip(manys, ones)]
    return {"threads": torch.get_num_threads(), "epochs": epochs, "repeats": repeats,
            "seconds_per_target_seed_epoch_1": ones, f"seconds_per_target_seed_epoch_{targets}": manys,
            "ratios": ratios, "ratio": statistics.median(ratios)}


def sweep(model: str, layer: int, targets: int, runs: int, epochs: int, workers: int, device: str = "cpu") -> dict:
    folder = Path(tempfile.mkdtemp(prefix="amrepro-sweep-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    os.chdir(folder)
    from mlflow import MlflowClient

    from amrepro import commands
    from amrepro.config import Config

    spec = f"blocks.{layer}.hook_resid_pre[random:{targets}]"
    start = time.perf_counter()
    commands.sweep(Config(model=model, runs=runs, epochs=epochs, device=device), spec, workers=workers)
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
    parser.add_argument("--ratio-epochs", type=int, default=4)
    parser.add_argument("--ratio-repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bench/gpu.sh: --workers 0, in-process)")
    parser.add_argument("--skip-ratio", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sweep.json"))
    args = parser.parse_args()
    from bench import busy_cpus, write_model

    folder = Path(tempfile.mkdtemp(prefix="amrepro-gpt2-shape-"))
    write_model(folder)
    out = {"args": vars(args), "cpus": os.cpu_count(), "load_average_start": busy_cpus()}
    if not args.skip_ratio:
        out["ratio"] = ratio(str(folder), args.layer, args.targets, args.runs, args.ratio_epochs, args.ratio_repeats,
                             args.device)
        print(json.dumps(out["ratio"], indent=2), flush=True)
    if not args.skip_sweep:
        out["sweep"] = sweep(str(folder), args.layer, args.targets, args.runs, args.epochs, args.workers, args.device)
        print(json.dumps(out["sweep"], indent=2), flush=True)
    out["load_average_end"] = busy_cpus()
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    if args.skip_ratio or args.skip_sweep:  # a part run alone keeps the other part's last figures
        out = {**previous, **{k: v for k, v in out.items() if k not in ("args", "load_average_start",
                                                                        "load_average_end")},
               f"{'sweep' if args.skip_ratio else 'ratio'}_conditions": {
                   k: out[k] for k in ("args", "load_average_start", "load_average_end")}}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
