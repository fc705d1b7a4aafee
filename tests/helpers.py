"""Shared test helpers: run the CLI in-process and read the tracking store back."""

from __future__ import annotations

from mlflow import MlflowClient
from typer.testing import CliRunner

from amrepro.cli import app


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def all_runs(uri: str):
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=1000) if experiments else []


def children_of(uri: str, parent_id: str):
    return sorted((r for r in all_runs(uri) if r.data.tags.get("mlflow.parentRunId") == parent_id
                   and "run_index" in r.data.params),  # seed runs; a nested reproduction is none
                  key=lambda r: int(r.data.params["run_index"]))


def logged_run(uri: str, model: str, runs: int, epochs: int):
    """`amrepro run` a finished batch on the tiny model (dim 3, lr 0.01): (parent run, [seed runs])."""
    result = cli("run", "--model", model, "--runs", str(runs), "--epochs", str(epochs), "--dim", "3", "--lr", "0.01")
    assert result.exit_code == 0, result.output
    (parent,) = [r for r in all_runs(uri) if "mlflow.parentRunId" not in r.data.tags]
    return parent, children_of(uri, parent.info.run_id)
