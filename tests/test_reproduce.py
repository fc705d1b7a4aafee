"""Reproduce any result from its logged artifacts, and fail safely (issue 3)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from forked import Amrepro
from helpers import all_runs, children_of, cli, logged_run


@pytest.fixture
def logged(tiny_gpt2, store):
    """A finished 2-seed run: (store uri, parent id, [child ids])."""
    parent, children = logged_run(store, tiny_gpt2, runs=2, epochs=30)
    return store, parent.info.run_id, [c.info.run_id for c in children]


def artifact_file(uri, run_id, path) -> Path:
    return Path(MlflowClient(uri).get_run(run_id).info.artifact_uri.removeprefix("file://")) / path


def test_decode_parent_and_child_match_the_logged_tokens(logged):
    _, parent, children = logged
    for run_id in (parent, children[1]):
        result = cli("decode", run_id)
        assert result.exit_code == 0, result.output
        assert "all tokens match the logged tokens.json" in result.output


def test_decode_exits_nonzero_when_tokens_differ(logged):
    uri, _, children = logged
    path = artifact_file(uri, children[0], "tokens.json")
    tokens = json.loads(path.read_text())
    tokens["ids"][0] = (tokens["ids"][0] + 1) % 300
    path.write_text(json.dumps(tokens))
    import hashlib
    MlflowClient(uri).set_tag(children[0], "sha256/tokens.json", hashlib.sha256(path.read_bytes()).hexdigest())
    result = cli("decode", children[0])
    assert result.exit_code == 1 and "differ from the logged tokens.json" in result.output


def test_reproduce_parent_is_bit_identical_and_logged(logged):
    uri, parent, children = logged
    result = cli("reproduce", parent)
    assert result.exit_code == 0, result.output
    assert "reproduced: bit-identical" in result.output
    (rerun,) = [r for r in all_runs(uri) if r.data.tags.get("amrepro.reproduces") == parent]
    assert rerun.info.status == "FINISHED" and rerun.data.tags["amrepro.verdict"] == "reproduced: bit-identical"
    assert rerun.data.metrics["max_abs_diff_final"] == 0.0


def test_reproduce_one_child_alone(logged):
    _, _, children = logged
    result = cli("reproduce", children[1])
    assert result.exit_code == 0, result.output
    assert "reproduced: bit-identical" in result.output


@pytest.mark.parametrize("command", ["decode", "reproduce"])
def test_tampered_artifact_is_refused(logged, command):
    uri, parent, children = logged
    path = artifact_file(uri, children[0], "embeddings/final.npy")
    array = np.load(path)
    array[0, 0] += 1e-3
    np.save(path, array)
    result = cli(command, parent)
    assert result.exit_code == 2
    assert "does not match its sha256 tag" in result.output and "Traceback" not in result.output


def test_missing_artifact_is_refused(logged):
    uri, _, children = logged
    artifact_file(uri, children[1], "embeddings/initial.npy").unlink()
    result = cli("reproduce", children[1])
    assert result.exit_code == 2 and "missing" in result.output


def test_bad_run_ids_and_foreign_runs(logged):
    uri, _, _ = logged
    for bad in ("not a run id!", "0123456789abcdef0123456789abcdef"):
        result = cli("decode", bad)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    client = MlflowClient(uri)
    foreign = client.create_run("0").info.run_id  # a run some other tool made
    client.set_terminated(foreign)
    result = cli("reproduce", foreign)
    assert result.exit_code == 2 and "not made by `amrepro run`" in result.output


def test_exception_mid_run_marks_every_run_failed(tiny_gpt2, store, monkeypatch):
    def exploding_reader(*args, **kwargs):
        raise RuntimeError("simulated failure in the middle of the optimization")

    monkeypatch.setattr("amrepro.methods.adam.optimize", exploding_reader)  # the loop behind --method adam
    result = cli("run", "--model", tiny_gpt2, "--runs", "2", "--epochs", "5", "--dim", "3")
    assert result.exit_code == 1 and "simulated failure" in result.output
    runs = all_runs(store)
    assert len(runs) == 1  # the parent; seed runs are created after the science (issue 12 item 2)
    for run in runs:
        assert run.info.status == "FAILED"
        assert "simulated failure" in run.data.tags["error"]


def _env(uri):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def test_four_concurrent_workers_lose_no_run_and_no_metric(tiny_gpt2, tmp_path):
    # The sqlite store does not exist yet: MLflow alone corrupts a fresh db when 4 processes create it at once.
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert not (tmp_path / "mlflow.db").exists()
    env = {**_env(store), "OMP_NUM_THREADS": "1"}  # 4 workers on 2 cores: no thread oversubscription
    procs = [Amrepro(["run", "--model", tiny_gpt2, "--runs", "2", "--epochs", "50", "--dim", "3", "--seed", str(10 * w)],
                     env, tmp_path) for w in range(4)]  # separate processes (tests/forked.py)
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    client = MlflowClient(store)
    runs = all_runs(store)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 4 and len(runs) == 12 and all(r.info.status == "FINISHED" for r in runs)
    assert sorted(int(p.data.params["seed"]) for p in parents) == [0, 10, 20, 30]
    for parent in parents:
        children = children_of(store, parent.info.run_id)
        assert len(children) == 2
        for child in children:
            assert len(client.get_metric_history(child.info.run_id, "loss/total")) == 50
            assert len(client.get_metric_history(child.info.run_id, "act/target")) == 50


def test_store_down_and_model_gone_are_one_sentence(logged, tiny_gpt2, tmp_path, monkeypatch):
    import shutil

    uri, parent, _ = logged
    # the model the run was made with is no longer where it was
    moved = tmp_path / "moved-model"
    shutil.copytree(tiny_gpt2, moved)
    client = MlflowClient(uri)
    result = cli("run", "--model", str(moved), "--runs", "1", "--epochs", "2", "--dim", "3")
    assert result.exit_code == 0
    (new_parent,) = [r for r in all_runs(uri) if r.data.params.get("model") == str(moved)
                     and "mlflow.parentRunId" not in r.data.tags]
    shutil.rmtree(moved)
    before = len(all_runs(uri))
    result = cli("reproduce", new_parent.info.run_id)
    assert result.exit_code == 2 and "local path does not exist" in result.output
    assert len(all_runs(uri)) == before  # the model is loaded before the re-run is created
    # a store that is down
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    for command in ("decode", "reproduce"):
        result = cli(command, parent)
        assert result.exit_code == 2 and "cannot use the MLflow tracking store" in result.output
    assert client.get_run(parent).info.status == "FINISHED"


def test_reproduce_uses_the_logged_gemm_kernel_not_a_new_choice(tiny_gpt2, store, monkeypatch):
    """The kernel is logged as env.kernels; reproduce forces it even where this process would choose another
    (here: AMREPRO_KERNELS says plain), since another kernel rounds differently."""
    from amrepro import kernels

    if not kernels.available("mkl"):
        pytest.skip("this torch has no MKL packed GEMM")
    monkeypatch.setenv(kernels.ENV_VAR, "mkl")
    result = cli("run", "--model", tiny_gpt2, "--runs", "2", "--epochs", "5", "--dim", "3")
    assert result.exit_code == 0, result.output
    (parent,) = [r for r in all_runs(store) if r.data.tags.get("amrepro.kind", "") != "seed" and
                 "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.tags["env.kernels"] == "mkl"
    monkeypatch.setenv(kernels.ENV_VAR, "plain")
    result = cli("reproduce", parent.info.run_id)
    assert result.exit_code == 0 and "reproduced: bit-identical" in result.output, result.output
    (rerun,) = [r for r in all_runs(store) if r.data.tags.get("amrepro.reproduces") == parent.info.run_id]
    assert rerun.data.tags["env.kernels"] == "mkl"
    assert kernels.forced() == "plain"  # the logged kernel was forced for the reproduction only
