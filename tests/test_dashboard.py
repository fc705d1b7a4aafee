"""dashboard.html (pure rendering from plain data), the one-line headline, loss-spike detection and token display:
what a user reads first about a target."""

import re

import numpy as np
import pytest

from amrepro import dashboard
from amrepro.headline import headline
from amrepro.metrics import reproducibility_stats
from amrepro.printable import token_repr
from amrepro.spikes import loss_spikes

RUNS, POS, EPOCHS = 10, 5, 500  # the reference run's shape


def descent(epochs: int = EPOCHS, runs: int = RUNS) -> np.ndarray:
    """Smooth Adam-like loss curves [epochs, runs] with a little jitter."""
    e = np.arange(epochs)[:, None]
    return -5 * (1 - np.exp(-e / 80)) + np.random.default_rng(0).normal(0, 0.005, (epochs, runs))


def test_a_mid_run_jump_is_a_spike_and_jitter_or_a_warmup_rise_is_not():
    loss = descent()
    loss[320:330, 5] += 1.5  # seed 5 jumps by ~30% of its range near epoch 320 (SmolLM2's seed 5 did)
    loss[10:30, 2] += 2.0  # a rise inside the first 10%: Adam settling, not a spike
    loss[:, 7] = np.nan  # diverged: reported as divergence, never as a spike
    spikes = loss_spikes(loss)
    assert [r for r, s in enumerate(spikes) if s is not None] == [5]
    assert spikes[5]["epoch"] == 320 and 0.25 < spikes[5]["share"] < 0.35


def test_unreadable_tokens_show_their_id_so_two_replacement_characters_differ():
    assert token_repr("\ufffd", 447) != token_repr("\ufffd", 8582)
    assert token_repr("\ufffd", 447) == "'\ufffd' (id 447)"
    assert token_repr(" the", 262) == "' the'" and token_repr("\n", 198) == "'\\n'"  # repr already tells these apart


def summary_of(ids: np.ndarray, tokens, loss) -> dict:
    rng = np.random.default_rng(1)
    runs, pos = ids.shape
    stats = reproducibility_stats(ids, rng.normal(size=(runs, pos, 4)), rng.normal(size=runs) + 3,
                                  rng.normal(size=runs), np.full((runs, pos), 0.5), ids, 300, n_boot=5,
                                  start_pool=rng.integers(0, 300, 256), activation=-loss, n_null=20)
    stats["verdict"] = "the full verdict, several sentences long."
    return {"seeds": list(range(runs)), "tokens": tokens, "token_ids": ids.tolist(), "statistics": stats,
            "diverged": [], "loss_spikes": loss_spikes(loss), "target": "blocks.8.hook_resid_pre[91]",
            "promoted_logits": {"top": [{"id": 447, "token": "\ufffd", "logit": 0.5}],
                                "bottom": [{"id": 8582, "token": "\ufffd", "logit": -0.5}]}}


def test_the_headline_is_one_line_that_names_p_and_the_runs_to_distrust():
    loss = descent()
    loss[320:330, 5] += 1.5
    ids = np.random.default_rng(2).integers(0, 300, size=(RUNS, POS))
    line = headline(summary_of(ids, [["x"] * POS] * RUNS, loss))
    assert "\n" not in line and len(line) < 200
    assert line.startswith("No evidence that seeds agree (agreement p = ")  # random tokens: nothing to claim
    assert "1/10 runs had a loss spike" in line
    same = np.tile(ids[:1], (RUNS, 1))  # every seed finds the same tokens
    assert headline(summary_of(same, [["x"] * POS] * RUNS, descent())).startswith("Seeds agree more than chance")


def test_dashboard_is_self_contained_escaped_and_small_for_the_reference_run():
    loss = descent()
    loss[320:330, 5] += 1.5
    ids = np.random.default_rng(2).integers(0, 300, size=(RUNS, POS))
    tokens = [["<script>alert(1)</script>", "\ufffd", " cat", "&amp;", "\n"]] * RUNS
    ids[:, 1] = 447
    summary = summary_of(ids, tokens, loss)
    rng = np.random.default_rng(3)
    summary["corpus"] = {"n_windows": 1000, "n_tokens": POS, "max": 2.0, "p99": 1.5, "mean": 0.1,
                         "quantiles": {"0.5": 0.1, "0.9": 0.8, "0.99": 1.5, "0.999": 1.9},
                         "histogram": {"counts": rng.integers(0, 100, 40).tolist(),
                                       "edges": np.linspace(-1, 2, 41).tolist()},
                         "top": [{"rank": k + 1, "tokens": [" the", " cat"] * 2 + [" sat"], "ids": [1, 2, 1, 2, 3],
                                  "activation": 2.0 - k / 10, "positions": rng.normal(size=POS).tolist()}
                                 for k in range(20)]}
    positions = {"tokens": rng.normal(size=(RUNS, POS)), "final": rng.normal(size=(RUNS, POS)) * 10}
    html = dashboard.render(summary, loss, -loss, rng.normal(size=RUNS), rng.normal(size=RUNS), positions,
                            title="gpt2 blocks.8.hook_resid_pre[91] x10")
    assert len(html.encode()) < 1_000_000
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # tokens are text
    assert "(id 447)" in html and "(id 8582)" in html  # '\ufffd' tokens (seeds' and logits') carry their id
    assert re.search(r"<(script|img|link|iframe)\b|\bsrc=|url\(|https?://(?!www\.w3\.org/2000/svg)", html) is None
    assert html.index(headline(summary)) < html.index("the full verdict")  # the headline first, then the detail
    assert "unstable: loss spike at epoch 320" in html
    assert html.count("<polyline") == 2 * RUNS and html.count('class="chip"') >= RUNS * POS + 20 * POS


def test_index_links_each_row_to_its_dashboard_in_the_mlflow_ui():
    html = dashboard.render_index("compare", "method", [
        {"name": "adam", "run_id": "abc", "experiment_id": "3", "headline": "No evidence <b>"},
        {"name": "gcg", "run_id": None, "experiment_id": "3", "headline": "NOT RUN"}])
    assert 'href="#/experiments/3/runs/abc/artifacts/dashboard.html"' in html
    assert "No evidence &lt;b&gt;" in html and html.count('class="run"') == 1


@pytest.mark.parametrize("n", [1, 7, 500, 10_000])
def test_curves_are_downsampled_but_keep_both_ends_and_the_spike(n):
    keep = [n // 2]
    idx = dashboard.downsample(n, keep)
    assert idx[0] == 0 and idx[-1] == n - 1 and n // 2 in idx and len(idx) <= dashboard.CURVE_POINTS + 1


def test_promoted_logits_are_the_direction_through_the_tied_unembedding(tiny_gpt2):
    import torch

    from amrepro.model import load_model
    from amrepro.targets import Target
    from amrepro.unembed import promoted_logits

    lm = load_model(tiny_gpt2, torch.device("cpu"))
    logits = promoted_logits(lm, Target(8, "hook_resid_pre", 3), top=4)
    column = lm.embedding[:, 3]  # e_3 @ W_U with W_U = E.T: GPT-2 ties its LM head to the input embeddings
    assert [t["id"] for t in logits["top"]] == column.topk(4).indices.tolist()
    assert [t["id"] for t in logits["bottom"]] == (-column).topk(4).indices.tolist()
    assert logits["top"][0]["logit"] == pytest.approx(float(column.max()))
    assert promoted_logits(lm, Target(8, "mlp.hook_post", 3)) is None  # not a residual-stream direction


def test_a_direction_target_promotes_its_normalized_direction_times_w_u(tiny_gpt2, tmp_path):
    import torch

    from amrepro.model import load_model
    from amrepro.targets import Target
    from amrepro.unembed import promoted_logits

    lm = load_model(tiny_gpt2, torch.device("cpu"))
    d = np.random.default_rng(0).normal(size=lm.d_model)  # [d_model]
    np.save(tmp_path / "probe.npy", 3.0 * d)  # not unit norm: the target reads it normalized
    logits = promoted_logits(lm, Target.parse(f"blocks.8.hook_resid_post@{tmp_path / 'probe.npy'}"), top=3)
    expected = lm.embedding @ torch.from_numpy(d / np.linalg.norm(d)).float()  # [vocab]
    assert [t["id"] for t in logits["top"]] == expected.topk(3).indices.tolist()
    assert logits["top"][0]["logit"] == pytest.approx(float(expected.max()), rel=1e-5)
