"""The MLproject entry point: every parameter reaches the CLI, and `mlflow run` works end to end."""

import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from mlflow import MlflowClient

from amrepro.config import Config
from helpers import children_of, cli, copy_store

ROOT = Path(__file__).resolve().parent.parent


def entry_point():
    return yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["main"]


def test_every_declared_parameter_appears_in_the_command():
    main = entry_point()
    declared = set(main["parameters"])
    used = set(re.findall(r"\{(\w+)\}", main["command"]))
    assert declared == used
    for name in declared:  # each one lands on the CLI option of the same name
        assert f"--{name.replace('_', '-')} {{{name}}}" in main["command"]


def test_every_config_field_is_an_mlproject_parameter_with_the_same_default():
    params = entry_point()["parameters"]
    for field in dataclasses.fields(Config):
        assert field.name in params, field.name
        assert str(params[field.name]["default"]) == str(field.default), field.name


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
    result = cli("reproduce", parent.info.run_id)
    assert result.exit_code == 0 and "reproduced: bit-identical" in result.output, result.output


def test_compare_entry_point_takes_every_shared_config_field():
    compare = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["compare"]
    declared = set(compare["parameters"])
    assert declared == set(re.findall(r"\{(\w+)\}", compare["command"]))
    for name in declared:
        assert f"--{name.replace('_', '-')} {{{name}}}" in compare["command"]
    for field in dataclasses.fields(Config):
        if field.name == "method":  # compare runs every method of `methods`
            continue
        assert str(compare["parameters"][field.name]["default"]) == str(field.default), field.name
    assert compare["parameters"]["methods"]["default"] == "adam,pez,gcg,epo"
