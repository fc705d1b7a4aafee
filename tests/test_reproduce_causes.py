"""`reproduce` names the right cause when a result does not come back: edited params, changed weights."""

import sqlite3

import pytest

from helpers import all_runs, children_of, cli


@pytest.fixture
def logged(tiny_gpt2, store):
    """A finished 2-seed run: (store uri, parent id, [child ids])."""
    result = cli("run", "--model", tiny_gpt2, "--runs", "2", "--epochs", "10", "--dim", "3", "--lr", "0.01")
    assert result.exit_code == 0, result.output
    (parent,) = [r for r in all_runs(store) if "mlflow.parentRunId" not in r.data.tags]
    return store, parent.info.run_id, [c.info.run_id for c in children_of(store, parent.info.run_id)]


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
