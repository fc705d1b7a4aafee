"""The study of a sweep (amrepro/study.py): specificity against the sweep's other targets with its FDR correction,
seed spread, and the corpus comparison, on hand-made arrays."""

import numpy as np
import pytest

from amrepro import study
from amrepro.specificity import per_target
from amrepro.study import TargetRuns


def _targets(ids, decoded=None):
    """TargetRuns from ids [T, runs, pos], all from seeds 0..runs-1."""
    T, runs, _ = ids.shape
    decoded = np.ones((T, runs)) if decoded is None else decoded
    return [TargetRuns(f"t{t}", tuple(range(runs)), ids[t], decoded[t]) for t in range(T)]


def test_benjamini_hochberg_matches_hand_computation():
    # sorted p 0.01 0.02 0.03 0.5 (T=4): p*T/k = 0.04 0.04 0.04 0.5, already monotone
    q = study.benjamini_hochberg([0.5, 0.01, 0.03, 0.02])
    np.testing.assert_allclose(q, [0.5, 0.04, 0.04, 0.04])
    # a larger p at a lower rank is pulled down to the smallest q above it
    np.testing.assert_allclose(study.benjamini_hochberg([0.04, 0.03]), [0.04, 0.04])


def test_targets_that_share_nothing_are_specific():
    """Each target's seeds decode to its own tokens: every target is specific after the correction."""
    T, runs, pos = 8, 4, 3
    ids = np.array([[[100 * t + p for p in range(pos)] for _ in range(runs)] for t in range(T)])  # [T, runs, pos]
    out = study.cross_target(_targets(ids), n_perm=999)
    assert out["n_tested"] == T and out["frac_specific"] == 1.0
    first = out["per_target"]["t0"]
    assert (first["within"], first["across"]) == (1.0, 0.0)
    assert first["q"] < study.FDR


def test_agreement_that_belongs_to_the_seed_is_not_specific():
    """Every target's run of seed s decodes to the seed's tokens (the shared-start confound, with nothing of the
    target): seeds agree across targets as much as within, so no target is specific."""
    T, runs, pos = 8, 4, 3
    per_seed = np.arange(runs * pos).reshape(runs, pos)  # [runs, pos]: seed s's tokens
    ids = np.broadcast_to(per_seed, (T, runs, pos)).copy()
    out = study.cross_target(_targets(ids), n_perm=199)
    assert out["frac_specific"] == 0.0
    assert all(v["p"] == 1.0 for v in out["per_target"].values())  # every permutation ties


def test_uncorrected_chance_targets_are_not_called_specific():
    """Random tokens for every run: no target is specific once corrected (uncorrected some p may fall < 0.05)."""
    ids = np.random.default_rng(0).integers(0, 30, size=(20, 5, 4))  # [T, runs, pos]
    out = study.cross_target(_targets(ids), n_perm=499)
    assert out["n_specific"] == 0


def test_per_target_within_and_across_are_the_pair_means():
    ids = np.random.default_rng(1).integers(0, 6, size=(3, 3, 2))
    from amrepro.metrics import pairwise_jaccard
    m = pairwise_jaccard(ids.reshape(9, 2))
    out = per_target(m, 3, 3, n_perm=9)
    t, s = np.repeat(np.arange(3), 3), np.tile(np.arange(3), 3)
    within = [m[(t[:, None] == k) & (t[None] == k) & (s[:, None] != s[None])].mean() for k in range(3)]
    across = [m[(t[:, None] == k) & (t[None] != k) & (s[:, None] != s[None])].mean() for k in range(3)]
    np.testing.assert_allclose(out["within"], within)
    np.testing.assert_allclose(out["across"], across)


def test_a_target_with_a_diverged_run_is_left_out_of_the_test():
    T, runs = 4, 3
    ids = np.arange(T * runs * 2).reshape(T, runs, 2)
    targets = _targets(ids)
    targets[2] = TargetRuns("t2", (0, 2), ids[2][[0, 2]], np.ones(2))
    out = study.cross_target(targets, n_perm=99)
    assert out["excluded"] == ["t2"] and out["n_tested"] == 3 and "t2" not in out["per_target"]


def test_seed_spread_on_hand_made_activations():
    s = study.spread([2.4, 10.2, 4.0, 6.0])
    assert (s["min"], s["max"], s["median"]) == (2.4, 10.2, 5.0)
    assert s["cv"] == pytest.approx(np.std([2.4, 10.2, 4.0, 6.0], ddof=1) / 5.65)
    assert study.spread([3.0])["cv"] is None  # one seed has no spread
    assert study.distribution([0.1, None, 0.3, 0.2])["median"] == pytest.approx(0.2)


def test_study_counts_the_layer_and_beats_the_corpus_where_it_should():
    T, runs = 8, 4
    ids = np.array([[[10 * t, 10 * t + 1] for _ in range(runs)] for t in range(T)])
    decoded = np.tile([1.0, 2.0, 3.0, 10.0], (T, 1))  # best 10, median 2.5
    targets = [TargetRuns(t.name, t.seeds, t.ids, t.decoded, above_chance=k < 2) for k, t in enumerate(
        _targets(ids, decoded))]
    corpus = {t.name: (5.0, 2.0) for t in targets}  # max 5, p99 2
    out = study.study(targets, corpus, n_perm=499)
    layer = out["layer"]
    assert layer["frac_above_chance"] == 0.25 and layer["frac_specific"] == 1.0
    assert (layer["frac_best_beats_max"], layer["frac_median_beats_max"]) == (1.0, 0.0)
    assert (layer["frac_best_beats_p99"], layer["frac_median_beats_p99"]) == (1.0, 1.0)
    row = study.table_row("adam", out, seconds=16.0)
    assert row["s_per_target"] == 2.0 and row["median_seed_range"] == 9.0
    assert set(row) == set(study.COLUMNS)


def test_corpus_of_every_target_at_once_is_each_window_read_alone(tiny_gpt2, tmp_path):
    """yardsticks: one streamed pass and one forward per batch for all targets of a site gives each target's
    yardstick; its max is the max over every window read alone (computed directly)."""
    import torch

    from amrepro import corpus
    from amrepro.model import load_model
    from amrepro.readers import HookedReader
    from amrepro.targets import Target

    lm = load_model(tiny_gpt2, torch.device("cpu"))
    file = tmp_path / "tiny.txt"
    file.write_text("the cat sat on the mat\nand the dog ran far away from it\n")
    targets = [Target.parse(n) for n in ("blocks.2.mlp.hook_post[5]", "blocks.2.mlp.hook_post[70]")]
    yards = corpus.yardsticks(lm, targets, file, 3, top=2)
    ids = lm.tokenizer(file.read_text(), add_special_tokens=False)["input_ids"]
    for target, yard in zip(targets, yards):
        with HookedReader(lm, target) as reader, torch.no_grad():
            alone = [float(reader(lm.embedding[torch.tensor([ids[w:w + 3]])]).mean()) for w in range(len(ids) - 2)]
        assert yard["n_windows"] == len(ids) - 2
        assert yard["max"] == pytest.approx(max(alone), abs=1e-5)
        assert yard["p99"] == pytest.approx(float(np.percentile(alone, 99)), abs=1e-5)
        single = corpus.yardstick(lm, target, file, 3, top=2)  # the one-target path agrees
        assert [w["start"] for w in yard["top"]] == [w["start"] for w in single["top"]]
        np.testing.assert_allclose([w["positions"] for w in yard["top"]], [w["positions"] for w in single["top"]],
                                   atol=1e-5)
        assert yard["mean"] == pytest.approx(single["mean"], abs=1e-5)


def test_sweep_of_two_methods_logs_its_study_table(tiny_gpt2, store):
    """`amrepro sweep --methods adam,pez --corpus`: one top run, one sweep run per method under it (same targets,
    same seeds), each with its study; the top run holds the study table, one row per method, and its figure."""
    import json
    from pathlib import Path

    from mlflow import MlflowClient

    from helpers import all_runs, cli

    corpus_file = str(Path(__file__).parent / "data" / "corpus.txt")
    spec = "blocks.1.mlp.hook_post[random:2]"
    result = cli("sweep", "--model", tiny_gpt2, "--targets", spec, "--methods", "adam,pez", "--corpus", corpus_file,
                 "--runs", "2", "--epochs", "4", "--steps", "2", "--n-tokens", "3")
    assert result.exit_code == 0, result.output
    runs = all_runs(store)
    (top,) = [r for r in runs if r.data.tags.get("amrepro.kind") == "study"]
    sweeps = {r.data.params["method"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == top.info.run_id}
    assert set(sweeps) == {"adam", "pez"} and top.info.status == "FINISHED"
    client = MlflowClient(store)
    table = json.loads(Path(client.download_artifacts(top.info.run_id, "study_table.json")).read_text())
    rows = dict(zip(table["columns"], zip(*table["data"])))
    assert rows["method"] == ("adam", "pez") and rows["n_targets"] == (2, 2)
    assert all(0 <= f <= 1 for f in rows["frac_best_beats_corpus_max"])
    assert "study.png" in {a.path for a in client.list_artifacts(top.info.run_id)}
    assert "| adam |" in top.data.tags["mlflow.note.content"]
    for method, sweep in sweeps.items():
        studied = json.loads(Path(client.download_artifacts(sweep.info.run_id, "study.json")).read_text())
        assert [r["target"] for r in studied["targets"]] == [f"blocks.1.mlp.hook_post[{i}]" for i in
                                                             sorted(int(t["target"].split("[")[1][:-1])
                                                                    for t in studied["targets"])]
        assert all("corpus" in r for r in studied["targets"])
        assert (studied["targets"][0]["final"] is None) == (method == "pez")  # adam's continuous optimum only
