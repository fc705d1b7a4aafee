"""A diverged optimization is never reported as science: bad hyperparameters are refused, a run whose loss
becomes non-finite ends FAILED with the epoch and the reason, and statistics never see NaN."""

import pytest
import torch

from amrepro import experiment
from amrepro.config import Config
from amrepro.experiment import execute, prepare
from helpers import all_runs, children_of, cli


@pytest.mark.parametrize("option, value", [("--lr", "inf"), ("--lr", "nan"), ("--l2", "nan"), ("--l2", "inf"),
                                           ("--lr", "1e38")])
def test_non_finite_or_overflowing_hyperparameters_are_refused(tiny_gpt2, store, option, value):
    result = cli("run", "--model", tiny_gpt2, "--runs", "2", "--epochs", "3", "--dim", "3", option, value)
    assert result.exit_code == 2, result.output
    assert option in result.output and "Traceback" not in result.output
    assert all_runs(store) == []  # refused before any run exists


def _plant_nan(monkeypatch, row: int, epoch: int):
    """Wrap the site reader so that run `row` reads NaN from `epoch` on (a planted divergence)."""
    real = experiment.site_reader
    calls = {"n": 0}

    class Planted:
        def __init__(self, reader):
            self.reader = reader

        def __enter__(self):
            self.reader.__enter__()
            return self

        def __exit__(self, *exc):
            return self.reader.__exit__(*exc)

        def __call__(self, x):
            act = self.reader(x)  # [runs, pos]
            if x.requires_grad:
                calls["n"] += 1
                if calls["n"] > epoch:
                    poison = torch.zeros_like(act)
                    poison[row] = float("nan")
                    act = act + poison
            return act

    monkeypatch.setattr(experiment, "site_reader", lambda lm, target, **kw: Planted(real(lm, target, **kw)))


def test_planted_divergence_leaves_the_other_runs_bit_identical(tiny_gpt2, monkeypatch):
    config = Config(model=tiny_gpt2, dim=3, device="cpu", runs=3, epochs=8, lr=1e-2)
    clean = execute(prepare(config))
    _plant_nan(monkeypatch, row=1, epoch=3)
    planted = execute(prepare(config))
    assert planted.result.diverged_at.tolist() == [-1, 3, -1]
    assert planted.diverged == {1: "the loss became non-finite (nan) at epoch 3"}
    assert planted.ok.tolist() == [True, False, True]
    for r in (0, 2):  # runs never mix: a NaN in one row changes no bit of another
        assert torch.equal(planted.result.final[r], clean.result.final[r])
    stats = planted.summary["statistics"]
    assert planted.summary["n_tokens_total"] == 10 and stats["n_tokens_total"] == 10  # 2 runs x 5 tokens
    assert "1 of 3 runs diverged" in stats["verdict"]


def test_planted_divergence_ends_that_run_failed_with_epoch_and_reason(tiny_gpt2, store, monkeypatch):
    _plant_nan(monkeypatch, row=1, epoch=3)
    result = cli("run", "--model", tiny_gpt2, "--runs", "3", "--epochs", "8", "--dim", "3", "--lr", "0.01")
    assert result.exit_code == 0, result.output
    assert "seed 1 diverged" in result.output
    parent = next(r for r in all_runs(store) if "mlflow.parentRunId" not in r.data.tags)
    children = children_of(store, parent.info.run_id)
    assert [c.info.status for c in children] == ["FINISHED", "FAILED", "FINISHED"]
    assert "epoch 3" in children[1].data.tags["error"] and "non-finite" in children[1].data.tags["error"]
    assert children[1].data.metrics["diverged/epoch"] == 3 and "act/final" not in children[1].data.metrics
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["runs/diverged"] == 1 and parent.data.metrics["runs/ok"] == 2
    assert parent.data.metrics["stats/n_tokens_total"] == 10
    assert "1 of 3 runs diverged" in parent.data.tags["verdict"]


def test_all_runs_diverged_is_no_result(tiny_gpt2, store):
    result = cli("run", "--model", tiny_gpt2, "--runs", "2", "--epochs", "5", "--dim", "3", "--lr", "1e30")
    assert result.exit_code == 1, result.output
    assert "all 2 runs diverged" in result.output and "Traceback" not in result.output
    runs = all_runs(store)
    assert len(runs) == 3 and all(r.info.status == "FAILED" for r in runs)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert not any(k.startswith(("stats/", "verdict/", "pvalue/")) for k in parent.data.metrics)
    assert parent.data.tags["verdict"] == "no result: all 2 runs diverged"


def test_seed_range_is_bounded(tiny_gpt2, store):
    result = cli("run", "--model", tiny_gpt2, "--runs", "2", "--epochs", "1", "--seed", "18446744073709551616")
    assert result.exit_code == 2 and "--seed must be between 0 and" in result.output, result.output
    result = cli("run", "--model", tiny_gpt2, "--runs", "2", "--epochs", "1", "--seed", str(2**63 - 1))
    assert result.exit_code == 2 and "--seed" in result.output  # the second run would need 2**63
    assert all_runs(store) == []


def test_runs_beyond_memory_are_refused_with_what_fits(tiny_gpt2, store, monkeypatch):
    monkeypatch.setattr(experiment, "_available_bytes", lambda device: 64 * 2**20)  # a 64 MiB machine
    result = cli("run", "--model", tiny_gpt2, "--runs", "100000", "--epochs", "1", "--dim", "3")
    assert result.exit_code == 2, result.output
    assert "--runs 100000 needs about" in result.output and "at most about" in result.output
    fits = int(result.output.split("at most about")[1].split()[0])
    assert 1 < fits < 100000
    assert all_runs(store) == []


def test_chunked_decoding_equals_one_matmul(monkeypatch):
    from amrepro import decode

    generator = torch.Generator().manual_seed(0)
    vocab = torch.randn(50, 8, generator=generator)
    x = torch.randn(7, 3, 8, generator=generator)
    whole = decode.nearest_tokens(x, vocab)
    monkeypatch.setattr(decode, "CHUNK_ELEMENTS", 3 * 50 * 2)  # two runs per chunk
    chunked = decode.nearest_tokens(x, vocab)
    assert torch.equal(whole[0], chunked[0]) and torch.allclose(whole[1], chunked[1])
