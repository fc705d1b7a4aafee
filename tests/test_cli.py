"""`amrepro run` end to end against a temp sqlite store: the MLflow layout users rely on, and bad input."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from forked import Amrepro
from helpers import all_runs, children_of, cli


def _artifacts(client, run_id: str, path: str | None = None) -> dict[str, int]:
    """Every artifact of a run, recursively: path -> size."""
    found = {}
    for a in client.list_artifacts(run_id, path):
        found.update(_artifacts(client, run_id, a.path) if a.is_dir else {a.path: a.file_size})
    return found


def test_figures_false_logs_no_png_and_amrepro_figures_draws_them_later(tiny_gpt2, store, monkeypatch):
    """--figures false: the statistics, tables and dashboard are all there, no PNG; `amrepro figures RUN_ID` then
    draws, from the seed runs, the very PNGs the run would have drawn (byte for byte: the same data in)."""
    from amrepro import figures

    drawn = {}
    render = figures.render
    monkeypatch.setattr(figures, "render", lambda makers: drawn.setdefault(len(drawn), render(makers)))
    monkeypatch.delenv("AMREPRO_FIGURES")  # the option's own default: on
    args = ("run", "--model", tiny_gpt2, "--runs", "2", "--epochs", "3", "--dim", "3", "--n-tokens", "2")
    assert cli(*args).exit_code == 0 and len(drawn) == 1  # figures on: drawn by the run (kept to compare below)
    monkeypatch.setenv("AMREPRO_FIGURES", "off")  # the default of --figures, as conftest sets it for the suite
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert len(drawn) == 1  # not a figure was drawn
    client = MlflowClient(store)
    (parent,) = [r for r in all_runs(store) if "mlflow.parentRunId" not in r.data.tags
                 and r.data.params["figures"] == "False"]
    logged = _artifacts(client, parent.info.run_id)
    assert not [p for p in logged if p.endswith(".png")]
    assert {"summary.json", "dashboard.html", "token_grid.json", "environment/pip-freeze.txt"} <= set(logged)
    assert "stats/n_unique_tokens" in parent.data.metrics and "pvalue/unique_decoded_starts" in parent.data.metrics
    assert parent.data.tags["verdict"] and "amrepro.figures_failed" not in parent.data.tags
    for seed in children_of(store, parent.info.run_id):
        assert not [p for p in _artifacts(client, seed.info.run_id) if p.endswith(".png")]

    later = cli("figures", parent.info.run_id)
    assert later.exit_code == 0, later.output
    pngs = {p for p in _artifacts(client, parent.info.run_id) if p.endswith(".png")}
    assert pngs == set(drawn[0][0]) == {f"figures/{n}.png" for n in ("curves", "token_grid", "token_frequency",
                                                                     "projection_gap", "hub_tokens")}
    for path, png in drawn[0][0].items():
        assert Path(client.download_artifacts(parent.info.run_id, path)).read_bytes() == png, path
    # a seed run is not a target: one sentence, exit 2
    seed_run = children_of(store, parent.info.run_id)[0]
    refused = cli("figures", seed_run.info.run_id)
    assert refused.exit_code == 2 and "not a target parent" in refused.output


def test_help_does_not_import_torch_or_mlflow():
    """`amrepro --help` stays instant because it imports neither (bench/bench.py times it)."""
    code = ("import sys\nfrom amrepro.cli import app\nfrom typer.testing import CliRunner\n"
            "assert CliRunner().invoke(app, ['run', '--help']).exit_code == 0\n"
            "assert 'torch' not in sys.modules and 'mlflow' not in sys.modules, 'help imported heavy modules'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    out = cli("run", "--help").output
    for option in ("--runs", "--epochs", "--n-tokens", "--layer", "--dim", "--target", "--lr", "--l2", "--seed",
                   "--model", "--device"):
        assert option in out
    assert "hidden_states" in out  # --layer says precisely which tensor it reads


def test_run_logs_parent_and_one_child_per_seed(tiny_gpt2, store):
    result = cli("run", "--model", tiny_gpt2, "--runs", "2", "--epochs", "500", "--dim", "3", "--seed", "4",
                 "--device", "cpu", "--figures", "true")  # on, whatever AMREPRO_FIGURES (conftest: off) says
    assert result.exit_code == 0, result.output
    assert "/10 tokens are unique." in result.output
    client = MlflowClient(store)
    runs = all_runs(store)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    p = parent.data
    assert p.params["runs"] == "2" and p.params["epochs"] == "500" and p.params["lr"] == "0.001"
    assert p.params["target_name"] == "blocks.8.hook_resid_pre[3]" and p.params["model"] == tiny_gpt2
    # the count the terminal printed is the one logged (and below: the children's distinct token ids)
    assert p.metrics["stats/n_tokens_total"] == 10
    assert f"{int(p.metrics['stats/n_unique_tokens'])}/10 tokens are unique." in result.output
    for key in ("env.torch", "env.transformers", "env.mlflow", "env.device", "env.git_commit", "env.threads"):
        assert p.tags[key]
    summary = json.loads(Path(client.download_artifacts(parent.info.run_id, "summary.json")).read_text())
    assert summary["n_unique_tokens"] == p.metrics["stats/n_unique_tokens"] and len(summary["tokens"]) == 2
    # issue 5: statistics with baselines in summary.json, as parent metrics, in the terminal; figures in the UI
    stats = summary["statistics"]
    assert stats["n_unique_tokens"] == p.metrics["stats/n_unique_tokens"]
    assert p.metrics["stats/cross_run_repeats"] == stats["metrics"]["stats/cross_run_repeats"]
    assert stats["metrics"]["stats/positional_agreement"] == pytest.approx(stats["positional_agreement"])
    assert "null/decoded_starts/unique_mean" in p.metrics and p.tags["verdict"] == stats["verdict"]
    assert "pvalue/unique_decoded_starts" in p.metrics and len(stats["nulls"]["decoded_starts"]["hub_tokens"]) == 20
    assert "Reproducibility statistics" in result.output and "Verdict:" in result.output
    figures = {f.path for f in client.list_artifacts(parent.info.run_id, "figures")}
    assert figures == {f"figures/{n}.png" for n in ("curves", "token_grid", "token_frequency", "projection_gap",
                                                    "hub_tokens")}

    children = children_of(store, parent.info.run_id)
    assert [c.info.run_name for c in children] == ["seed-4", "seed-5"]
    all_ids = []
    for r, child in enumerate(children):
        assert child.data.params["seed"] == str(4 + r) and child.data.params["epochs"] == "500"
        history = client.get_metric_history(child.info.run_id, "loss/total")
        assert sorted(m.step for m in history) == list(range(500))
        assert len(client.get_metric_history(child.info.run_id, "act/target")) == 500
        assert {"act/final", "act/decoded", "stats/start_token_kept", "converge/act_rel_change_last10pct"} <= set(
            child.data.metrics)
        folder = Path(client.download_artifacts(child.info.run_id, ""))
        for name in ("embeddings/initial.npy", "embeddings/final.npy"):
            array = np.load(folder / name)
            assert array.shape == (5, 32) and array.dtype == np.float32
            assert child.data.tags[f"sha256/{name}"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
        tokens = json.loads((folder / "tokens.json").read_text())
        assert len(tokens["ids"]) == len(tokens["tokens"]) == 5
        all_ids += tokens["ids"]
    assert len(set(all_ids)) == p.metrics["stats/n_unique_tokens"]


BAD_INPUTS = [
    (["--runs", "0"], "--runs must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--n-tokens", "0"], "--n-tokens must be at least 1"),
    (["--n-tokens", "65"], "exceeds the model's 64 positions"),
    (["--lr", "0"], "--lr must be positive"),
    (["--layer", "10"], "block 10 is out of range: the model has 10 blocks"),
    (["--dim", "32"], "index 32 is out of range"),
    (["--target", "blocks.2.hook_nonsense[1]"], "unknown target"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_sentence_exit_2_and_no_run_created(tiny_gpt2, store, args, message):
    result = cli("run", "--model", tiny_gpt2, "--epochs", "3", "--dim", "3", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert all_runs(store) == []  # every check runs before the first run exists


def test_missing_local_model_and_offline_hub(store, tmp_path):
    result = cli("run", "--model", str(tmp_path / "no-such-model"))
    assert result.exit_code == 2 and "local path does not exist" in result.output
    result = cli("run", "--model", "surely-not-a-model-xyz")  # HF_HUB_OFFLINE=1 in tests
    assert result.exit_code == 2 and "HF_HUB_OFFLINE is set" in result.output
    assert all_runs(store) == []


def test_unreachable_hub_is_one_sentence_within_seconds(store, monkeypatch):
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the probe fails at once
    start = time.monotonic()
    result = cli("run", "--model", "surely-not-a-model-xyz")
    assert result.exit_code == 2, result.output
    assert "Hugging Face Hub is unreachable" in result.output and "Traceback" not in result.output
    assert time.monotonic() - start < 20  # one probe, not ~25 s of download retries
    assert all_runs(store) == []


def test_bad_input_under_mlflow_run_marks_its_run_failed(tiny_gpt2, store, monkeypatch):
    client = MlflowClient(store)
    run = client.create_run("0")  # what `mlflow run` does before calling the entry point
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    result = cli("run", "--model", tiny_gpt2, "--dim", "999")
    assert result.exit_code == 2
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FAILED" and "out of range" in finished.data.tags["error"]


def test_store_that_is_down_fails_fast_with_one_sentence(tiny_gpt2, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}
    proc = Amrepro(["run", "--model", tiny_gpt2, "--epochs", "2"], env, tmp_path)  # its own process (forked.py)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "cannot use the MLflow tracking store at http://127.0.0.1:9" in err
    assert "Traceback" not in err + out


def test_offline_error_names_the_option_the_user_typed(store, monkeypatch):
    result = cli("run", "--model", "surely-not-a-model-xyz")
    assert "--model PATH" in result.output and result.output.count("HF_HUB_OFFLINE") == 1  # named once
    from mlflow import MlflowClient

    run = MlflowClient(store).create_run("0")  # what `mlflow run` does before calling the entry point
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    result = cli("run", "--model", "surely-not-a-model-xyz")
    assert result.exit_code == 2 and "-P model=PATH" in result.output and "--model PATH" not in result.output
    assert MlflowClient(store).get_run(run.info.run_id).info.status == "FAILED"
