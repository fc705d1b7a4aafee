"""bench/bench.py's full run (`amrepro run` timed end to end, split by part) against the current code: the
functions it wraps must be the ones `amrepro run` calls, or its MLflow share and parts silently read 0."""

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_bench", Path(__file__).parent.parent / "bench" / "bench.py")


def test_full_run_times_every_part_of_amrepro_run(tiny_gpt2, store, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # bench.py puts bench/ first on it: undone after the test
    bench = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(bench)
    from amrepro.tracking import Store

    before = Store.log_batch
    out = bench.full_run(tiny_gpt2, "cpu", runs=2, layer=2, dim=3, n_tokens=2, epochs=3, uri=store)
    assert out["runs_finished"] == 3  # the parent and its 2 seed runs, logged and ended
    # full_run raises when a part was never called; each part also took measurable time inside the wall
    assert all(out["parts_s"][part] > 0 for part in ("mlflow", "science", "figures", "dashboard")), out["parts_s"]
    assert {"create", "log_batch", "upload", "end"} <= set(out["mlflow_by_method_s"])
    assert 0 < out["mlflow_share"] < 1 and out["parts_s"]["other"] >= 0  # the parts do not overlap
    assert Store.log_batch is before  # the wrappers are gone
