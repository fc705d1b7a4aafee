"""The MLproject entry point: every parameter reaches the CLI, and `mlflow run` works end to end."""

import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer
import yaml
from mlflow import MlflowClient

from amrepro.cli import app
from amrepro.config import Config
from helpers import children_of, cli, copy_store

ROOT = Path(__file__).resolve().parent.parent


def entry_point(name="main"):
    return yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][name]


# entry point -> (its amrepro command, the Config fields it does not take)
ENTRY_POINTS = {"main": ("run", ()), "compare": ("compare", ("method",)), "sweep": ("sweep", ("layer", "dim", "target"))}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_entry_point_parameters_are_config_fields_and_reach_the_cli(name):
    """Every parameter lands on the CLI option of the same name, which the command has; every Config field the
    command takes is a parameter with Config's default (nothing written twice can drift)."""
    command, excluded = ENTRY_POINTS[name]
    entry = entry_point(name)
    declared = set(entry["parameters"])
    assert declared == set(re.findall(r"\{(\w+)\}", entry["command"]))
    assert entry["command"].startswith(f"python -m amrepro {command} ")
    click_command = typer.main.get_command(app).commands[command]
    options = {opt for param in click_command.params for opt in param.opts}
    for param in declared:
        assert f"--{param.replace('_', '-')} {{{param}}}" in entry["command"]
        assert f"--{param.replace('_', '-')}" in options, param
    for field in dataclasses.fields(Config):
        if field.name in excluded:
            assert field.name not in declared, field.name
            continue
        assert str(entry["parameters"][field.name]["default"]) == str(field.default), field.name


def test_python_env_pins_the_cpu_torch_wheel_and_all_runtime_dependencies():
    env = yaml.safe_load((ROOT / "python_env.yaml").read_text())
    pins = {re.split(r"[=<>]", d)[0] for d in env["dependencies"]}
    runtime = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {re.split(r"[=<>]", d)[0] for d in runtime} <= pins
    assert "torch==2.13.0" in env["dependencies"]


def test_mlflow_run_local_env_end_to_end(tiny_gpt2, tmp_path, monkeypatch, empty_store_db):
    uri = copy_store(empty_store_db, tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    client.create_experiment("e2e", artifact_location=str(tmp_path / "artifacts"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, HF_HUB_OFFLINE="1")
    bindir = Path(sys.executable).parent
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(["mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "e2e",
                           "-P", "runs=2", "-P", "epochs=5", "-P", f"model={tiny_gpt2}", "-P", "dim=3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "/10 tokens are unique." in proc.stdout
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
                 if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.metrics["stats/n_tokens_total"] == 10
    assert parent.info.run_name == "tiny-gpt2 blocks.8.hook_resid_pre[3] x2"  # not mlflow run's random name
    children = children_of(uri, parent.info.run_id)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    # mlflow run logs string parameters shell-quoted (the empty target as "''"): reproduce still reads them
    assert parent.data.params["target"] == "''"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    # the run was made by a fresh interpreter (mlflow run's subprocess), the reproduction by this one, which has
    # run other tests before: still the same bytes
    result = cli("reproduce", parent.info.run_id)
    assert result.exit_code == 0 and "reproduced: bit-identical" in result.output, result.output
