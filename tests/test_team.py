"""At team scale, with the real components and the documented guarded recipe (docs/sweeps.md): a throwaway
PostgreSQL 15 cluster, a real `mlflow server --app-name basic-auth` on it (MLflow's built-in authentication, the
mlflow[auth] extra), and
- `amrepro sweep` on 2 local Ray workers logging over HTTP with credentials from the environment, one of which
  dies mid-chunk (os._exit, like a SIGKILL). The sweep still completes: exact counts of parents, seed runs and
  metric points, no duplicate, nothing RUNNING;
- a sweep without credentials is refused in one sentence; with them it logs.
Both tests use one server (module scope, one xdist worker): starting `mlflow server` costs ~8 s of CPU."""

import json
import os
import secrets
import signal
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from forked import Amrepro
from helpers import PG, Postgres, all_runs, cli, free_port, start_mlflow_server

pytestmark = pytest.mark.xdist_group("team")  # the tests share the module's server

# 4 targets on two sites: 2 chunks of 2, one per worker, and the dead worker's chunk is run again. Every chunk has 2
# targets, so the dying worker dies in its first chunk, after its first target (at its RUNS + 1-th seed run):
# exactly one parent is left unfinished. (A worker that died in a later chunk would leave that whole chunk's
# parents, which are all created before its science.)
TARGETS, N_TARGETS = "blocks.4.hook_resid_pre[0:2],blocks.6.mlp.hook_post[random:2]", 4
RUNS, EPOCHS = 2, 10


@pytest.fixture(scope="module")
def postgres():
    if not (PG / "initdb").exists():
        pytest.skip(f"PostgreSQL 15 binaries are absent ({PG}); Debian's postgresql-15 package provides them")
    db = Postgres()
    try:
        db.start()
        yield db
    finally:
        db.remove()


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """(URI, admin password): the recipe's server, on 127.0.0.1, the passwords in its environment (never on its
    command line). No other user is made: both tests log as the admin."""
    pytest.importorskip("flask_wtf", reason="the mlflow[auth] extra is not installed (pip install -e '.[test]')")
    import mlflow

    folder = tmp_path_factory.mktemp("team-server")
    password = secrets.token_urlsafe(12)
    port = free_port()
    # MLflow's default auth settings, plus its cache of accepted credentials (off by default): without it every
    # request pays a scrypt password check (~0.1 s of the server's CPU). A request without credentials is still
    # refused (only accepted ones are cached).
    config = folder / "basic_auth.ini"
    defaults = Path(mlflow.__file__).parent / "server" / "auth" / "basic_auth.ini"
    config.write_text(defaults.read_text() + "\nauth_cache_ttl_seconds = 600\n")
    # the users' database (basic_auth.db) lands in the server's folder; its admin gets the password on first start
    proc = start_mlflow_server(postgres.uri, folder, port, args=("--app-name", "basic-auth"),
                               # the CSRF key: the auth app refuses to start without one
                               env={"MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_AUTH_CONFIG_PATH": str(config),
                                    "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})
    try:
        yield f"http://127.0.0.1:{port}", password
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_sweep_on_ray_and_postgres_survives_a_dead_worker(tiny_gpt2, postgres, server, tmp_path, monkeypatch):
    server, password = server
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    # the credentials in the driver's environment, as a user exports them: the local Ray workers inherit them
    env.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
    # tests/worker_exit/sitecustomize.py makes the first Ray worker that logs its (RUNS + 1)-th seed run exit
    env.update(MLFLOW_TRACKING_URI=server, HF_HUB_OFFLINE="1", AMREPRO_TEST_EXIT_AFTER_CHILDREN=str(RUNS + 1),
               AMREPRO_TEST_EXIT_MARKER=str(tmp_path / "worker-died"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent / "worker_exit"), *filter(None, [env.get("PYTHONPATH")])]))
    # the driver is forked from the tests' fork server (forked.py: no second import of torch and MLflow); the Ray
    # workers are Ray's own processes
    driver = Amrepro(["sweep", "--model", tiny_gpt2, "--targets", TARGETS, "--runs", str(RUNS), "--epochs", str(EPOCHS),
                      "--lr", "0.01", "--workers", "2", "--chunk", "2", "--layout", "seeds"], env, tmp_path)
    stdout, stderr = driver.communicate(timeout=400)
    assert driver.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert (tmp_path / "worker-died").exists()  # a worker did die mid-chunk (after its first target, 1 seed run in)
    assert "on 2 Ray workers (1 thread each)" in stdout
    assert password not in stdout + stderr

    # this process reads the store back as the admin (MLflow takes the credentials from the environment)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    client = MlflowClient(server)
    (experiment,) = [e.experiment_id for e in client.search_experiments() if e.name == "amrepro"]
    runs = client.search_runs([experiment], max_results=1000)
    (sweep,) = [r for r in runs if "targets" in r.data.params]
    parents = [r for r in runs if r.data.tags.get("amrepro.sweep") == sweep.info.run_id]
    children = [r for r in runs if "run_index" in r.data.params]
    assert sweep.info.status == "FINISHED" and len(runs) == 1 + N_TARGETS + N_TARGETS * RUNS
    names = sorted(p.data.tags["amrepro.target"] for p in parents)
    assert len(parents) == N_TARGETS and len(set(names)) == N_TARGETS  # one parent per target, none twice
    assert all(r.info.status == "FINISHED" for r in runs)
    by_parent = {}
    for child in children:
        by_parent.setdefault(child.data.tags["mlflow.parentRunId"], []).append(int(child.data.params["run_index"]))
    assert {p.info.run_id for p in parents} == set(by_parent)
    assert all(sorted(indices) == list(range(RUNS)) for indices in by_parent.values())

    # the dead worker's unfinished parent (and its one seed run): KILLED, in the trash, redone by a new parent
    trash = client.search_runs([experiment], run_view_type=ViewType.DELETED_ONLY, max_results=1000)
    dead = [r for r in trash if "amrepro.sweep" in r.data.tags]
    assert len(dead) == 1 and dead[0].info.status == "KILLED" and "redone" in dead[0].data.tags["error"]
    assert dead[0].data.tags["amrepro.target"] in names
    assert postgres.sql("select count(*) from runs where status = 'RUNNING'") == "0"

    # every metric point once: histories of EPOCHS points (a seed's two, a parent's curve of each seed: key
    # <history>/seed-N), everything else one point, counted in PostgreSQL itself
    expected = sum(len(r.data.metrics) + (2 * (EPOCHS - 1) if "run_index" in r.data.params else 0)
                   + (EPOCHS - 1) * sum("/seed-" in key for key in r.data.metrics) for r in runs)
    active = f"r.lifecycle_stage = 'active' and r.experiment_id = {int(experiment)}"
    assert int(postgres.sql(f"select count(*) from metrics m join runs r on m.run_uuid = r.run_uuid where {active}")) \
        == expected
    assert postgres.sql(f"select count(*) from (select 1 from metrics m join runs r on m.run_uuid = r.run_uuid "
                        f"where {active} group by m.run_uuid, m.key, m.step having count(*) > 1) d") == "0"
    # the sweep table has every target, from the parents that finished
    table = json.loads(Path(client.download_artifacts(sweep.info.run_id, "sweep_table.json")).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert sorted(row["target"] for row in rows) == names and {row["status"] for row in rows} == {"FINISHED"}


def test_a_sweep_logs_to_an_authenticated_server_only_with_credentials(tiny_gpt2, server, monkeypatch, tmp_path):
    uri, password = server
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
                "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    # its own experiment: the other test counts the runs of 'amrepro'
    args = ("sweep", "--model", tiny_gpt2, "--targets", "blocks.4.hook_resid_pre[0:2]", "--runs", "2", "--epochs", "2",
            "--experiment", "auth")
    refused = cli(*args)
    assert refused.exit_code == 2, refused.output
    assert f"cannot use the MLflow tracking store at {uri}" in refused.output and "401" in refused.output
    assert "Traceback" not in refused.output and len(refused.output.strip().splitlines()) == 1
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert password not in result.output
    auth = MlflowClient(uri).get_experiment_by_name("auth").experiment_id  # read with the credentials from the env
    runs = [r for r in all_runs(uri) if r.info.experiment_id == auth]
    assert sum(r.data.tags.get("amrepro.target", "").startswith("blocks.4") for r in runs) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
