"""At team scale, with the real components: a throwaway PostgreSQL 15 cluster, a real `mlflow server` on it, and
`amrepro sweep` on 2 local Ray workers logging over HTTP, one of which dies mid-chunk (os._exit, like a SIGKILL).
The sweep still completes: exact counts of parents, seed runs and metric points, no duplicate, nothing RUNNING."""

import json
import os
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from forked import Amrepro
from helpers import PG, Postgres, free_port, start_mlflow_server

# 4 targets on two sites: 2 chunks of 2, one per worker, and the dead worker's chunk is run again. Every chunk has 2
# targets, so the dying worker dies in its first chunk, after its first target (at its RUNS + 1-th seed run):
# exactly one parent is left unfinished. (A worker that died in a later chunk would leave that whole chunk's
# parents, which are all created before its science.)
TARGETS, N_TARGETS = "blocks.4.hook_resid_pre[0:2],blocks.6.mlp.hook_post[random:2]", 4
RUNS, EPOCHS = 2, 10


@pytest.fixture
def postgres():
    if not (PG / "initdb").exists():
        pytest.skip(f"PostgreSQL 15 binaries are absent ({PG}); Debian's postgresql-15 package provides them")
    db = Postgres()
    try:
        db.start()
        yield db
    finally:
        db.remove()


@pytest.fixture
def server(postgres, tmp_path):
    port = free_port()
    proc = start_mlflow_server(postgres.uri, tmp_path, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def test_sweep_on_ray_and_postgres_survives_a_dead_worker(tiny_gpt2, postgres, server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
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

    # every metric point once: histories of EPOCHS points, everything else one point, counted in PostgreSQL itself
    expected = sum(len(r.data.metrics) + (2 * (EPOCHS - 1) if "run_index" in r.data.params else 0) for r in runs)
    active = f"r.lifecycle_stage = 'active' and r.experiment_id = {int(experiment)}"
    assert int(postgres.sql(f"select count(*) from metrics m join runs r on m.run_uuid = r.run_uuid where {active}")) \
        == expected
    assert postgres.sql(f"select count(*) from (select 1 from metrics m join runs r on m.run_uuid = r.run_uuid "
                        f"where {active} group by m.run_uuid, m.key, m.step having count(*) > 1) d") == "0"
    # the sweep table has every target, from the parents that finished
    table = json.loads(Path(client.download_artifacts(sweep.info.run_id, "sweep_table.json")).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert sorted(row["target"] for row in rows) == names and {row["status"] for row in rows} == {"FINISHED"}
