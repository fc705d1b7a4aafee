"""Everything MLflow: the only module that imports mlflow.

Layout (stable names, users' scripts depend on them):
- parent run (the one `mlflow run` created, via MLFLOW_RUN_ID, or a new one): all hyperparameters as params,
  environment tags `env.*`, metrics n_unique_tokens / n_tokens_total / unique_fraction, summary.json;
- one child run per seed (tag mlflow.parentRunId, named seed-N): params incl. its own seed and run_index,
  per-epoch metrics loss/total and act/target (step = epoch), act/final and act/decoded, artifacts
  embeddings/initial.npy, embeddings/final.npy, tokens.json, each with a sha256/<path> tag.
- `amrepro sweep`: a sweep run (params: every hyperparameter but the target, plus `targets`; the table
  sweep_table.json, metrics sweep/*, the figure sweep_map.png), under it one parent per target as above, tagged
  amrepro.sweep = <sweep run id> and amrepro.target = <target name>, each with its seed runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import socket
import tempfile
import time
from contextlib import contextmanager

import numpy as np

from . import signals
from .config import AmreproError
from .secrets import has_credentials, redact

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no download bars on stderr
# A tracking server that goes away: MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) retry one
# request for 4+ minutes, and every later request again. Ours give up on a server that stays down after about
# a minute (waits 0+4+8+16+32 s, plus jitter), and lose nothing from one that is back within that minute.
# A user who sets MLflow's own variables keeps them.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
for _key, _value in HTTP_RETRY_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
if not os.environ.get("AMREPRO_DEBUG"):  # a store error is one sentence from amrepro, not MLflow's logged traceback
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


class StoreLost(Exception):
    """The tracking store failed after the science was done: the results are in an outcome file (exit 3)."""


# --- which process owns a RUNNING run ---------------------------------------------------------------------
HOST = socket.gethostname()


def _process_start(pid: int) -> str:
    """'<boot id>:<start ticks>' of a live process (Linux), '' where /proc cannot tell: with the pid it tells
    a live owner from a later process that reuses its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = f.read().rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()}:{ticks}"
    except (OSError, IndexError):
        return ""


def process_tags() -> dict[str, str]:
    """Tags on every run amrepro creates: a later `amrepro doctor` (or `amrepro run`) on this host can tell
    a run whose process was SIGKILLed from one that is still running."""
    pid = os.getpid()
    return {"amrepro.host": HOST, "amrepro.pid": str(pid), "amrepro.pid_start": _process_start(pid)}


def owner_alive(tags: dict[str, str]) -> bool | None:
    """True/False for a run made on this host (is its process still the one that made it?), None when it
    cannot be verified (another host, or no amrepro.pid tag)."""
    if tags.get("amrepro.host") != HOST or not tags.get("amrepro.pid", "").isdigit():
        return None
    pid = int(tags["amrepro.pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    started = tags.get("amrepro.pid_start", "")
    return not started or _process_start(pid) in ("", started)


class _Shielded:
    """An MlflowClient whose calls are never cut in half by Ctrl-C or SIGTERM (see signals.py); the duration
    of a failed call is kept on the exception, so a caller can say how long the store was tried."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            start = time.monotonic()
            with signals.shielded():
                try:
                    return attr(*args, **kwargs)
                except Exception as error:
                    error.amrepro_store_seconds = time.monotonic() - start
                    raise
        return call


def store_problem(error: BaseException, uri: str) -> str:
    """One sentence for an exception a store call raised (credentials in the URI or the error redacted)."""
    return redact(_store_problem(error, uri))


def _store_problem(error: BaseException, uri: str) -> str:
    text = str(error)
    found = re.search(r"[^\n]*(readonly database|read-only file system|permission denied)[^\n]*", text, re.IGNORECASE)
    if found:
        why = re.sub(r"^\(\w+\.\w+\) ", "", found.group(0).strip())[:200]  # drop "(sqlite3.OperationalError) "
        return f"the MLflow tracking store at {uri} is read-only, so amrepro cannot log to it ({why})"
    seconds = getattr(error, "amrepro_store_seconds", None)
    if uri.startswith(("http://", "https://")) and re.search(
            r"Max retries exceeded|Connection refused|timed out|ConnectionError|Failed to establish", text):
        return (f"the MLflow tracking server at {uri} did not answer"
                + (f" for {seconds:.0f} s" if seconds is not None else "")
                + f" (MLFLOW_HTTP_REQUEST_MAX_RETRIES={os.environ.get('MLFLOW_HTTP_REQUEST_MAX_RETRIES')}, "
                  f"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR={os.environ.get('MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR')})")
    return f"the MLflow tracking store at {uri} failed: {_short(error)}"


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


def connect(uri: str | None = None):
    """(MlflowClient, uri) for MLflow's configured store (or uri), checked with one cheap request: a store that is down
    or unusable is one clear sentence within seconds. Opening a fresh sqlite store creates its tables, which
    is done under a lock so that concurrent workers can start on a store that does not exist yet."""
    import mlflow
    from mlflow import MlflowClient

    uri = uri or mlflow.get_tracking_uri()
    if has_credentials(uri):  # MLflow's "View run ... at" lines would print the host with its password
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:///file:"):
        folder = os.path.dirname(os.path.abspath(uri[len("sqlite:///"):].split("?")[0]))
        if not os.path.isdir(folder):  # MLflow would create it: a typo in the path would start an empty store
            raise AmreproError(f"cannot use the MLflow tracking store at {uri}: the folder {folder} does not exist "
                               "(create it first, or correct MLFLOW_TRACKING_URI).")
    with _quick_http_failure(), _sqlite_creation_lock(uri), signals.shielded():
        try:
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)
        except Exception as error:  # noqa: BLE001 - any failure means the store is unusable
            if re.search(r"readonly database|read-only file system", str(error), re.IGNORECASE):
                raise AmreproError(store_problem(error, uri) + ".") from None
            raise AmreproError(redact(f"cannot use the MLflow tracking store at {uri}: {_short(error)}")) from None
    return _Shielded(client), uri


SWEEP_TAG, TARGET_TAG = "amrepro.sweep", "amrepro.target"  # on target parents: the sweep run id, the target name
BATCH_TAG = "amrepro.batch"  # on target parents: the targets optimized in the same batch (batch.batch_tag)
DEFAULT_EXPERIMENT = "amrepro"  # every model and target in one runs table; the run names tell them apart
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


class Tracker:
    """Creates, fills and ends runs. As a context manager it guarantees no run is left RUNNING:
    on an exception every open run ends FAILED (KILLED on Ctrl-C) with the error as a tag."""

    def __init__(self, experiment: str | None = None, uri: str | None = None):
        self.client, self.uri = connect(uri)  # fails fast, before minutes of model loading and optimization
        self.experiment = experiment
        self.open_runs: list[str] = []
        self.attached: str | None = None
        self.n_finished = 0  # runs this tracker ended FINISHED (they stay so, whatever happens next)
        self.n_stopped = 0  # runs it ended FAILED or KILLED on the way out of an error
        self.n_unended = 0  # open runs it could not end (the store itself failed)
        self._batch: dict | None = None  # see batched()
        self.outcome_path = None  # the outcome file holding results not yet logged (commands.run sets it)

    # --- connection -------------------------------------------------------------------------------------
    def _experiment_id(self) -> str:
        """--experiment, else MLflow's own variables (MLFLOW_EXPERIMENT_NAME / _ID), else DEFAULT_EXPERIMENT:
        never MLflow's catch-all 'Default'."""
        from mlflow.tracking.fluent import _get_experiment_id

        if not self.experiment and (os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("MLFLOW_EXPERIMENT_ID")):
            return _get_experiment_id() or "0"
        name = self.experiment or DEFAULT_EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, tags={EXPERIMENT_KIND: MODEL_TRAINING})
        except Exception:  # noqa: BLE001 - another process created it a moment ago
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def mark_experiment(self, experiment_id: str) -> None:
        """Tag the experiment as model training, so MLflow 3 (where it reads the tag) lists runs, not traces."""
        self.write(self.client.set_experiment_tag, experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)

    # --- lifecycle --------------------------------------------------------------------------------------
    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            return
        self._batch = None
        status = "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
        if status == "KILLED":
            message = "terminated (SIGTERM)" if issubclass(kind, signals.Terminated) else "interrupted (Ctrl-C)"
        else:
            message = _short(error)
        with signals.ignored(), _quick_http_failure():  # a store that just failed is not retried for minutes
            for run_id in list(self.open_runs):
                try:
                    self.client.set_tag(run_id, "error", message[:5000])
                    self.end(run_id, status)
                    self.n_stopped += 1
                except Exception:  # noqa: BLE001 - the store itself may be what failed; keep ending the rest
                    self.n_unended += 1

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        with signals.shielded():  # the store and open_runs agree, whenever a Ctrl-C comes
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
            self.write(self._log, run_id, tags=process_tags())  # a SIGKILL from now on is found by `amrepro doctor`
        self.attached = run_id
        return run_id

    def write(self, fn, *args, **kwargs):
        """A store write before any result exists: a store that refuses it (read-only, gone) is bad input."""
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001
            if not hasattr(error, "amrepro_store_seconds"):
                raise
            raise AmreproError(store_problem(error, self.uri) + ".") from None

    def start_parent(self, params: dict[str, str], tags: dict[str, str], run_name: str | None = None,
                     experiment_id: str | None = None) -> str:
        """The attached `mlflow run` run, or a new one; log params and tags on it."""
        run_id = self.attached
        if run_id:
            # mlflow run already logged the MLproject parameters (MLflow refuses to change a param), and gave
            # the run a random name ("painted-rook-610"): amrepro's name says what it is.
            existing = self.client.get_run(run_id).data.params
            params = {k: v for k, v in params.items() if k not in existing}
            if run_name:
                tags = {**tags, "mlflow.runName": run_name}
        else:
            with signals.shielded():  # a run that exists is in open_runs, whenever a Ctrl-C comes
                run_id = self.write(lambda: self.client.create_run(experiment_id or self._experiment_id(),
                                                                   run_name=run_name, tags=process_tags()).info.run_id)
                self.open_runs.append(run_id)
        self.write(self._log, run_id, params=params, tags={**tags, **process_tags()})
        return run_id

    def start_top(self, params: dict[str, str], tags: dict[str, str], run_name: str | None = None) -> tuple[str, str]:
        """start_parent for a command's top run (run, sweep, compare): (run id, its experiment id), with the
        experiment tagged as model training (mark_experiment)."""
        run_id = self.start_parent(params, tags, run_name)
        experiment_id = self.write(self.client.get_run, run_id).info.experiment_id
        self.mark_experiment(experiment_id)
        return run_id, experiment_id

    def start_child(self, parent_id: str, name: str, params: dict[str, str], experiment_id: str | None = None) -> str:
        """A child run with its params; inside batched(run) the params wait for the run's one log_batch."""
        experiment_id = experiment_id or self.client.get_run(parent_id).info.experiment_id
        with signals.shielded():
            run = self.client.create_run(experiment_id, run_name=name,
                                         tags={"mlflow.parentRunId": parent_id, **process_tags()})
            self.open_runs.append(run.info.run_id)
        self._log(run.info.run_id, params=params)
        return run.info.run_id

    def reopen(self, run_id: str):
        """(run_id, experiment id) of a run that exists and is not FINISHED, set RUNNING again and held open
        (for `amrepro log`); (None, None) otherwise."""
        try:
            run = self.client.get_run(run_id)
        except Exception as error:  # noqa: BLE001 - no such run (the store answering is checked by connect)
            if "RESOURCE_DOES_NOT_EXIST" in str(error) or "not found" in str(error).lower():
                return None, None
            raise
        if run.info.status == "FINISHED" or run.info.lifecycle_stage == "deleted":
            return None, None
        with signals.shielded():
            self.client.update_run(run_id, status="RUNNING")
            self.open_runs.append(run_id)
        if "error" in run.data.tags:
            self.client.delete_tag(run_id, "error")
        self._log(run_id, tags=process_tags())
        return run_id, run.info.experiment_id

    def experiment_exists(self, experiment_id: str) -> bool:
        try:
            return self.client.get_experiment(experiment_id).lifecycle_stage == "active"
        except Exception:  # noqa: BLE001
            return False

    @contextmanager
    def batched(self, run_id: str):
        """Params, tags and metrics logged to run_id inside the block go to the store as ONE log_batch at its
        end (MLflow splits it into its own size limits): a child costs create_run, one artifact upload, one
        log_batch and set_terminated, whatever it logs."""
        self._batch = {"run_id": run_id, "params": {}, "tags": {}, "metrics": []}
        try:
            yield
            batch, self._batch = self._batch, None
            self._send(run_id, batch["params"], batch["tags"], batch["metrics"])
        finally:
            self._batch = None

    def children(self, parent_id: str, experiment_id: str) -> list:
        return self.client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                                       max_results=50000)

    # --- sweeps: a sweep run, one parent per target (tags amrepro.sweep, amrepro.target), seed children --------
    def sweep_parents(self, sweep_id: str, experiment_id: str) -> list:
        """Every live (not deleted) target parent of a sweep: how a worker finds a target before creating it."""
        return self.client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_id}'",
                                       max_results=50000)

    def discard(self, run, why: str) -> None:
        """A target parent (and its seed runs) that a dead worker or an interrupted sweep left unfinished: ended
        KILLED with the reason, then deleted, so the target is redone by one new parent, never counted twice.
        (Deleted runs stay in the store's trash: `mlflow gc` removes them for good.)"""
        run_id = run.info.run_id
        for child in self.children(run_id, run.info.experiment_id):
            if child.info.status == "RUNNING":
                self.client.set_terminated(child.info.run_id, status="KILLED")
            self.client.delete_run(child.info.run_id)
        self.client.set_tag(run_id, "error", why[:5000])
        if run.info.status == "RUNNING":
            self.client.set_terminated(run_id, status="KILLED")
        self.client.delete_run(run_id)

    # --- runs left RUNNING by a process that is gone (SIGKILL, OOM killer, power loss) ---------------------
    def leftovers(self) -> list[tuple[object, bool | None]]:
        """Every RUNNING amrepro run of the store, with owner_alive(): False = its process is gone."""
        from mlflow.entities import ViewType

        experiments = [e.experiment_id for e in self.client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        if not experiments:
            return []
        runs = self.client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'", max_results=50000)
        return [(r, owner_alive(r.data.tags)) for r in runs if _made_by_amrepro(r)]

    def end_leftover(self, run, why: str) -> None:
        self.client.set_tag(run.info.run_id, "error", why)
        self.client.set_terminated(run.info.run_id, status="KILLED")

    # --- logging ----------------------------------------------------------------------------------------
    def _log(self, run_id: str, params=None, tags=None, metrics=None) -> None:
        if self._batch is not None and self._batch["run_id"] == run_id:
            self._batch["params"].update(params or {})
            self._batch["tags"].update(tags or {})
            self._batch["metrics"] += metrics or []
            return
        self._send(run_id, params or {}, tags or {}, metrics or [])

    def _send(self, run_id: str, params: dict, tags: dict, metrics: list) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if not (params or tags or metrics):
            return
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, step) for k, v, step in metrics],
            params=[Param(k, str(v)) for k, v in params.items()],
            tags=[RunTag(k, str(v)) for k, v in tags.items()])

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

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        self._log(run_id, params=params)

    def log_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self._log(run_id, tags=tags)

    def log_table(self, run_id: str, columns: dict[str, list], path: str) -> None:
        """A table the MLflow UI shows as a table (Artifacts tab): columns name -> values, as a .json artifact."""
        self.client.log_table(run_id, data=columns, artifact_file=path)

    def log_figure(self, run_id: str, figure, path: str) -> None:
        import warnings

        with warnings.catch_warnings():  # a token in a script the font lacks is drawn as a box, not an error
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            self.client.log_figure(run_id, figure, path)


def _state(run) -> str:
    """'' for a FINISHED run, else what happened to it, in words."""
    status, tags = run.info.status, run.data.tags
    if status == "FINISHED":
        return ""
    if status == "RUNNING":
        alive = owner_alive(tags)
        where = f" (pid {tags.get('amrepro.pid')} on {tags.get('amrepro.host')})" if "amrepro.pid" in tags else ""
        if alive is False:
            return f"marked RUNNING but its process{where} is gone (`amrepro doctor` ends it KILLED)"
        return f"still running{where}"
    if status == "KILLED":
        return f"interrupted (KILLED: {tags.get('error', 'no reason logged')})"
    return f"{status} ({tags.get('error', 'no reason logged')})"


def _outcome_file_note(parent_id: str) -> str:
    from . import outcome_file

    path = outcome_file.path_for(parent_id)
    return f"its results are kept in {path}: `amrepro log {path}` logs them" if path.exists() else ""


def _made_by_amrepro(run) -> bool:
    tags, params = run.data.tags, run.data.params
    return ("amrepro.host" in tags or "amrepro.reproduces" in tags or "target_name" in params
            or "run_index" in params)


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
        """(parent run, child runs) for a run id: the one child asked for, or every logged child of the parent
        asked for, by run_index. A parent that was interrupted or is still running gives its finished children
        and says so in self.note; one with none says what happened instead of "not made by amrepro"."""
        run = self.run(run_id)
        original = run.data.tags.get("amrepro.reproduces")
        if original:  # nested under the run it re-ran, but it is a comparison, not a seed run
            raise AmreproError(f"run {run_id} is a reproduction of run {original} (see its reproduction.json); "
                               f"decode or reproduce {original} itself.")
        if "amrepro.compare" in run.data.tags:  # its children are method runs, each a parent of seed runs
            raise AmreproError(f"run {run_id} is an `amrepro compare` run of {run.data.tags['amrepro.compare']}; "
                               "decode or reproduce one of its method runs.")
        # a seed run has a run_index; a method run of a compare is nested too, but is itself a parent
        parent_id = run.data.tags.get("mlflow.parentRunId") if "run_index" in run.data.params else None
        parent = self.run(parent_id) if parent_id else run
        if "target_name" not in parent.data.params:
            raise AmreproError(f"run {run_id} was not made by `amrepro run` (no amrepro params or child runs).")
        children = self.client.search_runs([parent.info.experiment_id],
                                           filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                           max_results=50000)
        children = sorted((c for c in children if "run_index" in c.data.params),
                          key=lambda c: int(c.data.params["run_index"]))
        done = [c for c in children if c.info.status == "FINISHED"]  # diverged (FAILED) runs have no tokens
        n_runs = int(parent.data.params.get("runs", len(children)) or 0)
        state = _state(parent)
        kept = _outcome_file_note(parent.info.run_id)
        self.note = None
        if parent_id:  # one child asked for
            if run.info.status != "FINISHED":
                raise AmreproError(f"run {run_id} is {_state(run)}, so it has no tokens to decode"
                                   f"{'; ' + kept if kept else ''}.")
            if state:
                self.note = f"its parent run {parent.info.run_id} is {state}."
            return parent, [run]
        diverged = [c for c in children if c.info.status == "FAILED" and c.data.tags.get("error", "").startswith("diverged")]
        missing = n_runs - len(done) - len(diverged)  # never logged: the run was interrupted or is still going
        if not done:
            if diverged and not missing:
                raise AmreproError(f"run {run_id} has nothing to decode: all its {n_runs} runs diverged.")
            raise AmreproError(f"run {run_id} is {state or 'without child runs'}"
                               f"{f' and none of its {n_runs} runs was logged' if state else ''}, so there is "
                               f"nothing to decode{'; ' + kept if kept else ''}.")
        if missing or diverged:
            parts = [f"{len(done)} of its {n_runs} runs are used here"]
            if diverged:
                parts.append(f"{len(diverged)} diverged")
            if missing:
                parts.append(f"{missing} were not logged{': ' + kept if kept else ''}")
            self.note = f"run {run_id} is {state or 'finished'}: " + ", ".join(parts) + "."
        return parent, done

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
