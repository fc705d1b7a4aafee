"""Benchmark of `amrepro sweep`: the cost of many targets in one batch, and a whole sweep on Ray workers.

    python bench/sweep.py                                   # 64 targets x 10 seeds x 100 epochs at layer 8
    python bench/sweep.py --targets 8 --epochs 5 --skip-ratio   # smoke run
    python bench/sweep.py --skip-ratio --epochs 20 --tracking-targets 4   # both layouts' tracking, a lean sweep
    python bench/sweep.py --store team --skip-ratio --skip-sweep --epochs 20   # the same over HTTP (team server)

The model is GPT-2 small's shape with random weights (bench.write_model), the targets blocks.LAYER.hook_resid_pre
[random:TARGETS]. Figures (printed, and written to bench/results/sweep.json):

- ratio: seconds per target-seed-epoch of one TARGETS-target batch (TARGETS x RUNS rows, batch.execute_many) over
  that of a single-target `amrepro run` batch (RUNS rows, experiment.execute), on the same loaded model with the
  process's torch threads; per-epoch time from the on_epoch timestamps (first epoch left out: warm-up),
  interleaved REPEATS times, median of the ratios.
- sweep: `amrepro sweep` end to end (commands.sweep) with WORKERS local Ray workers of cores/WORKERS threads each
  on a fresh sqlite store: wall seconds, targets per hour, and the workers' time split into science (optimize,
  decode, statistics), tracking (run lookups, creation, logging incl. figures) and the rest (Ray start, model
  loading, scheduling, idle workers), as shares of workers x wall (--layout: lean, the sweep's default).
- tracking: per layout, an in-process sweep (no Ray) of TRACKING_TARGETS targets on a fresh sqlite store with every
  store request counted (each call of the tracking store that a REST client would send, one upload per artifact
  file as over HTTP): tracking seconds, store requests and metric rows per target (sweep-level calls included,
  shared out over the targets), with the seconds spent inside those requests and requests/s and metric rows/s
  of the workers' tracking time.

--store: sqlite (a fresh sqlite file per part) or team, the README's team server as tests/test_team.py starts it:
a throwaway PostgreSQL 15 (fsync on, as a real server) and `mlflow server` over HTTP on 127.0.0.1, artifacts
proxied, fresh per part and stopped after it; its requests are every HTTP request this process sends.
"""

from __future__ import annotations

import argparse
import contextlib
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
sys.path.insert(0, str(ROOT / "tests"))  # helpers.Postgres and start_mlflow_server: the team server of test_team.py


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
    from amrepro.experiment import batch_reader, prepare
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
        ones.append(run(batch_reader([single]), runs) / runs)
        manys.append(run(many, targets * runs) / (targets * runs))
    ratios = [m / o for m, o in zip(manys, ones)]
    return {"threads": torch.get_num_threads(), "epochs": epochs, "repeats": repeats,
            "seconds_per_target_seed_epoch_1": ones, f"seconds_per_target_seed_epoch_{targets}": manys,
            "ratios": ratios, "ratio": statistics.median(ratios)}


NOT_REQUESTS = ("shut_down_async_logging", "flush_async_logging", "end_async_logging")  # client-side only


class StoreCounter:
    """Counts the tracking store's requests in this process, and the seconds spent inside them. sqlite: the
    outermost calls of the sqlalchemy store's public methods (each one REST request to an `mlflow server`) and one
    per artifact file uploaded or listed; http (a team server): every HTTP request, by method and path."""

    def __init__(self, http: bool = False):
        import collections
        import threading

        from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        from amrepro.sweep import Worker

        self.calls, self._local, self._saved = collections.Counter(), threading.local(), []
        self.seconds = collections.Counter()  # seconds inside the counted calls, by name
        self.in_chunks = collections.Counter()  # the requests of Worker.run_chunk: the targets' own, per chunk
        self.in_chunks_seconds = 0.0
        if http:
            import requests

            self._wrap(requests.Session, "request", lambda *a, **k: 1, key=_http_key)
        else:
            for name in dir(SqlAlchemyStore):
                if not name.startswith("_") and callable(getattr(SqlAlchemyStore, name)):
                    self._wrap(SqlAlchemyStore, name, lambda *a, **k: 1)
            self._wrap(LocalArtifactRepository, "log_artifacts",
                       lambda self_, local_dir, *a, **k: sum(len(files) for _, _, files in os.walk(local_dir)))
            for name in ("log_artifact", "list_artifacts", "_download_file"):
                self._wrap(LocalArtifactRepository, name, lambda *a, **k: 1)
        original, counter = Worker.run_chunk, self

        def run_chunk(*args, **kwargs):
            before, seconds = counter.calls.copy(), sum(counter.seconds.values())
            try:
                return original(*args, **kwargs)
            finally:
                counter.in_chunks.update(counter.calls - before)
                counter.in_chunks_seconds += sum(counter.seconds.values()) - seconds
        self._saved.append((Worker, "run_chunk", original))
        Worker.run_chunk = run_chunk

    def _wrap(self, cls, name, weight, key=None):
        original = getattr(cls, name)
        local, calls, seconds = self._local, self.calls, self.seconds

        def counted(*args, **kwargs):
            depth = getattr(local, "depth", 0)
            counts = depth == 0 and name not in NOT_REQUESTS
            label = key(*args, **kwargs) if key else name
            if counts:
                calls[label] += weight(*args, **kwargs)
            local.depth, start = depth + 1, time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                local.depth = depth
                if counts:
                    seconds[label] += time.perf_counter() - start
        self._saved.append((cls, name, original))
        setattr(cls, name, counted)

    def restore(self):
        for cls, name, original in reversed(self._saved):
            setattr(cls, name, original)


def _http_key(session, method, url, *args, **kwargs) -> str:
    """'POST /api/2.0/mlflow/runs/create'; an artifact's own path left out (one key per kind of request)."""
    from urllib.parse import urlparse

    path = urlparse(url).path
    if "/mlflow-artifacts/artifacts/" in path:
        path = path[:path.index("/mlflow-artifacts/artifacts/")] + "/mlflow-artifacts/artifacts/..."
    return f"{method.upper()} {path}"


@contextlib.contextmanager
def fresh_store(kind: str, name: str):
    """(tracking URI, sql(query) -> first value) of an empty store, this process's working directory in a fresh
    folder: sqlite, a file there; team, a PostgreSQL 15 cluster and an `mlflow server` on it over HTTP (artifacts
    proxied into the folder), both stopped on the way out."""
    folder = Path(tempfile.mkdtemp(prefix=f"amrepro-{name}-"))
    os.chdir(folder)
    if kind == "sqlite":
        import sqlite3

        def sql(query):
            with contextlib.closing(sqlite3.connect(folder / "mlflow.db")) as con:
                return con.execute(query).fetchone()[0]
        yield f"sqlite:///{folder / 'mlflow.db'}", sql
        return
    from helpers import Postgres, free_port, start_mlflow_server

    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the server's backend is --backend-store-uri, not a last part's
    db, server = Postgres(fsync=True), None
    try:
        db.start()
        port = free_port()
        server = start_mlflow_server(db.uri, folder, port)
        yield f"http://127.0.0.1:{port}", lambda query: float(db.sql(query))
    finally:
        if server is not None:
            os.killpg(server.pid, 9)  # its own process group (start_mlflow_server): the server and its workers
            server.wait()
        db.remove()


def tracking(model: str, layer: int, targets: int, runs: int, epochs: int, layout: str, store: str = "sqlite") -> dict:
    """An in-process sweep (workers 0) of `targets` targets in one batch on a fresh store, every request counted."""
    with fresh_store(store, f"tracking-{layout}") as (uri, sql):
        os.environ["MLFLOW_TRACKING_URI"] = uri
        from amrepro.commands.sweep import sweep as run_sweep
        from amrepro.config import Config

        spec = f"blocks.{layer}.hook_resid_pre[random:{targets}]"
        counter = StoreCounter(http=store == "team")
        try:
            run_sweep(Config(model=model, runs=runs, epochs=epochs, threads=2), spec, workers=0, layout=layout)
        finally:
            counter.restore()
        # target parents and their seed runs (the sweep run is neither)
        rows = sql("SELECT COUNT(*) FROM metrics WHERE run_uuid IN (SELECT run_uuid FROM tags WHERE key IN "
                   "('amrepro.target', 'mlflow.parentRunId'))")
        tracking_s, science_s, summary_s = (sql(f"SELECT value FROM latest_metrics WHERE key = '{k}'")
                                            for k in ("time/tracking_seconds", "time/science_seconds",
                                                      "time/summary_seconds"))
    total, in_chunks = sum(counter.calls.values()), sum(counter.in_chunks.values())
    return {"store": store, "layout": layout, "spec": spec, "targets": targets, "runs": runs, "epochs": epochs,
            # the workers' tracking and the sweep run's summary (table, map, verdict, flagged figures)
            "tracking_seconds_per_target": (tracking_s + summary_s) / targets,
            "worker_tracking_seconds_per_target": tracking_s / targets, "summary_seconds": summary_s,
            "science_seconds_per_target": science_s / targets,
            # of the workers' tracking: the seconds inside store requests (waiting on the store, which a logging
            # thread could overlap with the science), the rest is building what is logged (npz, json, the page)
            "worker_request_seconds_per_target": counter.in_chunks_seconds / targets,
            "store_requests_per_target": total / targets,
            # the targets' own (run lookups, creation, logging) and the sweep's fixed cost (connect, the sweep run,
            # its table, map and flagged figures), which a 64-target sweep shares out 64 ways
            "target_requests_per_target": in_chunks / targets, "sweep_requests": total - in_chunks,
            "store_requests_per_target_in_64": in_chunks / targets + (total - in_chunks) / 64,
            "requests_of_targets": dict(counter.in_chunks.most_common()),
            "metric_rows_per_target": rows / targets,
            # rates of the workers' tracking time: requests (the targets' own) and metric rows per second
            "requests_per_second": in_chunks / tracking_s, "metric_rows_per_second": rows / tracking_s,
            "requests": dict(counter.calls.most_common()),
            "request_seconds": {k: round(v, 4) for k, v in counter.seconds.most_common()}, "uri": uri}


def sweep(model: str, layer: int, targets: int, runs: int, epochs: int, workers: int, layout: str = "lean",
          device: str = "cpu", store: str = "sqlite") -> dict:
    with fresh_store(store, "sweep-bench") as (uri, _):
        os.environ["MLFLOW_TRACKING_URI"] = uri
        from mlflow import MlflowClient

        from amrepro.commands.sweep import sweep as run_sweep
        from amrepro.config import Config

        spec = f"blocks.{layer}.hook_resid_pre[random:{targets}]"
        start = time.perf_counter()
        run_sweep(Config(model=model, runs=runs, epochs=epochs, device=device), spec, workers=workers, layout=layout)
        wall = time.perf_counter() - start
        client = MlflowClient(uri)
        (run,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()],
                                                max_results=5000) if "targets" in r.data.params]
    m = run.data.metrics
    slots = workers * m["time/wall_seconds"]
    return {"spec": spec, "layout": layout, "workers": workers, "threads_per_worker": int(run.data.params["threads"]),
            "command_wall_seconds": wall, "sweep_wall_seconds": m["time/wall_seconds"],
            "targets_per_hour": 3600 * targets / m["time/wall_seconds"],
            "science_seconds": m["time/science_seconds"], "tracking_seconds": m["time/tracking_seconds"],
            "share_science": m["time/science_seconds"] / slots, "share_tracking": m["time/tracking_seconds"] / slots,
            "share_ray_and_tracking": 1 - m["time/science_seconds"] / slots, "store": store}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--targets", type=int, default=64)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--ratio-epochs", type=int, default=4)
    parser.add_argument("--ratio-repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--layout", default="lean", choices=("lean", "seeds"))
    parser.add_argument("--tracking-targets", type=int, default=4, help="targets of each layout's counted sweep")
    parser.add_argument("--tracking-layouts", default="lean,seeds")
    parser.add_argument("--skip-tracking", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bench/gpu.sh: --workers 0, in-process)")
    parser.add_argument("--skip-ratio", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--store", default="sqlite", choices=("sqlite", "team"),
                        help="team: PostgreSQL 15 + `mlflow server` over HTTP (results: tracking_team, sweep_team)")
    parser.add_argument("--name", default="", help="appended to the results' keys (a repeat kept beside the first)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sweep.json"))
    args = parser.parse_args()
    from bench import busy_cpus, write_model

    from amrepro.provenance import cpu_name

    folder = Path(tempfile.mkdtemp(prefix="amrepro-gpt2-shape-"))
    write_model(folder)
    # the store's figures under their own keys (tracking, tracking_team, tracking_team_2, ...); ratio has no store
    suffix = ("" if args.store == "sqlite" else f"_{args.store}") + (f"_{args.name}" if args.name else "")
    out = {"args": vars(args), "command": " ".join(["python", *sys.argv]), "cpus": os.cpu_count(),
           "cpu_model": cpu_name(), "load_average_start": busy_cpus()}
    if not args.skip_tracking:
        parts = out["tracking" + suffix] = {}
        for layout in args.tracking_layouts.split(","):
            parts[layout] = tracking(str(folder), args.layer, args.tracking_targets, args.runs, args.epochs, layout,
                                     args.store)
            print(json.dumps(parts[layout], indent=2), flush=True)
    if not args.skip_ratio:
        out["ratio"] = ratio(str(folder), args.layer, args.targets, args.runs, args.ratio_epochs, args.ratio_repeats,
                             args.device)
        print(json.dumps(out["ratio"], indent=2), flush=True)
    if not args.skip_sweep:
        out["sweep" + suffix] = sweep(str(folder), args.layer, args.targets, args.runs, args.epochs, args.workers,
                                      args.layout, args.device, args.store)
        print(json.dumps(out["sweep" + suffix], indent=2), flush=True)
    out["load_average_end"] = busy_cpus()
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    # the parts run keep the others' last figures (another store's too), each part with its conditions
    ran = "+".join(part for part, skipped in (("ratio", args.skip_ratio), ("tracking", args.skip_tracking),
                                              ("sweep", args.skip_sweep)) if not skipped) + suffix
    conditions = ("args", "command", "load_average_start", "load_average_end")
    out = {**previous, **{k: v for k, v in out.items() if k not in conditions},
           f"{ran}_conditions": {k: out[k] for k in conditions}}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
