"""The tracking store: the only module that imports mlflow.

Store is a small interface (create, log_batch, upload, end, search, get, ...) that hands back plain RunRecords;
what amrepro writes where is layout.py; the runs a command opens (none left RUNNING) are context.py's. At the end:
which process owns a RUNNING run (the process tags amrepro.host, .pid, .pid_start), and refusing to touch live ones.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from . import signals
from .config import AmreproError
from .secrets import has_credentials, redact

# No async logging, no download bars on stderr. A tracking server that goes away: MLflow's defaults (7 retries,
# backoff factor 2, 120 s timeout) retry one request for 4+ minutes, and every later request again. Ours give up on
# a server that stays down after about a minute (waits 0+4+8+16+32 s, plus jitter), and lose nothing from one that
# is back within that minute. A user who sets MLflow's own variables keeps them.
for _key, _value in {"MLFLOW_ENABLE_ASYNC_LOGGING": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                     "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}.items():
    os.environ.setdefault(_key, _value)
if not os.environ.get("AMREPRO_DEBUG"):  # a store error is one sentence from amrepro, not MLflow's logged traceback
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


class StoreLost(Exception):
    """The tracking store failed after the science was done: the results are in an outcome file (exit 3)."""


def store_problem(error: BaseException, uri: str) -> str:
    """One sentence for an exception a store call raised (credentials in the URI or the error redacted)."""
    text = str(error)
    found = re.search(r"[^\n]*(readonly database|read-only file system|permission denied)[^\n]*", text, re.IGNORECASE)
    if found:
        why = re.sub(r"^\(\w+\.\w+\) ", "", found.group(0).strip())[:200]  # drop "(sqlite3.OperationalError) "
        return redact(f"the MLflow tracking store at {uri} is read-only, so amrepro cannot log to it ({why})")
    seconds = getattr(error, "amrepro_store_seconds", None)
    if uri.startswith(("http://", "https://")) and re.search(
            r"Max retries exceeded|Connection refused|timed out|ConnectionError|Failed to establish", text):
        return redact(f"the MLflow tracking server at {uri} did not answer"
                      + (f" for {seconds:.0f} s" if seconds is not None else "")
                      + f" (MLFLOW_HTTP_REQUEST_MAX_RETRIES={os.environ.get('MLFLOW_HTTP_REQUEST_MAX_RETRIES')}, "
                        f"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR={os.environ.get('MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR')})")
    return redact(f"the MLflow tracking store at {uri} failed: {short(error)}")


def short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def quick_http_failure():
    """A store that is down should fail in seconds, not after MLflow's minutes of retries."""
    return _environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")


@contextmanager
def _environment(**values: str):
    """Environment variables set for the block (MLflow reads its settings from them at each call), then restored."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


@contextmanager
def _sqlite_creation_lock(folder: str | None):
    """MLflow corrupts a fresh sqlite store when several processes create its tables at once; hold an flock
    on the database's folder while this process opens (and maybe creates) it. Other stores (None): no lock."""
    try:
        import fcntl  # not on Windows: create the store first there
        fd = os.open(folder, os.O_RDONLY) if folder else None
    except (ImportError, OSError):
        fd = None
    if fd is None:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


DEFAULT_EXPERIMENT = "amrepro"  # every model and target in one runs table; the run names tell them apart
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


@dataclass(frozen=True)
class RunRecord:
    """A run as the store holds it, in plain Python: what every other module reads instead of MLflow's objects."""
    id: str
    experiment_id: str
    name: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED
    lifecycle_stage: str  # active, deleted
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]


def _record(run) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(info.run_id, info.experiment_id, info.run_name, info.status, info.lifecycle_stage,
                     dict(data.params), dict(data.tags), dict(data.metrics))


class Store:
    """The tracking store, MLflow's configured one (or uri). Connecting checks it with one cheap request, so a
    store that is down or unusable is one clear sentence within seconds, before minutes of model loading. No call
    is cut in half by Ctrl-C or SIGTERM (signals.py); a failed call keeps its duration on the exception
    (amrepro_store_seconds), so a caller can say how long the store was tried. Another backend is another class
    with these methods."""

    def __init__(self, uri: str | None = None):
        from mlflow import MlflowClient, get_tracking_uri

        uri = uri or get_tracking_uri()
        if has_credentials(uri):  # MLflow's "View run ... at" lines would print the host with its password
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        folder = None  # of a sqlite database (not a "file:" URI)
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:///file:"):
            folder = os.path.dirname(os.path.abspath(uri[len("sqlite:///"):].split("?")[0]))
            if not os.path.isdir(folder):  # MLflow would create it: a typo in the path would start an empty store
                raise AmreproError(f"cannot use the MLflow tracking store at {uri}: the folder {folder} does not "
                                   "exist (create it first, or correct MLFLOW_TRACKING_URI).")
        # opening a fresh sqlite store creates its tables: under a lock, so concurrent workers can start on it
        with quick_http_failure(), _sqlite_creation_lock(folder), signals.shielded():
            try:
                client = MlflowClient(uri)
                client.search_experiments(max_results=1)
            except Exception as error:  # noqa: BLE001 - any failure means the store is unusable
                if re.search(r"readonly database|read-only file system", str(error), re.IGNORECASE):
                    raise AmreproError(store_problem(error, uri) + ".") from None
                raise AmreproError(redact(f"cannot use the MLflow tracking store at {uri}: {short(error)}")) from None
        self._client, self.uri = client, uri
        # runs this Store created: where their artifacts go, and those with a parent run (sweep targets, seed runs).
        # Each saves a request over HTTP: an upload need not ask for the run's artifact location, nor ending a child
        # fetch the run for MLflow's "View run ... at" line (printed for the runs a user opens, not per seed)
        self._artifact_uris: dict[str, str] = {}
        self._children: set[str] = set()

    def _call(self, name, *args, **kwargs):
        """A client method by name (or any callable), uninterruptible, its duration kept on a failure."""
        start = time.monotonic()
        with signals.shielded():
            try:
                return (getattr(self._client, name) if isinstance(name, str) else name)(*args, **kwargs)
            except Exception as error:
                error.amrepro_store_seconds = time.monotonic() - start
                raise

    # --- experiments ------------------------------------------------------------------------------------
    def experiment(self, name: str | None) -> tuple[str, bool]:
        """(id, whether it existed and is active) of the experiment name, else of MLflow's own variables
        (MLFLOW_EXPERIMENT_NAME / _ID), else of DEFAULT_EXPERIMENT: never MLflow's catch-all 'Default'. Created
        (tagged as model training) when it does not exist."""
        from mlflow.tracking.fluent import _get_experiment_id

        if not name and (os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("MLFLOW_EXPERIMENT_ID")):
            return _get_experiment_id() or "0", True
        name = name or DEFAULT_EXPERIMENT
        found = self._call("get_experiment_by_name", name)
        if found:
            return found.experiment_id, found.lifecycle_stage == "active"
        try:
            return self._call("create_experiment", name, tags={EXPERIMENT_KIND: MODEL_TRAINING}), False
        except Exception:  # noqa: BLE001 - another process created it a moment ago
            found = self._call("get_experiment_by_name", name)
            if found is None:
                raise
            return found.experiment_id, False

    def mark_experiment(self, experiment_id: str) -> None:
        """Tag the experiment as model training, so MLflow 3 (where it reads the tag) lists runs, not traces."""
        self._call("set_experiment_tag", experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)

    def experiment_name(self, experiment_id: str) -> str:
        return self._call("get_experiment", experiment_id).name

    def experiment_exists(self, experiment_id: str) -> bool:
        try:
            return self._call("get_experiment", experiment_id).lifecycle_stage == "active"
        except Exception:  # noqa: BLE001
            return False

    # --- runs -------------------------------------------------------------------------------------------
    def get(self, run_id: str) -> RunRecord:
        return _record(self._call("get_run", run_id))

    def search(self, experiment_ids: list[str] | None, filter_string: str) -> list[RunRecord]:
        """Runs matching an MLflow filter, in the given experiments (None: every active one)."""
        if experiment_ids is None:  # search_experiments lists the active ones by default
            experiment_ids = [e.experiment_id for e in self._call("search_experiments")]
            if not experiment_ids:
                return []
        return [_record(r) for r in self._call("search_runs", experiment_ids, filter_string=filter_string,
                                               max_results=50000)]

    def history(self, run_id: str, key: str) -> list[float]:
        """Every value of a metric, by step (a seed run's per-epoch loss/total, act/target)."""
        return [m.value for m in sorted(self._call("get_metric_history", run_id, key), key=lambda m: m.step)]

    def create(self, experiment_id: str, name: str | None, tags: dict[str, str]) -> str:
        info = self._call("create_run", experiment_id, run_name=name, tags=tags).info
        self._artifact_uris[info.run_id] = info.artifact_uri
        if "mlflow.parentRunId" in tags:
            self._children.add(info.run_id)
        return info.run_id

    def log_batch(self, run_id: str, params: dict, tags: dict, metrics: list[tuple[str, float, int]]) -> None:
        """params and tags name -> value, metrics (key, value, step): one request (MLflow splits it into its own
        size limits)."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self._call("log_batch", run_id, metrics=[Metric(k, float(v), now, step) for k, v, step in metrics],
                   params=[Param(k, str(v)) for k, v in params.items()],
                   tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self._call("set_tag", run_id, key, value)

    def delete_tag(self, run_id: str, key: str) -> None:
        self._call("delete_tag", run_id, key)

    def restart(self, run_id: str) -> None:
        """Mark an ended run RUNNING again."""
        self._call("update_run", run_id, status="RUNNING")

    def delete(self, run_id: str) -> None:
        """Into the store's trash (`mlflow gc` removes it for good)."""
        self._call("delete_run", run_id)

    def end(self, run_id: str, status: str) -> None:
        quiet = run_id in self._children and "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ
        with _environment(MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true") if quiet else nullcontext():
            self._call("set_terminated", run_id, status=status)
        self._children.discard(run_id)
        self._artifact_uris.pop(run_id, None)  # held for open runs only (a later upload looks it up)

    # --- artifacts --------------------------------------------------------------------------------------
    def upload(self, run_id: str, files: dict[str, bytes]) -> None:
        """Files (relative path -> bytes) as artifacts of the run, in one upload."""
        with tempfile.TemporaryDirectory() as folder:
            for path, data in files.items():
                (Path(folder) / path).parent.mkdir(parents=True, exist_ok=True)
                (Path(folder) / path).write_bytes(data)
            uri = self._artifact_uris.get(run_id)
            if uri is None:  # a run made elsewhere (`mlflow run`'s, a reopened one): MLflow looks its location up
                self._call("log_artifacts", run_id, folder)
            else:
                from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

                self._call(lambda: get_artifact_repository(uri, tracking_uri=self.uri).log_artifacts(folder))

    def download(self, run_id: str, path: str) -> bytes:
        return Path(self._call("download_artifacts", run_id, path)).read_bytes()

    def log_table(self, run_id: str, columns: dict[str, list], path: str) -> None:
        """A table the MLflow UI shows as a table (Artifacts tab): columns name -> values, as a .json artifact."""
        self._call("log_table", run_id, data=columns, artifact_file=path)

    def log_figure(self, run_id: str, figure, path: str) -> None:
        with warnings.catch_warnings():  # a token in a script the font lacks is drawn as a box, not an error
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            self._call("log_figure", run_id, figure, path)


# --- which process owns a RUNNING run -----------------------------------------------------------------------
# Tags on every run amrepro creates, so that a later `amrepro doctor` (or `amrepro run`) on this host can tell a run
# whose process was SIGKILLed from one that is still running.
HOST = socket.gethostname()
HOST_TAG, PID_TAG, PID_START_TAG = "amrepro.host", "amrepro.pid", "amrepro.pid_start"  # layout.py re-exports them


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
    pid = os.getpid()
    return {HOST_TAG: HOST, PID_TAG: str(pid), PID_START_TAG: _process_start(pid)}


def owner_alive(tags: dict[str, str]) -> bool | None:
    """True/False for a run made on this host (is its process still the one that made it?), None when it
    cannot be verified (another host, or no amrepro.pid tag)."""
    if tags.get(HOST_TAG) != HOST or not tags.get(PID_TAG, "").isdigit():
        return None
    pid = int(tags[PID_TAG])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    started = tags.get(PID_START_TAG, "")
    return not started or _process_start(pid) in ("", started)


def refuse_live(runs, doing: str, force: bool = False) -> None:
    """Before `--resume`, `log` or a discard touches runs: refuse (AmreproError, one sentence) when one is RUNNING
    and its process is alive on this host, or cannot be checked from here (another host, no process tags)
    unless force (as `amrepro doctor --all`). runs: records with .id, .status and .tags."""
    for run in [r for r in runs if r.status == "RUNNING"]:
        alive, tags = owner_alive(run.tags), run.tags
        if alive:
            raise AmreproError(f"run {run.id} is still being written by amrepro process {tags[PID_TAG]} on this "
                               f"host; {doing} now would destroy its work: let it finish, or stop it (kill "
                               f"{tags[PID_TAG]}) and try again.")
        if alive is None and not force:
            where = (f"pid {tags[PID_TAG]} on {tags.get(HOST_TAG)}" if PID_TAG in tags else "no process tags")
            raise AmreproError(f"run {run.id} is RUNNING and its process ({where}) cannot be checked from {HOST}; "
                               f"if it is gone, {doing} with --force.")


def refuse_live_id(store, run_id: str, doing: str, force: bool = False) -> None:
    """refuse_live for one run id; a run the store does not have is nobody's live work."""
    try:
        run = store.get(run_id)
    except Exception:  # noqa: BLE001 - no such run here (the store answering was checked when connecting)
        return
    refuse_live([run], doing, force)
