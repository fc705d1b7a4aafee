"""A real `mlflow server` that goes away in the middle of `amrepro run` (issue 12 item 6): back within the retry
window, nothing is lost; gone for good, the command ends in bounded time, keeps the results in an outcome file,
and `amrepro log FILE` logs them once the server is back."""

import os
import signal
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest
from mlflow import MlflowClient

from forked import Amrepro
from helpers import all_runs, children_of, cli, copy_store, free_port, start_mlflow_server, wait_for


class Server:
    """`mlflow server` on 127.0.0.1 over a sqlite store that survives restarts."""

    def __init__(self, folder: Path, template: Path):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None
        # the tables made already (each start of a server that makes them costs seconds); artifacts go through
        # the server (mlflow-artifacts:/), as in a store the server made itself
        copy_store(template, folder / "mlflow.db", artifacts="mlflow-artifacts:/0")

    def start(self):
        self.proc = start_mlflow_server(f"sqlite:///{self.folder}/mlflow.db", self.folder, self.port, timeout=120)

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def server(tmp_path, empty_store_db):
    folder = tmp_path / "server"
    folder.mkdir()
    s = Server(folder, empty_store_db)
    s.start()
    yield s
    try:
        s.kill()
    except ProcessLookupError:
        pass


def _amrepro(server, cwd, *args, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    full.update(MLFLOW_TRACKING_URI=server.uri, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **env)
    return Amrepro(args, full, cwd)  # a separate process (tests/forked.py)


def test_server_killed_mid_run_back_or_gone(server, tiny_gpt2, tmp_path, monkeypatch):
    """One kill of the server, two runs that see it: `back` retries long enough to see it come back, `gone`
    gives up first (the server is restarted only once `gone` has ended), so each server start serves both."""
    args = ("run", "--model", tiny_gpt2, "--runs", "2", "--dim", "3")
    # back: within its retry window (0+2+4+...+32 s) nothing is lost (its optimization may end while the server
    # is down: logging then waits in MLflow's retries)
    back = _amrepro(server, tmp_path, *args, "--epochs", "150", MLFLOW_HTTP_REQUEST_MAX_RETRIES="6",
                    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    # gone: killed during its 600 epochs and left down for it: bounded (0+2 s window), one sentence naming the
    # outcome file, and `amrepro log` logs the file once the server is back
    gone = _amrepro(server, tmp_path, *args, "--epochs", "600", MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",
                    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1", MLFLOW_HTTP_REQUEST_TIMEOUT="5")

    def parents_by_epochs():
        """{"150": back's parent id, "600": gone's} once both have their params, read from the server's sqlite file
        with one query: polled every 0.1 s while both start, MLflow's search over HTTP cost this process and the
        server tens of ms a poll."""
        try:
            with closing(sqlite3.connect(server.folder / "mlflow.db")) as db:
                found = dict(db.execute("SELECT p.value, p.run_uuid FROM params p WHERE p.key = 'epochs' AND NOT EXISTS "
                                        "(SELECT 1 FROM tags t WHERE t.run_uuid = p.run_uuid AND t.key = "
                                        "'mlflow.parentRunId')").fetchall())
        except sqlite3.OperationalError:  # locked by the server's writer: the next poll reads it
            return None
        return found if {"150", "600"} <= found.keys() else None  # a parent just created has no params yet

    parents = wait_for(parents_by_epochs, gone, what="both parent runs")
    # gone is in its optimization (its first progress line, at epoch 60 of 600), past every store call before it
    wait_for(lambda: "optimizing 2 runs: epoch" in gone.output_so_far()[0], gone, what="gone's first progress line")
    server.kill()
    killed_at = time.time()
    _, err = gone.communicate(timeout=300)
    assert gone.returncode == 3, err
    assert time.time() - killed_at < 90  # the 600 epochs, then a 0+2 s retry window: not MLflow's minutes
    second = parents["600"]
    path = tmp_path / "amrepro-outcomes" / f"{second}.npz"
    flat = err.replace("\n", " ")
    assert f"the MLflow tracking server at {server.uri} did not answer for" in flat
    assert f"`amrepro log amrepro-outcomes/{path.name}`" in flat and "Traceback" not in err
    assert path.is_file()

    server.start()
    out, err = back.communicate(timeout=300)
    assert back.returncode == 0, err
    assert out.count("View run") == 1  # MLflow's link for the run a user opens, not one (and a request) per seed
    client = MlflowClient(server.uri)
    first = parents["150"]
    children = children_of(server.uri, first)
    assert client.get_run(first).info.status == "FINISHED"
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]
    assert len(client.get_metric_history(children[0].info.run_id, "loss/total")) == 150
    assert not (tmp_path / "amrepro-outcomes" / f"{first}.npz").exists()  # logged: no outcome file

    # `amrepro log` in this process: what is tested here is the file, not a separate process
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.chdir(tmp_path)
    result = cli("log", f"amrepro-outcomes/{path.name}")
    assert result.exit_code == 0, result.output
    assert not path.exists()
    runs = all_runs(server.uri)
    assert not any(r.info.status == "RUNNING" for r in runs)
    assert client.get_run(second).info.status == "FINISHED"
    assert [c.info.status for c in children_of(server.uri, second)] == ["FINISHED", "FINISHED"]
