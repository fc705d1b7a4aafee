"""A real `mlflow server` that goes away in the middle of `amrepro run` (issue 12 item 6): back within the retry
window, nothing is lost; gone for good, the command ends in bounded time, keeps the results in an outcome file,
and `amrepro log FILE` logs them once the server is back."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import all_runs, children_of


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1 over a sqlite store that survives restarts."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        mlflow = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db",
                                      "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
                                      "--port", str(self.port), "--workers", "1"],
                                     cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)  # its own process group: killed with its workers
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("mlflow server did not start")

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "server"
    folder.mkdir()
    s = Server(folder)
    s.start()
    yield s
    try:
        s.kill()
    except ProcessLookupError:
        pass


def _amrepro(server, cwd, *args, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    full.update(MLFLOW_TRACKING_URI=server.uri, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **env)
    return subprocess.Popen([sys.executable, "-m", "amrepro", *args], env=full, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_parent(server, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = all_runs(server.uri)
        if runs:
            return runs[0]
        time.sleep(0.3)
    raise AssertionError("no parent run appeared")


def test_server_killed_mid_run_back_or_gone(server, tiny_gpt2, tmp_path):
    args = ("run", "--model", tiny_gpt2, "--runs", "2", "--epochs", "600", "--dim", "3")

    # (a) killed during the optimization and back at once: within the retry window, nothing is lost (the
    # optimization may end before the server is back: logging then waits in MLflow's retries)
    proc = _amrepro(server, tmp_path, *args[:-3], "150", "--dim", "3", MLFLOW_HTTP_REQUEST_MAX_RETRIES="5",
                    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")  # window 0+2+4+8+16 s
    first = _wait_for_parent(server)
    server.kill()
    server.start()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    client = MlflowClient(server.uri)
    children = children_of(server.uri, first.info.run_id)
    assert client.get_run(first.info.run_id).info.status == "FINISHED"
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]
    assert len(client.get_metric_history(children[0].info.run_id, "loss/total")) == 150
    assert not list((tmp_path / "amrepro-outcomes").glob("*.npz"))

    # (b) killed and left down: bounded, one sentence naming the outcome file; `amrepro log` once it is back
    proc = _amrepro(server, tmp_path, *args, MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",
                    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    deadline = time.time() + 120
    while len(all_runs(server.uri)) < 4 and time.time() < deadline:
        time.sleep(0.3)
    second = [r for r in all_runs(server.uri) if r.info.run_id != first.info.run_id
              and "mlflow.parentRunId" not in r.data.tags][0]
    time.sleep(1.0)  # past the parent's tags, into the optimization
    server.kill()
    killed_at = time.time()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    assert time.time() - killed_at < 90  # the 600 epochs, then a 0+2 s retry window: not MLflow's minutes
    (path,) = (tmp_path / "amrepro-outcomes").glob("*.npz")
    flat = err.replace("\n", " ")
    assert f"the MLflow tracking server at {server.uri} did not answer for" in flat
    assert f"`amrepro log amrepro-outcomes/{path.name}`" in flat and "Traceback" not in err
    assert path.stem == second.info.run_id

    server.start()
    log = _amrepro(server, tmp_path, "log", f"amrepro-outcomes/{path.name}")
    out, err = log.communicate(timeout=300)
    assert log.returncode == 0, err
    assert not path.exists()
    runs = all_runs(server.uri)
    assert not any(r.info.status == "RUNNING" for r in runs)
    assert MlflowClient(server.uri).get_run(second.info.run_id).info.status == "FINISHED"
    assert [c.info.status for c in children_of(server.uri, second.info.run_id)] == ["FINISHED", "FINISHED"]
