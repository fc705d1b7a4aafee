"""`reproduce` names the right cause when a result does not come back: edited params, changed weights."""

import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from amrepro.config import Config
from helpers import all_runs, cli, logged_run


@pytest.fixture
def logged(tiny_gpt2, store):
    """A finished 2-seed run: (store uri, parent id, [child ids])."""
    parent, children = logged_run(store, tiny_gpt2, runs=2, epochs=10)
    return store, parent.info.run_id, [c.info.run_id for c in children]


def _edit_param(uri: str, run_id: str, key: str, value: str) -> None:
    """What a user editing the store by hand does (MLflow itself refuses to change a logged param)."""
    with sqlite3.connect(uri.removeprefix("sqlite:///")) as db:
        assert db.execute("UPDATE params SET value = ? WHERE run_uuid = ? AND key = ?", (value, run_id, key)).rowcount == 1


@pytest.mark.parametrize("edited", ["parent", "child"])
def test_an_edited_param_is_named_not_blamed_on_the_environment(logged, edited):
    uri, parent, children = logged
    _edit_param(uri, parent if edited == "parent" else children[1], "lr", "0.02")
    result = cli("reproduce", parent)
    assert result.exit_code == 2, result.output
    assert "lr: parent" in result.output and "edited" in result.output
    assert len(all_runs(uri)) == 3  # nothing was re-run, no new run logged


def test_an_edited_child_seed_is_named(logged):
    uri, parent, children = logged
    _edit_param(uri, children[1], "seed", "7")
    result = cli("reproduce", children[1])
    assert result.exit_code == 2 and "seed 7" in result.output and "edited" in result.output, result.output


def _retag_artifact(uri: str, run_id: str, path: str, data: bytes) -> None:
    """Rewrite an artifact and its sha256 tag together: a result that changed, not a tampered file."""
    import hashlib

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    local = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://")) / path
    local.write_bytes(data)
    client.set_tag(run_id, f"sha256/{path}", hashlib.sha256(data).hexdigest())


def _nudge_final(uri: str, run_id: str, delta: float) -> None:
    import io

    from mlflow import MlflowClient

    local = Path(MlflowClient(uri).get_run(run_id).info.artifact_uri.removeprefix("file://")) / "embeddings/final.npy"
    array = np.load(local)
    array[0, 0] += delta
    buffer = io.BytesIO()
    np.save(buffer, array)
    _retag_artifact(uri, run_id, "embeddings/final.npy", buffer.getvalue())


def test_tiny_difference_in_the_same_environment_is_not_reproduced(logged):
    uri, parent, children = logged
    _nudge_final(uri, children[0], 1e-6)
    result = cli("reproduce", parent)
    assert result.exit_code == 1, result.output
    words = " ".join(result.output.split())  # the terminal may wrap the verdict anywhere
    assert "differs: final embeddings not bit-identical" in words and "in the same environment" in words


def test_tiny_difference_with_another_environment_is_reproduced_within_tolerance(logged):
    from mlflow import MlflowClient

    uri, parent, children = logged
    _nudge_final(uri, children[0], 1e-6)
    MlflowClient(uri).set_tag(parent, "env.torch", "0.0.0-elsewhere")  # the run was made with another torch
    result = cli("reproduce", parent)
    assert result.exit_code == 0, result.output
    assert "reproduced within 0.0001" in result.output and "env.torch" in result.output
    _nudge_final(uri, children[0], 1e-2)  # beyond the tolerance: the environment does not excuse it
    result = cli("reproduce", parent)
    assert result.exit_code == 1 and "differs: final embeddings not bit-identical" in result.output


def test_changed_tokens_are_named(logged):
    import json

    from mlflow import MlflowClient

    uri, parent, children = logged
    local = Path(MlflowClient(uri).get_run(children[1]).info.artifact_uri.removeprefix("file://")) / "tokens.json"
    tokens = json.loads(local.read_text())
    tokens["ids"][0] = (tokens["ids"][0] + 1) % 300
    _retag_artifact(uri, children[1], "tokens.json", json.dumps(tokens).encode())
    result = cli("reproduce", parent)
    assert result.exit_code == 1 and "differs: decoded tokens changed" in result.output, result.output


def test_reproduce_on_an_explicit_device(logged):
    _, parent, _ = logged
    result = cli("reproduce", parent, "--device", "cpu")
    assert result.exit_code == 0 and "reproduced: bit-identical" in result.output, result.output
    if not torch.cuda.is_available():
        result = cli("reproduce", parent, "--device", "cuda")
        assert result.exit_code == 2 and "torch sees no CUDA device" in result.output, result.output


# --- Config.from_params: how every logged run is read back ------------------------------------------------

def test_from_params_inverts_to_params():
    config = Config(model="m", layer=3, dim=7, target="blocks.2.mlp.hook_post[5]", runs=4, epochs=9, n_tokens=2,
                    lr=0.5, l2=0.25, seed=11, device="cpu", threads=1)
    assert Config.from_params(config.to_params()) == config


def test_from_params_reads_mlflow_run_quoting_and_old_runs():
    params = Config().to_params()
    params["target"] = "''"  # `mlflow run` logs an empty string parameter shell-quoted
    params["model"] = "'/path with space/m'"
    del params["threads"]  # logged before --threads existed: read with its default
    config = Config.from_params(params)
    assert config.target == "" and config.model == "/path with space/m" and config.threads == 0


@pytest.mark.parametrize("edit, message", [({"lr": "fast"}, "lr='fast' is not a valid float"),
                                           ({"runs": None}, "has no 'runs' param")])
def test_from_params_refuses_garbled_or_missing_params(edit, message):
    from amrepro.config import AmreproError

    params = Config().to_params()
    for key, value in edit.items():
        if value is None:
            del params[key]
        else:
            params[key] = value
    with pytest.raises(AmreproError, match=re.escape(message)):
        Config.from_params(params)


# --- changed weights are named as the cause ------------------------------------------------------------------

def _logged_on_copy(tiny_gpt2, store, tmp_path, block: int):
    """A run on a copy of the tiny model; then block `block`'s weights are scaled by 1.01 and saved in place."""
    import shutil

    from transformers import AutoModel

    folder = tmp_path / "model-copy"
    shutil.copytree(tiny_gpt2, folder)
    result = cli("run", "--model", str(folder), "--runs", "2", "--epochs", "10", "--dim", "3", "--lr", "0.01")
    assert result.exit_code == 0, result.output
    (parent,) = [r for r in all_runs(store) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent.data.tags["model.weights_sha256"]) == 64
    model = AutoModel.from_pretrained(folder)
    with torch.no_grad():
        for p in model.h[block].parameters():
            p.mul_(1.01)
    model.save_pretrained(folder)
    return parent.info.run_id


def test_changed_weights_are_named_not_blamed_on_seeding(tiny_gpt2, store, tmp_path):
    parent = _logged_on_copy(tiny_gpt2, store, tmp_path, block=2)  # the target reads blocks 0..7
    result = cli("reproduce", parent)
    assert result.exit_code == 1, result.output
    assert "differs: the model weights changed" in result.output
    assert "seeding" not in result.output and "same environment" not in result.output


def test_weights_changed_where_the_target_does_not_read_still_reproduce(tiny_gpt2, store, tmp_path):
    parent = _logged_on_copy(tiny_gpt2, store, tmp_path, block=9)  # after the target's block 7: never computed
    result = cli("reproduce", parent)
    assert result.exit_code == 0, result.output
    assert "reproduced: bit-identical, although the model weights differ" in result.output
