"""`amrepro sweep` in this process on a sqlite store: the layout reads back, --resume skips finished targets.
(Ray, PostgreSQL and a real mlflow server: tests/test_team.py.)"""

import json
import os
import signal
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import pytest
from mlflow import MlflowClient

from amrepro.config import AmreproError, Config
from amrepro.sweep import chunks, parse_targets
from amrepro.targets import Target
from forked import Amrepro
from helpers import all_runs, children_of, cli, failing_log_batch, owned_by, wait_for

SPEC = "blocks.4.hook_resid_pre[0:2],blocks.5.mlp.hook_post[random:1]"
ARGS = ["--runs", "2", "--epochs", "8", "--lr", "0.05", "--layout", "seeds"]  # lean: tests/test_lean.py


def _width(block, site):
    return 128 if site == "mlp.hook_post" else 32


def test_target_spec():
    spec = "blocks.4.hook_resid_pre[0:3],blocks.5.mlp.hook_post[random:4], blocks.4.hook_resid_pre[1]"
    targets = parse_targets(spec, _width, 10, seed=0)
    assert targets[:3] == [Target(4, "hook_resid_pre", i) for i in range(3)] and len(targets) == 7  # dup dropped
    drawn = [t.index for t in targets[3:]]
    assert drawn == [t.index for t in parse_targets(spec, _width, 10, seed=0)[3:]]  # reproducible from the seed
    assert drawn != [t.index for t in parse_targets(spec, _width, 10, seed=1)[3:]]
    assert [len(c) for c in chunks(targets, 2)] == [2, 1, 2, 2]  # a batch never mixes sites
    # targets of one site are optimized together wherever --targets lists them (issue 17 §6), in the user's order
    mixed = parse_targets("blocks.4.hook_resid_pre[2],blocks.5.mlp.hook_post[0],blocks.4.hook_resid_pre[0:2]",
                          _width, 10, seed=0)
    assert [[t.name for t in c] for c in chunks(mixed, 64)] == [
        ["blocks.4.hook_resid_pre[2]", "blocks.4.hook_resid_pre[0]", "blocks.4.hook_resid_pre[1]"],
        ["blocks.5.mlp.hook_post[0]"]]
    assert [len(c) for c in chunks(mixed, 2)] == [2, 1, 1]
    for bad, why in (("blocks.4.hook_resid_pre[0:33]", "0 <= a < b <= 32"), ("blocks.12.hook_resid_pre[0]", "block 12"),
                     ("blocks.4.resid[0]", "cannot read"), ("blocks.4.hook_resid_pre[random:0]", "1 to 32")):
        with pytest.raises(AmreproError, match=why):
            parse_targets(bad, _width, 10, seed=0)


def _sweep_runs(uri):
    runs = all_runs(uri)
    (sweep,) = [r for r in runs if "targets" in r.data.params]
    parents = [r for r in runs if r.data.tags.get("amrepro.sweep") == sweep.info.run_id]
    return sweep, parents


def test_the_sweep_summary_says_the_chance_level_once_and_groups_the_claims():
    """The one line a sweep prints (and tags as its verdict): the chance level and the binomial test said once,
    each claim once, grouped into those above chance and those within it (issue 20 §3: the same clause was
    repeated for every claim)."""
    from amrepro.stats import CLAIMS
    from amrepro.sweep import summary

    n = 8
    columns = {"target": [f"t{i}" for i in range(n)], "status": ["FINISHED"] * n}
    for stat in CLAIMS:  # every target claims agreement; one target of 8 claims each of the others
        columns[stat.claim] = [1.0] * n if stat.claim == "agreement_above_chance" else [1.0] + [0.0] * (n - 1)
    metrics, words = summary(columns)
    assert words.count("5%") == 1 and words.count("binomial") == 1 and words.count("chance explains") == 1
    p = {s.claim: f"{metrics[f'sweep/pvalue_{s.claim}']:.2g}" for s in CLAIMS}
    above, within = words.split("More targets than chance explains: ")[1].split(". Within chance: ")
    assert above == f"positional agreement 8/8 (100%, p = {p['agreement_above_chance']})"
    assert within.rstrip(".").split("; ") == [f"{s.label} 1/8 ({1 / 8:.0%}, p = {p[s.claim]})"
                                              for s in CLAIMS if s.claim != "agreement_above_chance"]
    assert words.startswith("8 of 8 targets with statistics; chance alone passes about 5% of targets per claim")


def test_sweep_table_reads_parents_logged_before_and_after_the_headline_metrics(capsys):
    """Parents logged before issue 20 have every statistic as a metric; newer ones have the headline metrics,
    rounded, and the sweep table's statistics exact in the tag amrepro.table_row: both give the same exact row."""
    from amrepro.parent_metrics import HEADLINE_METRICS, TABLE_ROW_TAG, shown
    from amrepro.parent_metrics import TABLE_COLUMNS
    from amrepro.sweep import table
    from amrepro.tracking import RunRecord

    exact = {key: k + 1 / 7 for k, key in enumerate(TABLE_COLUMNS.values())}  # 9+ decimals, as logged before
    exact.update({key: 1.0 for key in TABLE_COLUMNS.values() if key.startswith("verdict/")})
    headline = {k: shown(v) for k, v in exact.items() if k in HEADLINE_METRICS}
    old = RunRecord("old", "1", "old", "FINISHED", "active", {}, {}, {**exact, "runs/ok": 2.0})
    new = RunRecord("new", "1", "new", "FINISHED", "active", {}, {TABLE_ROW_TAG: json.dumps(exact)}, headline)
    edited = RunRecord("edited", "1", "edited", "FINISHED", "active", {}, {TABLE_ROW_TAG: "{not json"}, headline)
    targets = [Target(4, "hook_resid_pre", i) for i in range(4)]
    columns = table(targets, {t.name: run for t, run in zip(targets, (old, new, edited))})
    assert columns["status"] == ["FINISHED", "FINISHED", "FINISHED", "NOT RUN"]
    assert headline["stats/n_unique_tokens"] != exact["stats/n_unique_tokens"]  # the metric is rounded
    for name, key in TABLE_COLUMNS.items():
        assert columns[name][0] == columns[name][1] == exact[key]  # exact, whichever way the parent was logged
        assert columns[name][3] is None
    # a tag edited by hand: that row keeps the run's headline metrics, and the sweep says why
    assert columns["agreement"][2] is None and columns["n_unique_tokens"][2] == headline["stats/n_unique_tokens"]
    assert "amrepro.table_row of run edited is not JSON" in capsys.readouterr().err


def test_sweep_layout_reads_back(tiny_gpt2, store, monkeypatch):
    result = cli("sweep", "--model", tiny_gpt2, "--targets", SPEC, *ARGS)
    assert result.exit_code == 0, result.output
    sweep, parents = _sweep_runs(store)
    assert sweep.info.status == "FINISHED" and sweep.data.params["targets"] == SPEC
    names = [t.name for t in parse_targets(SPEC, _width, 10, seed=0)]
    assert sorted(p.data.tags["amrepro.target"] for p in parents) == sorted(names)
    client = MlflowClient(store)
    for parent in parents:  # what `amrepro run --target T` logs, nested under the sweep run
        target = parent.data.tags["amrepro.target"]
        assert parent.info.status == "FINISHED" and parent.data.tags["mlflow.parentRunId"] == sweep.info.run_id
        assert Config.from_params(parent.data.params) == Config(model=tiny_gpt2, target=target, runs=2, epochs=8, lr=0.05,
                                                                figures=False)  # the suite's AMREPRO_FIGURES=0
        assert parent.info.run_name == f"tiny-gpt2 {target} x2"
        assert "stats/n_unique_tokens" in parent.data.metrics and "sha256/summary.json" in parent.data.tags
        kids = children_of(store, parent.info.run_id)
        assert [c.data.params["seed"] for c in kids] == ["0", "1"] and all(c.info.status == "FINISHED" for c in kids)
        assert len(client.get_metric_history(kids[0].info.run_id, "loss/total")) == 8
    table = json.loads(Path(client.download_artifacts(sweep.info.run_id, "sweep_table.json")).read_text())
    rows = {row[table["columns"].index("target")]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert list(rows) == names
    exact = {p.info.run_id: json.loads(Path(client.download_artifacts(p.info.run_id, "summary.json")).read_text())
             ["statistics"]["metrics"] for p in parents}  # every statistic; the parent's metrics: the headline
    for parent in parents:
        row = rows[parent.data.tags["amrepro.target"]]
        assert row["parent_run_id"] == parent.info.run_id
        # (log_table writes JSON with 10 decimals)
        assert row["agreement"] == pytest.approx(exact[parent.info.run_id]["stats/positional_agreement"], abs=1e-9)
        assert row["p_jaccard"] == pytest.approx(exact[parent.info.run_id]["pvalue/jaccard_decoded_starts"], abs=1e-9)
    claimed = sum(m["verdict/agreement_above_chance"] for m in exact.values())
    assert sweep.data.metrics["sweep/n_targets"] == 3
    assert sweep.data.metrics["sweep/frac_agreement_above_chance"] == claimed / 3
    assert "targets with statistics" in sweep.data.tags["verdict"]
    assert "sweep_map.png" in {a.path for a in client.list_artifacts(sweep.info.run_id)}
    index = Path(client.download_artifacts(sweep.info.run_id, "dashboard.html")).read_text()
    for parent in parents:  # one row per target, linking to its dashboard, with its headline
        assert f"/runs/{parent.info.run_id}/artifacts/dashboard.html" in index
        assert parent.data.tags["amrepro.headline"] in index
    # a target parent is a parent for decode/reproduce, although it is nested under the sweep run
    decoded = cli("decode", parents[0].info.run_id)
    assert decoded.exit_code == 0, decoded.output
    # reproduce re-runs the target's whole batch (its amrepro.batch tag), since a batch of another shape may
    # round differently (on GPT-2's shapes it does, ~1e-7): bit-identical, not merely close
    import amrepro.experiment

    batched = [p for p in parents if "," in p.data.tags["amrepro.batch"]][0]
    rerun, original = [], amrepro.experiment.execute_many
    monkeypatch.setattr(amrepro.experiment, "execute_many", lambda preps, *a: rerun.append(preps) or original(preps, *a))
    again = cli("reproduce", batched.info.run_id)
    assert again.exit_code == 0 and "reproduced: bit-identical" in again.output, again.output
    assert [[p.target.name for p in preps] for preps in rerun] == [["blocks.4.hook_resid_pre[0]",
                                                                     "blocks.4.hook_resid_pre[1]"]]


def test_resume_skips_finished_targets(tiny_gpt2, store, monkeypatch):
    # a sweep stopped (Ctrl-C) after its first target and one seed run of the second; a worker that dies outright
    # is tests/test_team.py's
    import amrepro.layout

    logged, log_seed_run = [], amrepro.layout.log_seed_run

    def stop_after_three(*args):
        log_seed_run(*args)
        logged.append(1)
        if len(logged) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(amrepro.layout, "log_seed_run", stop_after_three)
    spec = "blocks.4.hook_resid_pre[0:2]"
    stopped = cli("sweep", "--model", tiny_gpt2, "--targets", spec, "--chunk", "1", *ARGS)
    assert stopped.exit_code == 130, stopped.output
    # the worker's runs are counted too: the first target's parent and 2 seed runs, the second's 1 seed run
    # kept; the sweep run and the second parent KILLED
    assert "4 finished run(s) kept, 2 unfinished run(s) marked KILLED" in " ".join(stopped.output.split())
    sweep, parents = _sweep_runs(store)
    assert sweep.info.status == "KILLED"
    (finished,) = [p for p in parents if p.info.status == "FINISHED"]
    (half,) = [p for p in parents if p.info.status == "KILLED"]
    assert len(children_of(store, half.info.run_id)) == 1
    monkeypatch.setattr(amrepro.layout, "log_seed_run", log_seed_run)

    # issue 17 §3: while a process that owns one of the sweep's runs is alive here (this test's own), --resume is
    # refused in one sentence and touches nothing; a process on another host needs --force; a dead one proceeds
    owned_by(store, half.info.run_id, os.getpid())
    refused = cli("sweep", "--resume", sweep.info.run_id)
    assert refused.exit_code == 2 and (f"run {half.info.run_id} is still being written by amrepro process "
                                       f"{os.getpid()} on this host" in " ".join(refused.output.split()))
    assert MlflowClient(store).get_run(half.info.run_id).info.lifecycle_stage == "active"
    assert MlflowClient(store).get_run(sweep.info.run_id).info.status == "KILLED"
    owned_by(store, half.info.run_id, os.getpid(), host="another-host")
    refused = cli("sweep", "--resume", sweep.info.run_id)
    assert refused.exit_code == 2 and "cannot be checked from" in refused.output and "--force" in refused.output
    dead = subprocess.Popen(["true"])
    dead.wait()
    owned_by(store, half.info.run_id, dead.pid)

    result = cli("sweep", "--resume", sweep.info.run_id, "--epochs", "999")  # science options come from the sweep
    assert result.exit_code == 0, result.output
    assert "2 targets x 2 seeds, 1 already done, 1 to run" in result.output
    sweep, parents = _sweep_runs(store)
    assert sweep.info.status == "FINISHED"
    assert sorted(p.data.tags["amrepro.target"] for p in parents) == [f"blocks.4.hook_resid_pre[{i}]" for i in range(2)]
    assert all(p.info.status == "FINISHED" for p in parents)
    kept = [p for p in parents if p.info.run_id == finished.info.run_id]
    assert kept and kept[0].info.end_time == finished.info.end_time  # skipped, not redone
    gone = MlflowClient(store).get_run(half.info.run_id)  # the half-logged parent: KILLED, in the trash
    assert gone.info.status == "KILLED" and gone.info.lifecycle_stage == "deleted"
    assert "redone" in gone.data.tags["error"]
    for parent in parents:
        assert len(children_of(store, parent.info.run_id)) == 2 and parent.data.params["epochs"] == "8"
    assert sweep.data.metrics["sweep/n_finished"] == 2
    assert cli("sweep", "--resume", sweep.info.run_id).exit_code == 2  # a finished sweep has nothing to resume


# --- issue 17: refused before anything exists: a cluster that does not answer, workers that cannot fit ------

def test_an_unreachable_ray_cluster_is_one_sentence_within_seconds(tiny_gpt2, store):
    """ray.init retries an address that does not answer for minutes, printing its own warnings."""
    import time

    from helpers import free_port

    started = time.time()
    result = cli("sweep", "--model", tiny_gpt2, "--targets", SPEC, "--workers", "2",
                 "--ray-address", f"127.0.0.1:{free_port()}", *ARGS)
    assert result.exit_code == 2, result.output
    assert "cannot join Ray at 127.0.0.1:" in result.output and "Connection refused" in result.output
    assert len(result.output.strip().splitlines()) == 1 and time.time() - started < 10
    assert all_runs(store) == []


def test_a_batch_that_cannot_fit_is_refused_before_any_run(tiny_gpt2, store, monkeypatch):
    """--chunk 128 --runs 5000 in this process: refused before the sweep run exists (it used to be refused in
    the first batch, leaving the sweep run FAILED and printing a throughput for targets never run)."""
    import amrepro.experiment

    monkeypatch.setattr(amrepro.experiment, "_available_bytes", lambda device: 2 * 2**30)
    result = cli("sweep", "--model", tiny_gpt2, "--targets", "blocks.4.hook_resid_pre[0:32]", "--chunk", "128",
                 "--runs", "5000", "--epochs", "2")
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert said.startswith("error: a batch of 32 targets: --runs 5000 needs about") and "(--chunk)." in said
    assert "targets/hour" not in said and all_runs(store) == []


def test_too_many_workers_are_refused_before_ray_or_any_run(tiny_gpt2, store, monkeypatch):
    """Each Ray worker loads the model: --workers 64 on a small machine would take its memory. Here the machine
    has 2 GiB free: 16 one-target chunks of ~0.6 GiB workers do not fit."""
    import sys

    from amrepro import experiment

    monkeypatch.setattr(experiment, "_available_bytes", lambda device: 2 * 2**30)
    result = cli("sweep", "--model", tiny_gpt2, "--targets", "blocks.4.hook_resid_pre[0:16]", "--workers", "64", *ARGS)
    assert result.exit_code == 2, result.output
    assert "--workers 64 starts 16 Ray workers of about 0.6 GiB" in result.output
    assert "at most about 2 workers fit here." in result.output and len(result.output.strip().splitlines()) == 1
    assert all_runs(store) == [] and not ("ray" in sys.modules and sys.modules["ray"].is_initialized())


def test_workers_beyond_the_cores_are_said(tiny_gpt2):
    import torch

    from amrepro.model import load_model
    from amrepro.sweep import check_workers

    lm = load_model(tiny_gpt2, torch.device("cpu"))
    targets = [Target(4, "hook_resid_pre", i) for i in range(8)]
    config = Config(model=tiny_gpt2, runs=2, epochs=8)
    note = check_workers(lm, targets, config, 4, 0, cpus=2, local=False)  # a cluster: its memory is unknown here
    assert note.startswith("note: 4 workers on 2 cores")
    assert check_workers(lm, targets, config, 2, 0, cpus=2, local=False) is None
    assert check_workers(lm, targets, config, 64, 0, cpus=2, local=False).startswith("note: 8 workers")  # 8 chunks


def test_a_store_that_fails_while_a_sweep_logs_keeps_the_target_for_amrepro_log(tiny_gpt2, store, monkeypatch):
    """--workers 0 keeps each target's outcome file like `amrepro run`: exit 3 (before: exit 2, results lost),
    `amrepro log FILE` logs the target into its parent, and --resume then finds every target done."""
    original = failing_log_batch(monkeypatch, lambda n, values: values.get("run_index") == "1"
                                 and values.get("target_name") == "blocks.4.hook_resid_pre[1]")
    result = cli("sweep", "--model", tiny_gpt2, "--targets", "blocks.4.hook_resid_pre[0:2]", *ARGS)
    assert result.exit_code == 3, result.output
    sweep, parents = _sweep_runs(store)
    (failed,) = [p for p in parents if p.info.status != "FINISHED"]
    (path,) = Path("amrepro-outcomes").glob("*.npz")  # the first target's file was removed once it was logged
    assert path.name == f"{failed.info.run_id}.npz"
    assert f"amrepro log amrepro-outcomes/{path.name}" in result.output.replace("\n", " ")
    assert not any(r.info.status == "RUNNING" for r in all_runs(store))
    monkeypatch.setattr(MlflowClient, "log_batch", original)
    logged = cli("log", str(path))
    assert logged.exit_code == 0, logged.output
    assert MlflowClient(store).get_run(failed.info.run_id).info.status == "FINISHED"
    assert [c.info.status for c in children_of(store, failed.info.run_id)] == ["FINISHED"] * 2
    resumed = cli("sweep", "--resume", sweep.info.run_id)
    assert resumed.exit_code == 0 and "2 already done, 0 to run" in resumed.output, resumed.output


# --- issue 17 §2: SIGTERM with Ray workers keeps the guarantees of --workers 0 -----------------------------
def _processes_with(marker: str) -> list[int]:
    """Pids of the live processes whose environment holds marker (the driver's Ray processes inherit it)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def test_sigterm_under_ray_kills_every_run_and_the_workers_then_resume_finishes(tiny_gpt2, store, tmp_path):
    """ray.init installs its own SIGTERM handler (a native stack dump, exit 134, the target parents that the
    workers made left RUNNING). SIGTERM to the driver of a 2-worker sweep must exit 143, end every unfinished
    run KILLED (the sweep run and the workers' target parents and seed runs), count them right, stop the Ray
    workers, and leave a sweep that --resume finishes. Ctrl-C takes the same path (signals.py raises a
    KeyboardInterrupt for both; test_resume_skips_finished_targets covers it in-process)."""
    marker = f"AMREPRO_TEST_RAY_MARK={tmp_path}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["AMREPRO_TEST_RAY_MARK"] = str(tmp_path)
    # 3 one-target chunks for 2 workers: two held when the signal comes, one never started; --resume redoes all 3
    # in one batch (one site). A parent is RUNNING while its science and its logging run: 1000 epochs (~1.2 s of
    # science on a quiet AMD EPYC) and its figures (~1 s), so that both workers hold one at once although Ray
    # starts them a second apart (with 300 epochs and no figures the window was too short on a quiet machine)
    spec = "blocks.4.hook_resid_pre[0:3]"
    driver = Amrepro(["sweep", "--model", tiny_gpt2, "--targets", spec, "--runs", "2", "--epochs", "1000", "--figures", "true",
                      "--lr", "0.01", "--workers", "2", "--chunk", "1", "--layout", "seeds"], env, tmp_path)
    client = MlflowClient(store)

    def running_parents() -> bool:
        """Both workers hold a target parent: read with one SQL query (polled every 0.1 s for the ~20 s that Ray
        and its workers take to start; MlflowClient.search_runs cost 10-30 ms of this process's CPU a poll)."""
        try:
            with closing(sqlite3.connect(store.removeprefix("sqlite:///"))) as db:
                (n,) = db.execute("SELECT count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                                  "WHERE t.key = 'amrepro.sweep' AND r.status = 'RUNNING'").fetchone()
        except sqlite3.OperationalError:  # locked by a writer: the next poll reads it
            return False
        return n >= 2

    wait_for(running_parents, driver, timeout=240, what="both workers' target parents RUNNING")
    driver.send_signal(signal.SIGTERM)
    stdout, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 143, stdout[-2000:] + stderr[-3000:]
    assert "Fatal Python error" not in stderr and "Stack trace" not in stderr
    runs = all_runs(store)
    statuses = [r.info.status for r in runs]
    assert "RUNNING" not in statuses
    (sweep,) = [r for r in runs if "targets" in r.data.params]
    assert sweep.info.status == "KILLED" and sweep.data.tags["error"] == "terminated (SIGTERM)"
    parents = [r for r in runs if r.data.tags.get("amrepro.sweep") == sweep.info.run_id]
    assert sum(p.info.status == "KILLED" for p in parents) >= 2  # those the two workers held
    said = " ".join(stderr.split())
    assert (f"terminated (SIGTERM): {statuses.count('FINISHED')} finished run(s) kept, "
            f"{statuses.count('KILLED')} unfinished run(s) marked KILLED") in said, said
    wait_for(lambda: not _processes_with(marker), timeout=60, what="the Ray workers and raylet to exit")

    result = cli("sweep", "--resume", sweep.info.run_id)
    assert result.exit_code == 0, result.output
    sweep = client.get_run(sweep.info.run_id)
    assert sweep.info.status == "FINISHED" and sweep.data.metrics["sweep/n_finished"] == 3
    parents = [r for r in all_runs(store) if r.data.tags.get("amrepro.sweep") == sweep.info.run_id]
    assert sorted(p.data.tags["amrepro.target"] for p in parents) == [f"blocks.4.hook_resid_pre[{i}]" for i in range(3)]
    assert all(p.info.status == "FINISHED" and len(children_of(store, p.info.run_id)) == 2 for p in parents)
