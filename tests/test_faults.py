"""Faults (issue 12 items 2, 3, 5, 8; issue 11's Ctrl-C while logging and slow bad run ids): signals at every
phase, SIGKILL leftovers and `amrepro doctor`, stores that cannot be written, outcome files and `amrepro log`."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from forked import Amrepro
from helpers import all_runs, children_of, cli, copy_store, failing_log_batch, free_port, owned_by, wait_for


def _env(uri, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _start(store, cwd, *args):
    return Amrepro(args, _env(store), cwd)  # a separate process (tests/forked.py)


def _parents(store):
    return [r for r in all_runs(store) if "mlflow.parentRunId" not in r.data.tags]


def _optimizing(store, tiny_gpt2, cwd, runs=2):
    """A subprocess `amrepro run` in its optimization loop, for a long time: its last store write before the
    loop (Context.start_top tags the experiment after the parent's params and tags) is done."""
    proc = _start(store, cwd, "run", "--model", tiny_gpt2, "--runs", str(runs), "--epochs", "10000000", "--dim", "3")

    def experiment_tagged():
        parents = _parents(store)
        return parents and "mlflow.experimentKind" in MlflowClient(store).get_experiment(parents[0].info.experiment_id).tags

    wait_for(experiment_tagged, proc, what="the parent run and its experiment's tag")
    return proc


def _logging(store, tiny_gpt2, cwd, runs=60):
    """A subprocess `amrepro run` whose science is done and that is logging its seed runs."""
    proc = _start(store, cwd, "run", "--model", tiny_gpt2, "--runs", str(runs), "--epochs", "1", "--dim", "3")
    # a child that is FINISHED (not merely created): the logging is under way and has kept something
    wait_for(lambda: any(r.info.status == "FINISHED" for r in all_runs(store)), proc, what="the first logged child")
    return proc


# --- item 2: runs after the science -----------------------------------------------------------------------

def test_seed_runs_do_not_exist_before_the_science(tiny_gpt2, store, tmp_path):
    proc = _optimizing(store, tiny_gpt2, tmp_path, runs=3)
    try:
        runs = all_runs(store)  # mid-optimization: the parent alone, RUNNING, no child rows yet
        assert len(runs) == 1 and runs[0].info.status == "RUNNING"
    finally:
        proc.kill()
        proc.communicate()


def test_each_child_costs_one_create_run_and_one_log_batch(tiny_gpt2, store, monkeypatch):
    calls = []
    for name in ("create_run", "log_batch", "set_tag", "log_param", "log_metric"):
        original = getattr(MlflowClient, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, kwargs.get("tags", {}).get("mlflow.parentRunId") if _name == "create_run"
                          else (args[0] if args else kwargs.get("run_id"))))
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(MlflowClient, name, counting)
    result = cli("run", "--model", tiny_gpt2, "--runs", "3", "--epochs", "4", "--dim", "3")
    assert result.exit_code == 0, result.output
    (parent,) = _parents(store)
    for child in children_of(store, parent.info.run_id):
        mine = [name for name, run in calls if run == child.info.run_id]
        assert mine == ["log_batch"], mine  # params, tags, 4-epoch histories, scalars: one call
        assert child.data.params["seed"] and child.data.metrics["act/final"] is not None
        assert child.data.tags["amrepro.pid"] == str(os.getpid()) and child.data.tags["amrepro.host"]
    assert sum(1 for name, run in calls if name == "create_run" and run == parent.info.run_id) == 3
    assert not list(Path("amrepro-outcomes").glob("*.npz"))  # logged: the outcome file is gone


# --- items 2 and 5: signals at every phase ----------------------------------------------------------------

@pytest.mark.parametrize("signum,code,word", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_signal_during_optimization_ends_runs_killed(tiny_gpt2, store, tmp_path, signum, code, word):
    proc = _optimizing(store, tiny_gpt2, tmp_path)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert f"{word}: 0 finished run(s) kept, 1 unfinished run(s) marked KILLED" in err.replace("\n", " ")
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
    (parent,) = all_runs(store)
    assert parent.info.status == "KILLED"
    # item 8: decode/reproduce say it was interrupted, not "not logged by amrepro"
    result = cli("decode", parent.info.run_id)
    assert result.exit_code == 2 and "interrupted" in result.output and "nothing to decode" in result.output


def test_one_ctrl_c_while_logging_only_says_so(tiny_gpt2, store, tmp_path):
    proc = _logging(store, tiny_gpt2, tmp_path, runs=30)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "logging is in progress:" in err and "of 30 runs logged" in err and "amrepro-outcomes" in err
    runs = all_runs(store)
    assert len(runs) == 31 and all(r.info.status == "FINISHED" for r in runs)
    assert not list((tmp_path / "amrepro-outcomes").glob("*.npz"))


@pytest.mark.parametrize("signals_sent", [[signal.SIGINT, signal.SIGINT], [signal.SIGTERM]],
                         ids=["two-ctrl-c", "sigterm"])
def test_stopped_while_logging_keeps_the_results_for_amrepro_log(tiny_gpt2, store, tmp_path, signals_sent):
    proc = _logging(store, tiny_gpt2, tmp_path, runs=30)
    proc.send_signal(signals_sent[0])
    if len(signals_sent) == 2:  # the second Ctrl-C once the first has been handled (it says so)
        wait_for(lambda: "logging is in progress:" in proc.output_so_far()[1], proc, what="the first Ctrl-C's note")
        proc.send_signal(signals_sent[1])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == (143 if signals_sent == [signal.SIGTERM] else 130), err
    (path,) = (tmp_path / "amrepro-outcomes").glob("*.npz")
    flat = err.replace("\n", " ")
    assert f"amrepro-outcomes/{path.name}: `amrepro log amrepro-outcomes/{path.name}` logs it" in flat
    assert "Traceback" not in err
    runs = all_runs(store)
    assert not any(r.info.status == "RUNNING" for r in runs)
    (parent,) = _parents(store)
    assert parent.info.status == "KILLED" and path.stem == parent.info.run_id
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert 1 <= len(finished) < 30

    # item 8: decode says how much of the interrupted run was logged, and decodes that
    result = cli("decode", parent.info.run_id)
    assert result.exit_code == 0, result.output
    out = result.output.replace("\n", " ")
    assert f"{len(finished)} of its 30 runs are used here, {30 - len(finished)} were not logged" in out
    assert f"`amrepro log amrepro-outcomes/{path.name}`" in out

    # amrepro log FILE: the rest goes into the same parent, which ends FINISHED; the file is removed
    os.chdir(tmp_path)
    result = cli("log", f"amrepro-outcomes/{path.name}")
    assert result.exit_code == 0, result.output
    assert not path.exists()
    runs = [r for r in all_runs(store)]
    (parent,) = _parents(store)
    children = children_of(store, parent.info.run_id)
    assert parent.info.status == "FINISHED" and "error" not in parent.data.tags
    assert sorted(int(c.data.params["run_index"]) for c in children) == list(range(30))
    assert all(c.info.status == "FINISHED" for c in children)
    assert "verdict" in parent.data.tags and "stats/n_unique_tokens" in parent.data.metrics


# --- item 5: SIGKILL leftovers ----------------------------------------------------------------------------

def _foreign_running_runs(store):
    """A live run of another process on this host (this test process), and one of another host."""
    from amrepro.tracking import process_tags

    client = MlflowClient(store)
    live = client.create_run("0", run_name="live", tags=process_tags()).info.run_id
    other = client.create_run("0", run_name="other-host", tags={"amrepro.host": "elsewhere.example",
                                                                "amrepro.pid": "1", "amrepro.pid_start": "b:1"})
    return live, other.info.run_id


def test_sigkill_leftovers_are_ended_by_doctor(tiny_gpt2, store, tmp_path):
    proc = _optimizing(store, tiny_gpt2, tmp_path)
    try:  # item 8: decode of a run that is still running says so
        (parent,) = all_runs(store)
        result = cli("decode", parent.info.run_id)
        assert result.exit_code == 2 and f"still running (pid {proc.pid}" in result.output.replace("\n", " ")
    finally:
        proc.kill()
        proc.communicate()
    (killed,) = all_runs(store)
    assert killed.info.status == "RUNNING" and killed.data.tags["amrepro.pid"] == str(proc.pid)
    result = cli("reproduce", killed.info.run_id)  # its process is gone: says so, and names the cure
    assert result.exit_code == 2 and "is gone" in result.output and "amrepro doctor" in result.output
    live, other = _foreign_running_runs(store)

    result = cli("doctor")
    assert result.exit_code == 0, result.output
    out = result.output.replace("\n", " ")
    assert f"KILLED    {killed.info.run_id}" in out and f"pid {proc.pid}" in out
    assert f"running   {live}" in out and f"unchecked {other}" in out
    assert "1 run(s) ended KILLED, 1 still running, 1 left alone unchecked" in out
    client = MlflowClient(store)
    ended = client.get_run(killed.info.run_id)
    assert ended.info.status == "KILLED" and "is gone" in ended.data.tags["error"]
    assert client.get_run(live).info.status == "RUNNING" and client.get_run(other).info.status == "RUNNING"

    result = cli("doctor", "--all")
    assert "1 run(s) ended KILLED, 1 still running, 0 left alone" in result.output.replace("\n", " ")
    assert client.get_run(other).info.status == "KILLED" and client.get_run(live).info.status == "RUNNING"


def test_the_next_run_ends_sigkill_leftovers_of_this_host(tiny_gpt2, store, tmp_path):
    from amrepro.tracking import HOST

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    client = MlflowClient(store)  # what a SIGKILLed `amrepro run` leaves: a RUNNING run whose process is gone
    killed = client.create_run("0", run_name="killed", tags={"amrepro.host": HOST, "amrepro.pid": dead.stdout.strip(),
                                                             "amrepro.pid_start": "x:1"}).info.run_id
    live, other = _foreign_running_runs(store)
    result = cli("run", "--model", tiny_gpt2, "--runs", "1", "--epochs", "2", "--dim", "3")
    assert result.exit_code == 0, result.output
    out = result.output.replace("\n", " ")
    assert f"note: ended 1 run(s) KILLED that amrepro process(es) {dead.stdout.strip()} on {HOST}" in out
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(live).info.status == "RUNNING" and client.get_run(other).info.status == "RUNNING"


# --- item 3: stores that cannot be written ----------------------------------------------------------------

def _existing_store(tmp_path, template) -> Path:
    db = tmp_path / "ro" / "mlflow.db"
    db.parent.mkdir()
    # tables made elsewhere (a copy of an empty store): this process opens the file fresh, as a user's next
    # command would, with no MLflow store cached for its URI
    copy_store(template, db)
    return db


def _bad_store_run(tiny_gpt2, uri, cwd, monkeypatch):
    """`amrepro run` against uri, in-process (the store check needs no subprocess): (result, seconds)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(cwd)
    start = time.time()
    result = cli("run", "--model", tiny_gpt2, "--epochs", "2", "--dim", "3")
    return result, time.time() - start


def test_read_only_sqlite_store_is_one_sentence_and_no_run(tiny_gpt2, tmp_path, monkeypatch, empty_store_db):
    db = _existing_store(tmp_path, empty_store_db)
    # Tests run as root, where chmod stops nothing: SQLite's own read-only mode fails like a read-only file.
    result, _ = _bad_store_run(tiny_gpt2, f"sqlite:///file:{db}?mode=ro&uri=true", tmp_path, monkeypatch)
    assert result.exit_code == 2, result.output
    assert "is read-only, so amrepro cannot log to it (attempt to write a readonly database)" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3
    assert all_runs(f"sqlite:///{db}") == []  # no half-written run


def test_immutable_sqlite_file_is_read_only_too(tiny_gpt2, tmp_path, monkeypatch, empty_store_db):
    db = _existing_store(tmp_path, empty_store_db)
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here")
    try:
        result, _ = _bad_store_run(tiny_gpt2, f"sqlite:///{db}", tmp_path, monkeypatch)
    finally:
        subprocess.run(["chattr", "-i", str(db)])
    assert result.exit_code == 2 and "is read-only" in result.output and "Traceback" not in result.output
    assert all_runs(f"sqlite:///{db}") == []


@pytest.mark.parametrize("uri,message", [
    ("sqlite:////no/such/dir/mlflow.db", "cannot use the MLflow tracking store at sqlite:////no/such/dir"),
    ("http://127.0.0.1:PORT", "cannot use the MLflow tracking store at http://127.0.0.1:"),
    ("foo://bar", "cannot use the MLflow tracking store at foo://bar"),
], ids=["missing-folder", "no-server", "garbage-scheme"])
def test_unusable_stores_fail_fast_with_one_sentence(tiny_gpt2, tmp_path, monkeypatch, uri, message):
    result, seconds = _bad_store_run(tiny_gpt2, uri.replace("PORT", str(free_port())), tmp_path, monkeypatch)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 3
    assert seconds < 10  # MLflow's own retries take minutes
    assert not Path("/no/such/dir").exists()  # MLflow would have created the folder of a mistyped path


def test_store_error_while_logging_keeps_the_results(tiny_gpt2, store, monkeypatch):
    original, seen = MlflowClient.log_batch, []

    def failing(self, run_id, *args, **kwargs):
        seen.append(run_id)
        if len(seen) == 4:  # parent params, child 0, child 1, then child 2 fails
            raise RuntimeError("(sqlite3.OperationalError) disk I/O error")
        return original(self, run_id, *args, **kwargs)
    monkeypatch.setattr(MlflowClient, "log_batch", failing)
    result = cli("run", "--model", tiny_gpt2, "--runs", "3", "--epochs", "3", "--dim", "3")
    assert result.exit_code == 3, result.output
    (path,) = Path("amrepro-outcomes").glob("*.npz")
    out = result.output.replace("\n", " ")
    assert "failed: (sqlite3.OperationalError) disk I/O error" in out and f"amrepro log amrepro-outcomes/{path.name}" in out
    assert not any(r.info.status == "RUNNING" for r in all_runs(store))
    monkeypatch.setattr(MlflowClient, "log_batch", original)
    result = cli("log", str(path))
    assert result.exit_code == 0, result.output
    (parent,) = _parents(store)
    assert parent.info.status == "FINISHED"
    assert [c.info.status for c in children_of(store, parent.info.run_id)] == ["FINISHED"] * 3


def test_log_refuses_what_is_not_an_outcome_file(store, tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    for name, says in (("x.npz", "is not an amrepro outcome file (ValueError)."), ("missing.npz", "does not exist.")):
        result = cli("log", str(tmp_path / name))
        assert result.exit_code == 2 and result.output.strip() == f"error: {tmp_path / name} {says}", result.output
    assert all_runs(store) == []  # nothing was logged


# --- item 8 of issue 11: a bad run id answers in the time of `import mlflow` ------------------------------

def test_bad_run_id_does_not_load_torch(store):
    MlflowClient(store).search_experiments()
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom amrepro.cli import app\n"
            "for command in ('decode', 'reproduce'):\n"
            "    result = CliRunner().invoke(app, [command, '0123456789abcdef0123456789abcdef'])\n"
            "    assert result.exit_code == 2 and 'no run with id' in result.output, result.output\n"
            "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules, 'a bad id loaded torch'\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=_env(store))


# --- issue 17: a figure that cannot be drawn costs only itself --------------------------------------------

def test_a_figure_that_fails_costs_only_itself(tiny_gpt2, store, monkeypatch):
    from amrepro import figures

    def broken(*args):
        raise ValueError("There are 267 color bins including extensions, but ncolors = 256")
    monkeypatch.setattr(figures, "token_grid", broken)
    result = cli("run", "--model", tiny_gpt2, "--runs", "2", "--epochs", "2", "--dim", "3", "--figures", "true")
    assert result.exit_code == 0, result.output
    assert "warning: the figure figures/token_grid.png of run" in result.output and "Traceback" not in result.output
    (parent,) = _parents(store)
    assert parent.info.status == "FINISHED" and "stats/n_unique_tokens" in parent.data.metrics
    assert "figures/token_grid.png: ValueError: There are 267" in parent.data.tags["amrepro.figures_failed"]
    logged = {a.path for a in MlflowClient(store).list_artifacts(parent.info.run_id, "figures")}
    assert "figures/curves.png" in logged and "figures/token_grid.png" not in logged
    assert [c.info.status for c in children_of(store, parent.info.run_id)] == ["FINISHED"] * 2


# --- issue 17: outcome files are checked whole, private, and hold no password -----------------------------

def _kept_outcome(tiny_gpt2, monkeypatch) -> Path:
    """An outcome file, as `amrepro run` keeps it when the store fails while logging (the third child)."""
    original, seen = MlflowClient.log_batch, []

    def failing(self, run_id, *args, **kwargs):
        seen.append(run_id)
        if len(seen) == 4:
            raise RuntimeError("(sqlite3.OperationalError) disk I/O error")
        return original(self, run_id, *args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "log_batch", failing)
        result = cli("run", "--model", tiny_gpt2, "--runs", "3", "--epochs", "3", "--dim", "3")
    assert result.exit_code == 3, result.output
    (path,) = Path("amrepro-outcomes").glob("*.npz")
    return path


def _rewritten(path: Path, to: Path, change) -> Path:
    """A copy of the outcome file at path with change(meta, arrays) applied."""
    import json

    import numpy as np

    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays.pop("meta.json").tobytes().decode())
    change(meta, arrays)
    arrays["meta.json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(to, "wb") as f:
        np.savez(f, **arrays)
    return to


def test_bad_outcome_files_are_one_sentence_and_log_nothing(tiny_gpt2, store, monkeypatch, tmp_path):
    """Crafted or truncated files (a missing key, an extra field, rows that disagree with the runs, wrong types,
    a cut-off file) are refused whole before anything is logged; the intact file still logs."""
    import numpy as np

    path = _kept_outcome(tiny_gpt2, monkeypatch)
    assert path.stat().st_mode & 0o777 == 0o600  # the parameters, tags and environment: the owner's alone
    changes = {
        "missing key": lambda meta, arrays: meta.pop("summary"),
        "extra field": lambda meta, arrays: meta.update(surprise=1),
        "fewer seeds than runs": lambda meta, arrays: meta.update(seeds=meta["seeds"][:2]),
        "a token row too short": lambda meta, arrays: meta["tokens"][1].pop(),
        "ids of other runs": lambda meta, arrays: arrays.update(ids=arrays["ids"][:2]),
        "a missing array": lambda meta, arrays: arrays.pop("cosine"),
        "an unknown array": lambda meta, arrays: arrays.update({"result.extra": np.zeros(3)}),
        "params of the wrong type": lambda meta, arrays: meta.update(params=[1, 2]),
        "seeds of the wrong type": lambda meta, arrays: meta.update(seeds=["a", "b", "c"]),
        "a diverged run out of range": lambda meta, arrays: meta.update(diverged={"7": "x"}),
        "malformed statistics": lambda meta, arrays: meta["summary"].update(statistics={"metrics": 3}),
    }
    before = len(all_runs(store))
    for name, change in changes.items():
        bad = _rewritten(path, tmp_path / "bad.npz", change)
        result = cli("log", str(bad))
        assert result.exit_code == 2, (name, result.output)
        assert "is not a valid amrepro outcome file" in result.output, (name, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, name
    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    result = cli("log", str(tmp_path / "cut.npz"))
    assert result.exit_code == 2 and "is not an amrepro outcome file" in result.output
    assert len(all_runs(store)) == before  # nothing was logged from any of them
    old = _rewritten(path, tmp_path / "old.npz", lambda meta, arrays: meta.pop("frontier"))  # before epo existed
    result = cli("log", str(old))
    assert result.exit_code == 0, result.output
    (parent,) = _parents(store)
    assert [c.info.status for c in children_of(store, parent.info.run_id)] == ["FINISHED"] * 3


def test_outcome_file_keeps_no_password(tiny_gpt2, store, monkeypatch, tmp_path):
    from amrepro import outcome_file

    saved = outcome_file.load(_kept_outcome(tiny_gpt2, monkeypatch))
    monkeypatch.setenv("AMREPRO_OUTCOMES", str(tmp_path / "elsewhere"))
    path = outcome_file.save(saved.outcome, "0" * 32, "1", "postgresql://amrepro:S3CRET@db.lan/mlflow", saved.params,
                             saved.tags, saved.pip_freeze)
    assert b"S3CRET" not in path.read_bytes() and path.stat().st_mode & 0o777 == 0o600
    # without the password, PGPASSWORD or ~/.pgpass still supply it when `amrepro log` connects
    assert outcome_file.load(path).tracking_uri == "postgresql://amrepro@db.lan/mlflow"


def test_a_password_in_the_tracking_uri_is_never_printed(tiny_gpt2, tmp_path):
    """A store that is down, named with a password: amrepro's sentence names the store, never the password
    (stdout and stderr of a separate process, its file descriptors 1 and 2, where MLflow's own lines and logs go
    too; forked from tests/forked.py's server, which spares the ~3 s of CPU a new interpreter spends importing).
    MLflow's own error message repeats the URI, password and all. (A PostgreSQL URI is redacted by the same code,
    but MLflow retries a PostgreSQL store that is down for about two minutes: too slow for the suite.)"""
    scheme = "http"
    uri = f"{scheme}://amrepro:S3CRET-PW@127.0.0.1:{free_port()}/mlflow"
    proc = _start(uri, tmp_path, "run", "--model", tiny_gpt2, "--epochs", "2", "--dim", "3")
    stdout, stderr = proc.communicate(timeout=120)
    output = stdout + stderr
    assert proc.returncode == 2, output
    assert "S3CRET" not in output and f"{scheme}://amrepro:***@127.0.0.1:" in output


# --- issue 17: an outcome file that cannot be written; compare keeps outcome files; log matches by name --------

@pytest.fixture
def full_tmpfs(tmp_path):
    """A real 64 KiB tmpfs, filled to the last byte: every write under it fails with ENOSPC."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode}): needs root")
    try:
        descriptor = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(descriptor, b"\0" * 4096):
                pass
        except OSError:  # ENOSPC: the disk is full
            pass
        finally:
            os.close(descriptor)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("where", ["not a folder", "full tmpfs"])
def test_an_outcome_file_that_cannot_be_written_logs_straight_to_the_store(tiny_gpt2, store, monkeypatch, where,
                                                                            request):
    folder = "/etc/hostname/x" if where == "not a folder" else str(request.getfixturevalue("full_tmpfs") / "out")
    monkeypatch.setenv("AMREPRO_OUTCOMES", folder)
    result = cli("run", "--model", tiny_gpt2, "--runs", "2", "--epochs", "2", "--dim", "3")
    assert result.exit_code == 0, result.output
    out = result.output.replace("\n", " ")
    why = "Not a directory" if where == "not a folder" else "No space left on device"
    assert f"warning: the outcome file {folder}/" in out and why in out and "logging straight to" in out
    (parent,) = _parents(store)
    assert parent.info.status == "FINISHED" and "stats/n_unique_tokens" in parent.data.metrics
    assert [c.info.status for c in children_of(store, parent.info.run_id)] == ["FINISHED"] * 2
    if where == "full tmpfs":  # the folder could be made, the file not: no half-written .partial is left
        assert Path(folder).is_dir() and not list(Path(folder).iterdir())
    assert not Path("amrepro-outcomes").exists()


def test_when_the_outcome_file_and_the_store_both_fail_the_message_says_the_results_are_lost(
        tiny_gpt2, store, monkeypatch):
    monkeypatch.setenv("AMREPRO_OUTCOMES", "/etc/hostname/x")
    failing_log_batch(monkeypatch, lambda n, params: params.get("run_index") == "1")
    result = cli("run", "--model", tiny_gpt2, "--runs", "2", "--epochs", "2", "--dim", "3")
    assert result.exit_code == 3, result.output
    out = result.output.replace("\n", " ")
    assert "disk I/O error" in out and "The results not yet logged are LOST: the outcome file /etc/hostname/x/" in out
    assert "Traceback" not in out and "amrepro log" not in out
    assert not any(r.info.status == "RUNNING" for r in all_runs(store))


def test_log_into_another_store_matches_the_experiment_by_name(tiny_gpt2, store, monkeypatch, tmp_path,
                                                               empty_store_db):
    """The file's experiment id names another team's private experiment in the other store: the parent goes to
    the experiment of the file's NAME (created, then found), and an old file without a name to the default."""
    import shutil

    with monkeypatch.context() as patch:  # parent params, child 0, child 1, then child 2 fails
        failing_log_batch(patch, lambda n, params: n == 4)
        result = cli("run", "--model", tiny_gpt2, "--runs", "3", "--epochs", "3", "--dim", "3", "--experiment", "team-a")
    assert result.exit_code == 3, result.output
    (path,) = Path("amrepro-outcomes").glob("*.npz")
    other = copy_store(empty_store_db, tmp_path / "other.db")
    client = MlflowClient(other)
    private = client.create_experiment("private")
    assert private == MlflowClient(store).get_experiment_by_name("team-a").experiment_id  # the same id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    copies = [shutil.copy(path, tmp_path / f"copy{i}.npz") for i in range(2)]
    old = _rewritten(path, tmp_path / "old.npz", lambda meta, arrays: meta.pop("experiment_name"))
    for file, says in ((copies[0], "logging into the new experiment 'team-a'"),
                       (copies[1], "logging into the existing experiment 'team-a'"),
                       (old, "logging into the default experiment 'amrepro'")):
        logged = cli("log", str(file))
        assert logged.exit_code == 0, logged.output
        assert says in logged.output.replace("\n", " "), logged.output
    team_a = client.get_experiment_by_name("team-a").experiment_id
    default = client.get_experiment_by_name("amrepro").experiment_id
    assert not client.search_runs([private])  # another team's experiment is untouched
    assert len([r for r in client.search_runs([team_a]) if "run_index" not in r.data.params]) == 2
    assert len([r for r in client.search_runs([default]) if "run_index" not in r.data.params]) == 1


def test_runs_the_store_cannot_end_are_reported_as_running(tiny_gpt2, store, monkeypatch):
    """A server that is gone cannot end the open runs: the message says they stay RUNNING and what ends them."""
    failing_log_batch(monkeypatch, lambda n, params: params.get("run_index") == "1")

    def down(self, *args, **kwargs):
        raise RuntimeError("Connection refused")
    original_end = MlflowClient.set_terminated
    monkeypatch.setattr(MlflowClient, "set_tag", down)  # the error tag, then set_terminated: both refused
    monkeypatch.setattr(MlflowClient, "set_terminated", lambda self, run_id, status=None, *a, **k: (
        down(self) if status in ("FAILED", "KILLED") else original_end(self, run_id, status, *a, **k)))
    result = cli("run", "--model", tiny_gpt2, "--runs", "2", "--epochs", "2", "--dim", "3")
    assert result.exit_code == 3, result.output
    out = result.output.replace("\n", " ")
    assert "2 could not be ended (the store failed) and stay RUNNING until `amrepro doctor`" in out, out
    assert "Every result is kept in" in out
    assert sum(r.info.status == "RUNNING" for r in all_runs(store)) == 2  # the parent and the seed run


# --- issue 17 §3: recovery never destroys live work --------------------------------------------------------
def test_log_refuses_a_parent_whose_run_is_still_alive(tiny_gpt2, store, monkeypatch):
    """`amrepro log FILE` while the `run` that wrote FILE still logs duplicated seed runs: refused in one
    sentence while that process lives here; for another host only with --force."""
    original, seen = MlflowClient.log_batch, []

    def failing(self, run_id, *args, **kwargs):
        seen.append(run_id)
        if len(seen) == 4:  # parent params, child 0, child 1, then child 2 fails: the rest is in the file
            raise RuntimeError("(sqlite3.OperationalError) disk I/O error")
        return original(self, run_id, *args, **kwargs)
    monkeypatch.setattr(MlflowClient, "log_batch", failing)
    lost = cli("run", "--model", tiny_gpt2, "--runs", "3", "--epochs", "3", "--dim", "3")
    assert lost.exit_code == 3, lost.output
    monkeypatch.setattr(MlflowClient, "log_batch", original)
    (path,) = Path("amrepro-outcomes").glob("*.npz")
    (parent,) = _parents(store)
    statuses = [r.info.status for r in all_runs(store)]  # the message names the status the runs were given
    assert (f"{statuses.count('FINISHED')} finished run(s) kept, {statuses.count('FAILED')} unfinished run(s) "
            "marked FAILED") in " ".join(lost.output.split()) and "KILLED" not in statuses
    before = len(all_runs(store))

    owned_by(store, parent.info.run_id, os.getpid())  # this test's own process: alive
    result = cli("log", str(path))
    assert result.exit_code == 2 and path.exists() and len(all_runs(store)) == before
    assert (f"run {parent.info.run_id} is still being written by amrepro process {os.getpid()} on this host"
            in " ".join(result.output.split())) and len(result.output.strip().splitlines()) <= 3

    owned_by(store, parent.info.run_id, os.getpid(), host="another-host")
    result = cli("log", str(path))
    assert result.exit_code == 2 and "cannot be checked from" in result.output and "--force" in result.output
    result = cli("log", str(path), "--force")
    assert result.exit_code == 0, result.output
    (parent,) = _parents(store)
    assert parent.info.status == "FINISHED" and len(children_of(store, parent.info.run_id)) == 3
