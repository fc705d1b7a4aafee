"""`amrepro compare` and `--corpus`: the layout reads back from MLflow (top run -> method runs -> seed runs), a
method run reproduces bit-identically, the corpus yardstick is every window scored, bad input is one sentence
before any run exists, and a short end-to-end compare of all four methods runs on SmolLM2."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from amrepro import corpus
from amrepro.model import load_model
from amrepro.printable import token_repr
from amrepro.readers import HookedReader, site_reader
from amrepro.targets import Target
from conftest import SMOL, smollm2_gguf
from helpers import all_runs, children_of, cli, failing_log_batch

CORPUS = str(Path(__file__).parent / "data" / "corpus.txt")
TINY = ("--runs", "2", "--dim", "3", "--epochs", "10", "--lr", "0.01", "--steps", "4", "--epo-steps", "2",
        "--topk", "16", "--candidates", "16", "--population", "2")


def _layout(store):
    (top,) = [r for r in all_runs(store) if "mlflow.parentRunId" not in r.data.tags]
    method_runs = {r.data.params["method"]: r for r in all_runs(store)
                   if r.data.tags.get("mlflow.parentRunId") == top.info.run_id}
    return top, method_runs


def test_compare_layout_reads_back_from_mlflow(tiny_gpt2, store):
    result = cli("compare", "--model", tiny_gpt2, "--methods", "adam,gcg,epo", "--corpus", CORPUS, *TINY)
    assert result.exit_code == 0, result.output
    top, method_runs = _layout(store)
    assert top.data.tags["amrepro.compare"] == "adam,gcg,epo" and top.info.status == "FINISHED"
    assert set(method_runs) == {"adam", "gcg", "epo"}
    for name, run in method_runs.items():
        assert run.info.status == "FINISHED" and run.data.params["method"] == name
        seeds = children_of(store, run.info.run_id)
        assert [c.data.params["seed"] for c in seeds] == ["0", "1"]
        assert all(c.info.status == "FINISHED" for c in seeds)
    client = MlflowClient(store)
    # the terminal: each method's one-line verdict, then each seed's tokens on its own row, as `run` prints them
    for name, run in method_runs.items():
        block = result.output.split(f"{name}: {run.data.tags['amrepro.headline']}\n")[1]
        for seed in children_of(store, run.info.run_id):
            logged = json.loads(Path(client.download_artifacts(seed.info.run_id, "tokens.json")).read_text())
            shown = [token_repr(t, i) for t, i in zip(logged["tokens"], logged["ids"])]
            assert any(all(s in line for s in shown) for line in block.splitlines()[:8]), (name, shown, block)
    table = json.loads(Path(client.download_artifacts(top.info.run_id, "compare.json")).read_text())
    rows = {r["method"]: r for r in table["rows"]}
    assert list(rows) == ["adam", "gcg", "epo", "corpus"]
    # each method row is its method run's statistics, read back
    gcg_summary = json.loads(Path(client.download_artifacts(method_runs["gcg"].info.run_id, "summary.json")).read_text())
    assert rows["gcg"]["n_unique"] == gcg_summary["n_unique_tokens"]
    assert rows["gcg"]["xent_mean"] > 0 and rows["epo"]["wall_s"] > 0
    # the corpus row is the corpus file's every 5-token window; its best is the top window of the artifact
    windows = _windows(load_model(tiny_gpt2, torch.device("cpu")), Path(CORPUS).read_text(), 5)  # [W, pos]
    top_windows = json.loads(Path(client.download_artifacts(top.info.run_id, "corpus_top_windows.json")).read_text())
    assert rows["corpus"]["n_tokens"] == windows.numel() and rows["corpus"]["act_best"] == top_windows[0]["activation"]
    artifacts = {a.path for a in client.list_artifacts(top.info.run_id)}
    assert {"compare_table.json", "activation_vs_agreement.png", "corpus_top_windows.json"} <= artifacts
    assert top.data.metrics["compare/gcg/act_mean"] == pytest.approx(rows["gcg"]["act_mean"])
    # the index dashboard links each method to its own dashboard, which shows the corpus windows
    index = Path(client.download_artifacts(top.info.run_id, "dashboard.html")).read_text()
    for run in method_runs.values():
        assert f'href="#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts/dashboard.html"' in index
    page = Path(client.download_artifacts(method_runs["adam"].info.run_id, "dashboard.html")).read_text()
    assert 'id="corpus"' in page and page.count("<rect") > 20  # the top windows and the histogram's bars
    assert run.data.tags["amrepro.headline"] in index
    # a method run is an ordinary amrepro parent: reproduce re-runs it bit for bit
    again = cli("reproduce", method_runs["gcg"].info.run_id)
    assert again.exit_code == 0 and "reproduced: bit-identical" in again.output, again.output
    refused = cli("reproduce", top.info.run_id)
    assert refused.exit_code == 2 and "is an `amrepro compare` run" in refused.output
    # the suite's AMREPRO_FIGURES=0 (conftest): no method run drew its figures; `amrepro figures` draws one's
    # from its seed runs, and refuses the compare's top run
    gcg = method_runs["gcg"].info.run_id
    assert all(not client.list_artifacts(run.info.run_id, "figures") for run in method_runs.values())
    assert cli("figures", gcg).exit_code == 0
    assert {a.path for a in client.list_artifacts(gcg, "figures")} == {
        f"figures/{n}.png" for n in ("curves", "token_grid", "token_frequency", "projection_gap", "hub_tokens")}
    refused = cli("figures", top.info.run_id)
    assert refused.exit_code == 2 and "not a target parent" in refused.output


@pytest.mark.parametrize("args, message", [
    (("--methods", "adam,sgd"), "--methods takes a comma-separated list"),
    (("--corpus", "/nonexistent/text.txt"), "no such file"),
    (("--corpus", "/dev/zero"), "--corpus /dev/zero is a device, not a regular file"),  # read forever before
])
def test_bad_input_is_one_sentence_before_any_run(tiny_gpt2, store, args, message):
    result = cli("compare", "--model", tiny_gpt2, *TINY, *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert all_runs(store) == []  # refused before any run exists


def test_corpus_scores_every_window(tiny_gpt2):
    lm = load_model(tiny_gpt2, torch.device("cpu"))
    target = Target.parse("blocks.3.hook_resid_pre[3]")
    text = Path(CORPUS).read_text()
    yard = corpus.yardstick(lm, target, Path(CORPUS), 4, top=5)
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert yard["n_windows"] == len(ids) - 3
    with HookedReader(lm, target) as reader, torch.no_grad():  # brute force, one window at a time
        acts = [float(reader(lm.embedding[torch.tensor([ids[w:w + 4]])]).mean()) for w in range(len(ids) - 3)]
    assert yard["max"] == pytest.approx(max(acts), abs=1e-5)
    best = max(range(len(acts)), key=acts.__getitem__)
    assert yard["top"][0]["start"] == best and yard["top"][0]["text"] == lm.tokenizer.decode(ids[best:best + 4])
    assert [t["activation"] for t in yard["top"]] == sorted((t["activation"] for t in yard["top"]), reverse=True)
    assert sorted(acts)[int(0.9 * len(acts))] <= yard["p99"] <= yard["max"]


@SMOL
def test_short_compare_of_all_four_methods_on_smollm2(smol, store, small_null_pool):
    result = cli("compare", "--model", smollm2_gguf(), "--methods", "adam,pez,gcg,epo", "--corpus", CORPUS,
                 "--runs", "2", "--layer", "2", "--dim", "5", "--epochs", "5", "--steps", "2", "--epo-steps", "1",
                 "--topk", "16", "--candidates", "8", "--population", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    top, method_runs = _layout(store)
    assert set(method_runs) == {"adam", "pez", "gcg", "epo"} and top.info.status == "FINISHED"
    rows = {k.split("/")[1] for k in top.data.metrics if k.startswith("compare/")}
    assert rows == {"adam", "pez", "gcg", "epo", "corpus"}
    assert all(top.data.metrics[f"compare/{m}/xent_mean"] > 0 for m in ("adam", "pez", "gcg", "epo"))


def _windows(lm, text: str, n_tokens: int) -> torch.Tensor:
    """Every window of n_tokens consecutive tokens of the text, stride 1: [n_windows, n_tokens]."""
    return torch.tensor(lm.tokenizer(text, add_special_tokens=False)["input_ids"]).unfold(0, n_tokens, 1)


def _non_streamed(lm, target, text: str, n_tokens: int, top: int) -> dict:
    """What the yardstick computed before it streamed: every window at once, numpy's statistics."""
    import numpy as np

    ids = _windows(lm, text, n_tokens)  # [W, pos]
    with site_reader(lm, target) as reader, torch.no_grad():  # in batches of corpus.BATCH windows, as streamed
        acts = torch.cat([reader(lm.embedding[ids[lo:lo + corpus.BATCH]]).mean(dim=1)
                          for lo in range(0, len(ids), corpus.BATCH)]).numpy().astype(np.float64)  # [W]
    order = np.argsort(-acts, kind="stable")[:top]
    return {"n_windows": int(acts.size), "max": float(acts.max()), "p99": float(np.percentile(acts, 99)),
            "mean": float(acts.mean()), "top": [(int(w), float(acts[w])) for w in order]}


def test_a_small_corpus_gives_what_scoring_it_at_once_gave(tiny_gpt2):
    lm = load_model(tiny_gpt2, torch.device("cpu"))
    target = Target.parse("blocks.3.hook_resid_pre[3]")
    want = _non_streamed(lm, target, Path(CORPUS).read_text(), 4, 5)
    yard = corpus.yardstick(lm, target, Path(CORPUS), 4, top=5)
    assert {k: yard[k] for k in ("n_windows", "max", "p99", "mean")} == {k: want[k] for k in ("n_windows", "max", "p99", "mean")}
    assert [(t["start"], t["activation"]) for t in yard["top"]] == want["top"]


def test_a_large_corpus_is_streamed_with_bounded_memory(tiny_gpt2, tmp_path, monkeypatch):
    """Pieces of 3000 characters and at most 2000 activations kept exactly (the real limits, shrunk): the file's
    ~40000 windows are scored across pieces (windows that straddle two pieces included), the top windows and the
    99th percentile are still exact, yet no more than the top 1% of the activations is ever held beyond 2000."""
    lines = [" ".join(f"w{(7 * i + j) % 97}" for j in range(i % 9 + 1)) for i in range(3000)]
    text = "\n".join(lines) + "\n"
    (tmp_path / "big.txt").write_text(text)
    lm = load_model(tiny_gpt2, torch.device("cpu"))
    target = Target.parse("blocks.2.hook_resid_pre[5]")
    monkeypatch.setattr(corpus, "CHUNK_CHARS", 3000)
    monkeypatch.setattr(corpus, "EXACT_WINDOWS", 2000)
    seen = []
    yard = corpus.yardstick(lm, target, tmp_path / "big.txt", 3, top=8, on_progress=lambda f, n: seen.append(f))
    want = _non_streamed(lm, target, text, 3, 8)
    assert yard["n_windows"] == want["n_windows"] > 30000 and len(seen) > 10 and seen[-1] == 1.0
    assert yard["max"] == want["max"] and yard["p99"] == want["p99"]
    assert yard["mean"] == pytest.approx(want["mean"], rel=1e-9)
    assert [t["start"] for t in yard["top"]] == [w for w, _ in want["top"]]
    top_share = 2 * (0.01 * len(text.encode()) + 3) + corpus.BATCH  # the top 1% (a token is 1+ byte), pruned at 2x
    assert yard["kept"] <= max(2000 + corpus.BATCH, top_share) < yard["n_windows"] / 10


def test_corpus_max_tokens_reads_the_start_only(tiny_gpt2):
    lm = load_model(tiny_gpt2, torch.device("cpu"))
    target = Target.parse("blocks.3.hook_resid_pre[3]")
    yard = corpus.yardstick(lm, target, Path(CORPUS), 4, max_tokens=50)
    assert yard["tokens_read"] == 50 and yard["n_windows"] == 47 and yard["truncated"]


def test_a_corpus_that_is_not_a_regular_file_is_refused(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo")
    for path, kind in ((tmp_path / "fifo", "is a FIFO"), ("/dev/zero", "is a device"), (tmp_path, "is a folder")):
        with pytest.raises(corpus.AmreproError, match=f"{kind}, not a regular file"):
            corpus.check(str(path))


def test_a_store_that_fails_while_compare_logs_keeps_the_results_for_amrepro_log(tiny_gpt2, store, monkeypatch):
    """Like `amrepro run`: exit 3, the failing method's outcome file, then `amrepro log FILE` logs it into its
    method run under the compare's top run (before: exit 2 and every method's results lost)."""
    original = failing_log_batch(  # pez's second seed run
        monkeypatch, lambda n, values: values.get("method") == "pez" and values.get("run_index") == "1")
    result = cli("compare", "--model", tiny_gpt2, "--methods", "adam,pez", *TINY)
    assert result.exit_code == 3, result.output
    top, method_runs = _layout(store)
    pez = method_runs["pez"].info.run_id
    (path,) = Path("amrepro-outcomes").glob("*.npz")
    assert path.name == f"{pez}.npz"  # adam's file was removed once adam was logged
    out = result.output.replace("\n", " ")
    assert "disk I/O error" in out and f"amrepro log amrepro-outcomes/{path.name}" in out
    assert not any(r.info.status == "RUNNING" for r in all_runs(store))
    assert method_runs["adam"].info.status == "FINISHED"
    monkeypatch.setattr(MlflowClient, "log_batch", original)
    # a server that went away leaves the top run RUNNING (it could not be ended) with its process gone
    gone = subprocess.Popen(["true"])
    gone.wait()
    client = MlflowClient(store)
    client.update_run(top.info.run_id, "RUNNING")
    client.set_tag(top.info.run_id, "amrepro.pid", str(gone.pid))
    client.delete_tag(top.info.run_id, "amrepro.pid_start")
    logged = cli("log", str(path))
    assert logged.exit_code == 0, logged.output
    assert f"ended the top run {top.info.run_id} KILLED" in logged.output.replace("\n", " ")
    assert client.get_run(top.info.run_id).info.status == "KILLED"
    run = MlflowClient(store).get_run(pez)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == top.info.run_id
    assert "stats/n_unique_tokens" in run.data.metrics
    assert [c.info.status for c in children_of(store, pez)] == ["FINISHED"] * 2
    assert not path.exists()
