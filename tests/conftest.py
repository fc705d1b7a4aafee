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

import torch  # noqa: E402

from tiny import write_tiny_gpt2  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts with one torch thread, whatever an earlier test set."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    """A 10-layer, d_model 32 random GPT-2 with a 300-token byte-level BPE tokenizer, saved to disk."""
    return str(write_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2"))


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh sqlite tracking store (and artifact folder) for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # ./mlruns artifacts land in the temp folder
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    return uri
