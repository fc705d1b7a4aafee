"""The lean layout (amrepro/lean.py): one parent per target, a per-seed table and one seeds.npz; decode, reproduce,
figures, `amrepro log`, doctor and --resume read it as they read the seeds layout."""

import os
from pathlib import Path

from mlflow import MlflowClient

from forked import Amrepro
from helpers import all_runs, cli

SPEC = "blocks.4.hook_resid_pre[0:2],blocks.5.mlp.hook_post[random:1]"
ARGS = ["--runs", "2", "--epochs", "8", "--lr", "0.05"]


def _sweep_runs(uri):
    runs = all_runs(uri)
    (sweep,) = [r for r in runs if "targets" in r.data.params]
    return sweep, [r for r in runs if r.data.tags.get("amrepro.sweep") == sweep.info.run_id]


def test_lean_sweep_target_reads_back_decodes_and_reproduces(tiny_gpt2, store, monkeypatch):
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    from amrepro import lean

    # the store requests of the targets' own logging (each one HTTP request to a team server)
    calls, in_log = [], []

    def counting(name, original):
        def counted(self, *args, **kwargs):
            if in_log:
                calls.append(name)
            return original(self, *args, **kwargs)
        return counted

    def logging(*args, **kwargs):
        in_log.append(True)
        try:
            return log(*args, **kwargs)
        finally:
            in_log.clear()

    for name in ("get_run", "log_batch", "set_terminated", "log_artifacts"):
        monkeypatch.setattr(TrackingServiceClient, name, counting(name, getattr(TrackingServiceClient, name)))
    log = lean.log_target
    monkeypatch.setattr(lean, "log_target", logging)
    result = cli("sweep", "--model", tiny_gpt2, "--targets", SPEC, *ARGS)  # lean: the sweep's default
    assert result.exit_code == 0, result.output
    # per target one log_batch and one set_terminated; the upload goes straight to the artifact location that
    # create_run returned (no get_run, nor MlflowClient.log_artifacts' lookup of it)
    assert sorted(calls) == sorted(["log_batch", "set_terminated"] * 3)
    sweep, parents = _sweep_runs(store)
    assert sweep.info.status == "FINISHED" and sweep.data.tags["amrepro.layout"] == "lean" and len(parents) == 3
    client = MlflowClient(store)
    assert not [r for r in all_runs(store) if "run_index" in r.data.params]  # no seed runs at all
    parent = [p for p in parents if "," in p.data.tags["amrepro.batch"]][0]  # optimized in a batch of two
    assert parent.info.status == "FINISHED" and parent.data.tags["amrepro.layout"] == "lean"
    assert parent.data.params["target_name"] == parent.data.tags["amrepro.target"]
    assert "stats/n_unique_tokens" in parent.data.metrics and "stats/positional_agreement" not in parent.data.metrics
    # the UI's charts: one curve per seed, the true epochs, within the row budget
    curve = client.get_metric_history(parent.info.run_id, "act/target/seed-1")
    assert [m.step for m in curve] == list(range(8))
    rows = sum(len(client.get_metric_history(parent.info.run_id, k)) for k in parent.data.metrics)
    assert rows <= 1000
    # the per-seed table is a real MLflow table (what log_table writes), with the seeds' tokens
    table = client.load_table(parent.info.experiment_id, "seed_table.json", run_ids=[parent.info.run_id])
    assert list(table["seed"]) == [0, 1] and not table["diverged"].any() and table["tokens"].str.contains("|").all()
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"seeds.npz", "seed_table.json",
                                                                          "summary.json", "dashboard.html"}
    index = Path(client.download_artifacts(sweep.info.run_id, "dashboard.html")).read_text()  # links every target
    assert all(f"/runs/{p.info.run_id}/artifacts/dashboard.html" in index for p in parents)
    assert parent.data.tags["amrepro.headline"] in index
    decoded = cli("decode", parent.info.run_id)
    assert decoded.exit_code == 0 and "seed" in decoded.output, decoded.output
    again = cli("reproduce", parent.info.run_id)  # re-runs its batch of two targets: bit-identical
    assert again.exit_code == 0 and "reproduced: bit-identical" in again.output, again.output
    # figures on demand, into the target's own run
    drawn = cli("figures", parent.info.run_id)
    assert drawn.exit_code == 0, drawn.output
    paths = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/curves.png", "figures/token_grid.png"} <= paths
    assert cli("figures", sweep.info.run_id).exit_code == 2  # not a target: one sentence


def test_lean_run_store_failure_keeps_the_outcome_for_amrepro_log(tiny_gpt2, store, monkeypatch):
    original, seen = MlflowClient.log_batch, []

    def failing(self, run_id, *args, **kwargs):
        seen.append(run_id)
        if len(seen) == 2:  # the parent's params at its start, then the lean results fail
            raise RuntimeError("(sqlite3.OperationalError) disk I/O error")
        return original(self, run_id, *args, **kwargs)
    monkeypatch.setattr(MlflowClient, "log_batch", failing)
    result = cli("run", "--model", tiny_gpt2, "--runs", "3", "--epochs", "3", "--dim", "3", "--layout", "lean")
    assert result.exit_code == 3, result.output
    (path,) = Path("amrepro-outcomes").glob("*.npz")
    assert not any(r.info.status == "RUNNING" for r in all_runs(store))
    (parent,) = all_runs(store)
    assert cli("decode", parent.info.run_id).exit_code == 2  # KILLED before its seeds were logged: one sentence
    monkeypatch.setattr(MlflowClient, "log_batch", original)
    assert cli("log", str(path)).exit_code == 0
    (parent,) = all_runs(store)
    assert parent.info.status == "FINISHED" and parent.data.tags["amrepro.layout"] == "lean" and not path.exists()
    result = cli("reproduce", parent.info.run_id)
    assert result.exit_code == 0 and "reproduced: bit-identical" in result.output, result.output


def test_lean_sweep_killed_worker_doctor_and_resume(tiny_gpt2, store, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # the worker dies (os._exit, as a SIGKILL) before logging its second target (tests/worker_exit/sitecustomize.py,
    # run first in the child as a new interpreter would run it; forked.py: no second import of torch and MLflow)
    env.update(MLFLOW_TRACKING_URI=store, HF_HUB_OFFLINE="1", AMREPRO_TEST_EXIT_AFTER_CHILDREN="2",
               AMREPRO_TEST_EXIT_MARKER=str(tmp_path / "died"))
    spec = "blocks.4.hook_resid_pre[0:2]"
    proc = Amrepro(["sweep", "--model", tiny_gpt2, "--targets", spec, "--chunk", "1", "--runs", "2", "--epochs", "4"],
                   env, tmp_path, startup=Path(__file__).parent / "worker_exit" / "sitecustomize.py")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1 and (tmp_path / "died").exists(), stderr
    sweep, parents = _sweep_runs(store)
    (half,) = [p for p in parents if p.info.status == "RUNNING"]
    assert sweep.info.status == "RUNNING" and [p.info.status for p in parents].count("FINISHED") == 1
    result = cli("doctor")  # its process is gone: the sweep and the half-logged target end KILLED
    assert result.exit_code == 0 and "2 run(s) ended KILLED" in result.output.replace("\n", " "), result.output
    result = cli("decode", half.info.run_id)
    assert result.exit_code == 2 and "never logged" in result.output.replace("\n", " "), result.output

    result = cli("sweep", "--resume", sweep.info.run_id)
    assert result.exit_code == 0 and "1 already done, 1 to run" in result.output, result.output
    sweep, parents = _sweep_runs(store)
    assert sweep.info.status == "FINISHED" and len(parents) == 2
    assert all(p.info.status == "FINISHED" and p.data.tags["amrepro.layout"] == "lean" for p in parents)
    assert MlflowClient(store).get_run(half.info.run_id).info.lifecycle_stage == "deleted"
    for parent in parents:
        assert cli("decode", parent.info.run_id).exit_code == 0


def test_chart_curves_stay_within_the_row_budget():
    import torch

    from amrepro.parent_metrics import MAX_POINTS, chart_curves, curve_steps
    from amrepro.optimize import Result

    steps = curve_steps(500, MAX_POINTS)
    assert len(steps) == 50 and steps[0] == 0 and steps[-1] == 499  # the final value is exact
    def result(runs, diverged_at):
        return Result(seeds=list(range(runs)), initial=torch.zeros(runs, 1, 1), final=torch.zeros(runs, 1, 1),
                      loss=torch.randn(500, runs), activation=torch.randn(500, runs),
                      final_activation=torch.zeros(runs), diverged_at=torch.tensor(diverged_at))
    rows = chart_curves(result(10, [-1] * 9 + [100]), room=900)  # 10 seeds x 2 curves: 45 points each
    assert len(rows) <= 900 and {k for k, _, _ in rows} >= {"act/target/seed-0", "loss/total/seed-9"}
    assert max(step for k, _, step in rows if k == "act/target/seed-9") < 100  # a diverged seed stops before it
    assert max(step for k, _, step in rows if k == "act/target/seed-0") == 499
    many = chart_curves(result(600, [-1] * 600), room=900)  # too many seeds for curves each: one mean per key
    assert {k for k, _, _ in many} == {"loss/total/mean", "act/target/mean"} and len(many) == 100


def test_a_sweep_draws_figures_only_for_finished_targets_with_a_claim():
    from amrepro.lean import flagged
    from amrepro.stats import REPRODUCIBILITY

    claim = REPRODUCIBILITY[0].claim
    columns = {"target": ["a", "b", "c", "d"], "parent_run_id": ["1", "2", "3", None],
               "status": ["FINISHED", "FINISHED", "KILLED", "NOT RUN"],
               **{stat.claim: [None] * 4 for stat in REPRODUCIBILITY}}
    columns[claim] = [1.0, 0.0, 1.0, None]
    assert flagged(columns) == ["1"]
