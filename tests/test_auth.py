"""A team server with MLflow's built-in authentication (`mlflow server --app-name basic-auth`, the mlflow[auth]
extra): amrepro logs to it with credentials from the environment, and without them is refused in one sentence."""

import os
import secrets
import signal
from pathlib import Path

import pytest

from helpers import all_runs, cli, copy_store, free_port, start_mlflow_server


@pytest.fixture
def auth_server(tmp_path, empty_store_db):
    pytest.importorskip("flask_wtf", reason="the mlflow[auth] extra is not installed (pip install -e '.[test]')")
    import mlflow

    password = secrets.token_urlsafe(12)
    port = free_port()
    # MLflow's default auth settings, plus its cache of accepted credentials (off by default): without it every
    # request pays a scrypt password check (~0.1 s of the server's CPU). A request without credentials is still
    # refused (only accepted ones are cached).
    config = tmp_path / "basic_auth.ini"
    defaults = Path(mlflow.__file__).parent / "server" / "auth" / "basic_auth.ini"
    config.write_text(defaults.read_text() + "\nauth_cache_ttl_seconds = 600\n")
    # the users' database (basic_auth.db) lands in the server's folder; its admin gets the password on first start
    proc = start_mlflow_server(copy_store(empty_store_db, tmp_path / "mlflow.db"), tmp_path, port,
                               args=("--app-name", "basic-auth"),
                               # the CSRF key: the auth app refuses to start without one
                               env={"MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_AUTH_CONFIG_PATH": str(config),
                                    "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})
    yield f"http://127.0.0.1:{port}", password
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_a_sweep_logs_to_an_authenticated_server_only_with_credentials(tiny_gpt2, auth_server, monkeypatch, tmp_path):
    uri, password = auth_server
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    args = ("sweep", "--model", tiny_gpt2, "--targets", "blocks.4.hook_resid_pre[0:2]", "--runs", "2", "--epochs", "2")
    refused = cli(*args)
    assert refused.exit_code == 2, refused.output
    assert f"cannot use the MLflow tracking store at {uri}" in refused.output and "401" in refused.output
    assert "Traceback" not in refused.output and len(refused.output.strip().splitlines()) == 1
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert password not in result.output
    runs = all_runs(uri)  # read with the same credentials from the environment
    assert sum(r.data.tags.get("amrepro.target", "").startswith("blocks.4") for r in runs) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
