"""Shared test helpers: run the CLI in-process and read the tracking store back."""

from __future__ import annotations

import os
import pwd
import shutil
import sqlite3
import subprocess
import tempfile
from pathlib import Path

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


_LOGGED: dict = {}  # (model, runs, epochs) -> the folder of a store holding that finished run, made once per worker


def logged_run(uri: str, model: str, runs: int, epochs: int):
    """`amrepro run` a finished batch on the tiny model (dim 3, lr 0.01) into the store uri (the `store` fixture's,
    in the current folder): (parent run, [seed runs]).

    The run is made once per test worker and copied into each test's own store and ./mlruns (a copy the test
    may tamper with), since every copy of the same run is what the command would have logged again: the runs
    are bit-identical by design (test_optimize, test_reproduce)."""
    import os
    import shutil

    key = (model, runs, epochs)
    if key not in _LOGGED:
        result = cli("run", "--model", model, "--runs", str(runs), "--epochs", str(epochs), "--dim", "3", "--lr", "0.01")
        assert result.exit_code == 0, result.output
        template = Path(tempfile.mkdtemp(prefix="amrepro-logged-"))
        copy_store(Path(uri.removeprefix("sqlite:///")), template / "mlflow.db", keep_locations=True)
        shutil.copytree("mlruns", template / "mlruns")
        _LOGGED[key] = (template, os.getcwd())
    else:
        template, made_in = _LOGGED[key]
        db = Path(uri.removeprefix("sqlite:///"))
        copy_store(template / "mlflow.db", db, keep_locations=True)
        shutil.rmtree("mlruns", ignore_errors=True)
        shutil.copytree(template / "mlruns", "mlruns")
        here = os.getcwd()
        with sqlite3.connect(db) as con:  # the artifact locations are absolute: point them at this test's copy
            con.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (made_in, here))
            con.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (made_in, here))
        con.close()
    (parent,) = [r for r in all_runs(uri) if "mlflow.parentRunId" not in r.data.tags]
    return parent, children_of(uri, parent.info.run_id)


def wait_for(predicate, proc=None, timeout=120, what="condition"):
    """Poll predicate() until it is truthy and return its value. A subprocess `proc` that has exited meanwhile
    fails the wait at once, with its exit code and stderr (it would never make the condition true)."""
    import time

    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"the subprocess exited with {proc.returncode} before {what}; its stderr:\n"
                                 f"{(err or '')[-4000:]}")
        if time.time() > deadline:
            state = "" if proc is None else f" (the subprocess, pid {proc.pid}, is still running)"
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{state}")
        time.sleep(0.1)


def copy_store(template: Path, db: Path, artifacts: str | None = None, keep_locations: bool = False) -> str:
    """A copy of the empty store at db (its Default experiment's artifacts in ./mlruns/0 next to it, where MLflow
    puts them when it creates the store from that folder, or at `artifacts`); returns its URI.
    keep_locations: copy every artifact location as it is (logged_run rewrites them itself)."""
    source, target = sqlite3.connect(template), sqlite3.connect(db)
    try:
        source.backup(target)  # a consistent copy, whatever connection MLflow still holds on the template
        if not keep_locations:
            target.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                           (artifacts or str(db.parent / "mlruns" / "0"),))
        target.commit()
    finally:
        source.close()
        target.close()
    return f"sqlite:///{db}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(backend_uri: str, folder: Path, port: int, timeout: float = 180, args: tuple = (),
                        env: dict | None = None):
    """A real `mlflow server` on 127.0.0.1:port over backend_uri, artifacts proxied into folder/artifacts, its log
    appended to folder/server.log; returns the process once /health answers (its own process group: kill it
    with os.killpg, workers included). Fails at once, with the log, if the server exits first. args: more
    options (`--app-name basic-auth`); env: more environment variables."""
    import sys
    import time
    import urllib.request

    mlflow = Path(sys.executable).with_name("mlflow")
    # no job-execution runner: a third process importing MLflow at every start, for jobs these tests never run
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    with open(folder / "server.log", "a") as log:
        proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", backend_uri, "--artifacts-destination",
                                 str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1", *args], cwd=folder, env=env, stdout=log, stderr=log,
                                start_new_session=True)
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"mlflow server did not start (exit code {proc.poll()}); its log:\n"
                                 + (folder / "server.log").read_text()[-4000:])
        time.sleep(0.2)


PG = Path("/usr/lib/postgresql/15/bin")  # Debian's postgresql-15


class Postgres:
    """initdb into a temp folder as the `postgres` user (initdb refuses root), listening on 127.0.0.1 only.
    fsync off for tests; bench/sweep.py keeps PostgreSQL's default (on), as a team's server would."""

    def __init__(self, fsync: bool = False):
        self.fsync = fsync
        self.folder = Path(tempfile.mkdtemp(prefix="amrepro-pg-"))
        self.port = free_port()
        self.user = pwd.getpwnam("postgres") if os.getuid() == 0 else None
        if self.user:
            os.chown(self.folder, self.user.pw_uid, self.user.pw_gid)
        self.uri = f"postgresql://postgres@127.0.0.1:{self.port}/mlflow"

    def _run(self, *args):
        def demote():
            os.setgid(self.user.pw_gid)
            os.setuid(self.user.pw_uid)

        out = subprocess.run([str(PG / args[0]), *args[1:]], preexec_fn=demote if self.user else None, cwd=self.folder,
                             env={"PATH": os.environ["PATH"], "LC_ALL": "C"}, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def start(self):
        data = self.folder / "data"
        self._run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        self._run("pg_ctl", "-D", str(data), "-l", str(self.folder / "log"), "-w", "-o",
                  f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder}"
                  + ("" if self.fsync else " -c fsync=off"), "start")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "mlflow")

    def sql(self, query: str) -> str:
        return self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "mlflow", "-At",
                         "-c", query).strip()

    def remove(self):
        if (self.folder / "data" / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


def failing_log_batch(monkeypatch, when):
    """MlflowClient.log_batch raises a disk I/O error on the calls when(call number, {param: value}) picks (a store
    that fails mid-logging); returns the original."""
    from mlflow import MlflowClient

    original, seen = MlflowClient.log_batch, []

    def failing(self, run_id, metrics=(), params=(), tags=(), *args, **kwargs):
        seen.append(run_id)
        if when(len(seen), {p.key: p.value for p in params}):
            raise RuntimeError("(sqlite3.OperationalError) disk I/O error")
        return original(self, run_id, metrics, params, tags, *args, **kwargs)
    monkeypatch.setattr(MlflowClient, "log_batch", failing)
    return original


def owned_by(store, run_id: str, pid: int, host: str | None = None) -> None:
    """The run RUNNING again, its process tags naming pid (on this host unless host)."""
    from amrepro.tracking import HOST, _process_start

    client = MlflowClient(store)
    client.update_run(run_id, "RUNNING")
    for key, value in (("amrepro.pid", str(pid)), ("amrepro.pid_start", _process_start(pid)),
                       ("amrepro.host", host or HOST)):
        client.set_tag(run_id, key, value)
