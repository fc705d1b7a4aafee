"""Everything MLflow: the only module that imports mlflow.

Layout (stable names, users' scripts depend on them):
- parent run (the one `mlflow run` created, via MLFLOW_RUN_ID, or a new one): all hyperparameters as params,
  environment tags `env.*`, metrics n_unique_tokens / n_tokens_total / unique_fraction, summary.json;
- one child run per seed (tag mlflow.parentRunId, named seed-N): params incl. its own seed and run_index,
  per-epoch metrics loss/total and act/target (step = epoch), act/final and act/decoded, artifacts
  embeddings/initial.npy, embeddings/final.npy, tokens.json, each with a sha256/<path> tag.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import time
from contextlib import contextmanager

import numpy as np

from .config import AmreproError

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no download bars on stderr


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array))
    return buffer.getvalue()


def json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=2, ensure_ascii=False).encode()


@contextmanager
def _quick_http_failure():
    """A store that is down should fail in seconds, not after MLflow's minutes of retries."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _sqlite_creation_lock(uri: str):
    """MLflow corrupts a fresh sqlite store when several processes create its tables at once; hold an flock
    on the database's folder while this process opens (and maybe creates) it. Other stores: no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: no flock; create the store first there
        yield
        return
    folder = os.path.dirname(os.path.abspath(uri[len("sqlite:///"):])) or "."
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield  # a folder that does not exist: let MLflow say so
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def connect():
    """(MlflowClient, uri) for MLflow's configured store, checked with one cheap request: a store that is down
    or unusable is one clear sentence within seconds. Opening a fresh sqlite store creates its tables, which
    is done under a lock so that concurrent workers can start on a store that does not exist yet."""
    import mlflow
    from mlflow import MlflowClient

    uri = mlflow.get_tracking_uri()
    with _quick_http_failure(), _sqlite_creation_lock(uri):
        try:
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)
        except Exception as error:  # noqa: BLE001 - any failure means the store is unusable
            raise AmreproError(f"cannot use the MLflow tracking store at {uri}: {_short(error)}") from None
    return client, uri


class Tracker:
    """Creates, fills and ends runs. As a context manager it guarantees no run is left RUNNING:
    on an exception every open run ends FAILED (KILLED on Ctrl-C) with the error as a tag."""

    def __init__(self, experiment: str | None = None):
        self.client, self.uri = connect()  # fails fast, before minutes of model loading and optimization
        self.experiment = experiment
        self.open_runs: list[str] = []
        self.attached: str | None = None
        self.n_finished = 0  # runs this tracker ended FINISHED (they stay so, whatever happens next)
        self.n_stopped = 0  # runs it ended FAILED or KILLED on the way out of an error

    # --- connection -------------------------------------------------------------------------------------
    def _experiment_id(self) -> str:
        from mlflow.tracking.fluent import _get_experiment_id

        if self.experiment:
            found = self.client.get_experiment_by_name(self.experiment)
            return found.experiment_id if found else self.client.create_experiment(self.experiment)
        return _get_experiment_id() or "0"

    # --- lifecycle --------------------------------------------------------------------------------------
    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            return
        status = "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
        message = "interrupted (Ctrl-C)" if status == "KILLED" else _short(error)
        for run_id in list(self.open_runs):
            try:
                self.client.set_tag(run_id, "error", message[:5000])
                self.end(run_id, status)
                self.n_stopped += 1
            except Exception:  # noqa: BLE001 - the store itself may be what failed; keep ending the rest
                pass

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
        self.n_finished += status == "FINISHED"
        if run_id in self.open_runs:
            self.open_runs.remove(run_id)

    def attach_mlflow_run(self) -> str | None:
        """Under `mlflow run`, the run it created (MLFLOW_RUN_ID) is our parent: hold it open from the start,
        so that a failure before the science starts still ends it FAILED."""
        run_id = os.environ.get("MLFLOW_RUN_ID")
        if run_id:
            try:
                self.client.get_run(run_id)
            except Exception:  # noqa: BLE001
                raise AmreproError(f"MLFLOW_RUN_ID={run_id} names no run in {self.uri}.") from None
            self.open_runs.append(run_id)
        self.attached = run_id
        return run_id

    def start_parent(self, params: dict[str, str], tags: dict[str, str], run_name: str | None = None,
                     experiment_id: str | None = None) -> str:
        """The attached `mlflow run` run, or a new one; log params and tags on it."""
        run_id = self.attached
        if run_id:
            # mlflow run already logged the MLproject parameters (MLflow refuses to change a param).
            existing = self.client.get_run(run_id).data.params
            params = {k: v for k, v in params.items() if k not in existing}
        else:
            run_id = self.client.create_run(experiment_id or self._experiment_id(), run_name=run_name).info.run_id
            self.open_runs.append(run_id)
        self._log(run_id, params=params, tags=tags)
        return run_id

    def start_child(self, parent_id: str, name: str, params: dict[str, str]) -> str:
        experiment_id = self.client.get_run(parent_id).info.experiment_id
        run = self.client.create_run(experiment_id, run_name=name, tags={"mlflow.parentRunId": parent_id})
        self.open_runs.append(run.info.run_id)
        self._log(run.info.run_id, params=params)
        return run.info.run_id

    # --- logging ----------------------------------------------------------------------------------------
    def _log(self, run_id: str, params=None, tags=None, metrics=None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, step) for k, v, step in (metrics or [])],
            params=[Param(k, str(v)) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])

    def log_metrics(self, run_id: str, scalars: dict[str, float], history: dict[str, np.ndarray] | None = None):
        """Scalars at step 0 and whole per-epoch histories (step = epoch), in batches: one call per 1000
        values instead of one HTTP/sqlite round trip per value."""
        metrics = [(k, v, 0) for k, v in scalars.items()]
        for key, values in (history or {}).items():
            metrics += [(key, v, step) for step, v in enumerate(np.asarray(values, dtype=float).tolist())]
        self._log(run_id, metrics=metrics)

    def log_artifacts(self, run_id: str, files: dict[str, bytes]) -> None:
        """Write files (relative path -> bytes) as artifacts, each with a sha256/<path> integrity tag."""
        with tempfile.TemporaryDirectory() as folder:
            for path, data in files.items():
                os.makedirs(os.path.dirname(os.path.join(folder, path)) or folder, exist_ok=True)
                with open(os.path.join(folder, path), "wb") as f:
                    f.write(data)
            self.client.log_artifacts(run_id, folder)
        self._log(run_id, tags={f"sha256/{path}": hashlib.sha256(data).hexdigest() for path, data in files.items()})

    def log_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self._log(run_id, tags=tags)

    def log_figure(self, run_id: str, figure, path: str) -> None:
        import warnings

        with warnings.catch_warnings():  # a token in a script the font lacks is drawn as a box, not an error
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            self.client.log_figure(run_id, figure, path)


def _short(error: BaseException | None) -> str:
    text = str(error).strip().splitlines() if error is not None else []
    return (text[0] if text else type(error).__name__)[:300]


class RunReader:
    """Reads amrepro runs back for `decode` and `reproduce`, refusing tampered or missing artifacts."""

    def __init__(self):
        self.client, self.uri = connect()

    def run(self, run_id: str):
        if not re.fullmatch(r"[0-9a-zA-Z_-]{1,64}", run_id or ""):
            raise AmreproError(f"'{run_id}' is not a run id (copy it from the MLflow UI, e.g. 2740715b24f34d20...).")
        try:
            return self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - MLflow raises its own RESOURCE_DOES_NOT_EXIST exception
            raise AmreproError(f"no run with id {run_id} in the tracking store {self.uri}.") from None

    def family(self, run_id: str):
        """(parent run, child runs) for a run id: the one child asked for, or every child of the parent asked
        for, by run_index."""
        run = self.run(run_id)
        parent_id = run.data.tags.get("mlflow.parentRunId")
        parent = self.run(parent_id) if parent_id else run
        children = self.client.search_runs([parent.info.experiment_id],
                                           filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                           max_results=10000)
        children = [c for c in children if "run_index" in c.data.params]
        if "target_name" not in parent.data.params or not children:
            raise AmreproError(f"run {run_id} was not made by `amrepro run` (no amrepro params or child runs).")
        children.sort(key=lambda c: int(c.data.params["run_index"]))
        return parent, ([run] if parent_id else children)

    def artifact(self, run, path: str) -> bytes:
        """The artifact's bytes, checked against the sha256/<path> tag written when it was logged."""
        expected = run.data.tags.get(f"sha256/{path}")
        if expected is None:
            raise AmreproError(f"run {run.info.run_id} has no sha256 tag for {path}: it was not logged by amrepro.")
        try:
            local = self.client.download_artifacts(run.info.run_id, path)
            with open(local, "rb") as f:
                data = f.read()
        except Exception:  # noqa: BLE001
            raise AmreproError(f"artifact {path} of run {run.info.run_id} is missing from the artifact store.") from None
        if hashlib.sha256(data).hexdigest() != expected:
            raise AmreproError(f"artifact {path} of run {run.info.run_id} does not match its sha256 tag: "
                               "it was changed after it was logged, so it cannot be trusted.")
        return data

    def npy(self, run, path: str) -> np.ndarray:
        return np.load(io.BytesIO(self.artifact(run, path)), allow_pickle=False)

    def json(self, run, path: str):
        return json.loads(self.artifact(run, path))
