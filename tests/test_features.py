"""Directions and SAE latents as targets (features.py): the reader equals a direct numpy computation of the
encoder for one latent (standard, JumpReLU, TopK, as SAELens computes them), every method runs on them, run ->
reproduce is bit-identical with the file pinned by its sha256, a sweep over latents, and bad files are one
sentence and exit 2 before any run exists. The SAEs are tests/data/sae/*, written by tests/make_sae_fixture.py."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from amrepro import features
from amrepro.config import AmreproError, Config
from amrepro.experiment import execute, prepare
from amrepro.model import load_model
from amrepro.readers import FeatureReader, HookedReader, site_reader
from amrepro.sweep import parse_targets
from amrepro.targets import Target
from helpers import all_runs, children_of, cli

CPU = torch.device("cpu")
DATA = Path(__file__).parent / "data"
SAES = DATA / "sae"
SITE = "blocks.8.hook_resid_pre"  # the fixture SAEs' hook (cfg.json meta.hook_name), d_model 32
ARCHS = ("standard", "jumprelu", "topk")


def sae_target(arch: str, i: int, folder: Path = SAES) -> str:
    return f"{SITE}@sae:{folder / arch}[{i}]"


@pytest.fixture(scope="module")
def lm(tiny_gpt2):
    return load_model(tiny_gpt2, CPU)


@pytest.fixture
def direction(tmp_path) -> str:
    path = tmp_path / "probe.npy"
    np.save(path, 3.0 * np.random.default_rng(0).standard_normal(32).astype(np.float32))  # norm ~17: normalized
    return str(path)


def _x(seed=1, runs=3, pos=4):
    return torch.randn(runs, pos, 32, generator=torch.Generator().manual_seed(seed))  # [runs, pos, d_model]


def _site(lm, x):
    with HookedReader(lm, Target(8, "hook_resid_pre", 0)) as reader:
        return reader.read_site(x).double().numpy()  # [runs, pos, 32]


def _numpy_encode(folder: Path, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SAELens's encode of the whole SAE, in float64 numpy: (pre [.., d_sae], post [.., d_sae])."""
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(folder / "sae_weights.safetensors").items()}
    pre = (s - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]
    if cfg.get("rescale_acts_by_decoder_norm"):  # TopK
        pre = pre * np.linalg.norm(w["W_dec"], axis=-1)
    if cfg["architecture"] == "standard":
        post = np.maximum(pre, 0)
    elif cfg["architecture"] == "jumprelu":
        post = np.maximum(pre, 0) * (pre > w["threshold"])
    else:  # topk: the k largest pre-activations, relu'd; every other latent 0
        top = np.argsort(-pre, axis=-1)[..., :cfg["k"]]
        post = np.zeros_like(pre)
        np.put_along_axis(post, top, np.maximum(np.take_along_axis(pre, top, -1), 0), -1)
    return pre, post


# --- the activation of one latent, against SAELens's encoder in numpy ---------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_latent_activation_equals_the_encoder(lm, arch):
    x = _x()
    pre, post = _numpy_encode(SAES / arch, _site(lm, x))
    with site_reader(lm, Target.parse(sae_target(arch, 0))) as probe:
        assert isinstance(probe, FeatureReader)
    for i in range(16):
        with site_reader(lm, Target.parse(sae_target(arch, i))) as reader:
            act = reader(x).double().numpy()  # [runs, pos]
        if arch == "topk":  # relu(pre): SAELens's value wherever latent i is among the top k, as documented
            np.testing.assert_allclose(act, np.maximum(pre[..., i], 0), atol=1e-5)
            fires = post[..., i] > 0
            np.testing.assert_allclose(act[fires], post[..., i][fires], atol=1e-5)
        else:
            np.testing.assert_allclose(act, post[..., i], atol=1e-5)
    # the fixture is not degenerate: latents fire on some inputs and not on others
    assert (post > 0).any() and (post == 0).any()


def test_latent_activation_equals_saelens_own_encode():
    """SAELens 6.54.12's SAE.load_from_disk(...).encode(x) of the fixtures (make_sae_fixture.py --saelens)."""
    saved = np.load(SAES / "saelens_encode.npz")
    x = torch.from_numpy(saved["x"])  # [3, 4, 32] read as a site's vectors
    for arch in ARCHS:
        want = saved[arch]  # [3, 4, 16]
        act = features.readout([Target.parse(sae_target(arch, i)) for i in range(16)], 32)(x.repeat(16, 1, 1),
              torch.arange(16).repeat_interleave(3)).view(16, 3, 4).permute(1, 2, 0).numpy()  # [3, 4, 16]
        fires = want > 0
        np.testing.assert_allclose(act[fires], want[fires], rtol=1e-5, atol=1e-6)
        if arch == "topk":  # silent where SAELens's top k left latent i out, though relu(pre) may be > 0
            assert (act >= 0).all() and (act > 0).sum() > fires.sum()
        else:
            assert (act[~fires] == 0).all()
        assert fires.any() and (~fires).any()


def test_per_row_latents_and_their_gradient(lm):
    """Rows of one SAE read their own latents (--controls, sweeps), gradients included."""
    rows = [Target.parse(sae_target("jumprelu", i)) for i in (3, 7, 3)]
    x = _x(runs=3).requires_grad_(True)
    with site_reader(lm, rows[0], index=rows) as reader:
        act = reader(x)
        act.sum().backward()
    for r, target in enumerate(rows):
        alone = _x(runs=3).requires_grad_(True)
        with site_reader(lm, target) as one:
            a = one(alone)
            a[r].sum().backward()
        torch.testing.assert_close(act[r], a[r], rtol=0, atol=1e-6)
        torch.testing.assert_close(x.grad[r], alone.grad[r], rtol=0, atol=1e-6)


def test_direction_is_the_normalized_dot_product(lm, direction):
    x = _x()
    d = np.load(direction).astype(np.float64)
    with site_reader(lm, Target.parse(f"{SITE}@{direction}")) as reader:
        act = reader(x).double().numpy()
    np.testing.assert_allclose(act, _site(lm, x) @ (d / np.linalg.norm(d)), atol=1e-5)
    a, b = (features.random_direction(0, 8, "hook_resid_pre", 1, 32) for _ in range(2))
    assert np.array_equal(a, b) and abs(np.linalg.norm(a) - 1) < 1e-12  # reproducible unit directions
    assert not np.array_equal(a, features.random_direction(1, 8, "hook_resid_pre", 1, 32))


def test_file_tags_and_artifacts(direction, tmp_path):
    target = Target.parse(f"{SITE}@{direction}")
    tags = features.target_tags(target)
    assert tags["target.file_sha256"] == features.file_sha256(target) and tags["target.file_path"] == direction
    assert list(features.file_artifacts(target)) == ["target_file/probe.npy"]
    big = tmp_path / "big.npy"
    np.save(big, np.ones(300_000, np.float32))  # 1.2 MB: pinned by sha256 and path only
    assert features.file_artifacts(Target.parse(f"{SITE}@{big}")) == {}
    Path(direction).unlink()  # `amrepro log` after the file moved: tags say so instead of failing
    assert "could not be read" in features.target_tags(target)["target.description"]
    assert features.target_tags(Target.parse(f"{SITE}[3]")) == {}


# --- every method, in process --------------------------------------------------------------------------------

TINY = dict(runs=2, n_tokens=3, epochs=4, steps=2, epo_steps=2, topk=8, candidates=8, population=2, device="cpu")


@pytest.mark.parametrize("method", ["adam", "pez", "gcg", "epo"])
def test_every_method_runs_on_a_direction_and_each_sae(lm, tiny_gpt2, direction, method):
    for target in (f"{SITE}@{direction}", *(sae_target(arch, 2) for arch in ARCHS)):
        config = Config(model=tiny_gpt2, method=method, target=target, controls=1 if method == "gcg" else 0, **TINY)
        outcome = execute(prepare(config, lm=lm))
        assert outcome.ids.shape == (2, 3) and np.isfinite(outcome.decoded_activation).all()
        # the logged activation of the real tokens is the reader's own value on them
        with site_reader(lm, Target.parse(target)) as reader:
            again = reader(lm.embedding[torch.as_tensor(outcome.ids)]).mean(dim=1)
        torch.testing.assert_close(again, torch.as_tensor(outcome.decoded_activation), rtol=0, atol=1e-5)
        if config.controls:
            assert outcome.specificity is not None and len(outcome.specificity["controls"]) == 1


def test_corpus_yardstick_reads_the_feature(lm):
    """--corpus windows are scored through the same reader: a latent's corpus activations are its own."""
    from amrepro import corpus

    yard = corpus.yardstick(lm, Target.parse(sae_target("standard", 3)), DATA / "corpus.txt", 3, top=10)
    ids = torch.tensor([w["ids"] for w in yard["top"]])  # [10, 3]
    _, post = _numpy_encode(SAES / "standard", _site(lm, lm.embedding[ids]))  # [10, 3, d_sae]
    assert post[..., 3].max() > 0  # the latent fires on these windows: the comparison means something
    np.testing.assert_allclose([w["positions"] for w in yard["top"]], post[..., 3], atol=1e-5)
    np.testing.assert_allclose([w["activation"] for w in yard["top"]], post[..., 3].mean(axis=1), atol=1e-5)


def test_controls_are_other_latents_or_random_directions(lm, tiny_gpt2, direction):
    sae = prepare(Config(model=tiny_gpt2, target=sae_target("topk", 5), controls=3, **TINY), lm=lm).controls
    assert len({t.index for t in sae}) == 3 and all(t.source.startswith("sae:") and t.index != 5 for t in sae)
    dirs = prepare(Config(model=tiny_gpt2, target=f"{SITE}@{direction}", controls=2, seed=7, **TINY), lm=lm).controls
    assert [t.name for t in dirs] == [f"{SITE}@random:7[0]", f"{SITE}@random:7[1]"]


# --- run, reproduce, sweep through the CLI -------------------------------------------------------------------

RUN = ["--runs", "2", "--epochs", "4", "--n-tokens", "3", "--lr", "0.05"]


def _parent(uri):
    (parent,) = [r for r in all_runs(uri) if "mlflow.parentRunId" not in r.data.tags]
    return parent


def test_run_and_reproduce_a_latent_with_its_file_pinned(tiny_gpt2, store, tmp_path):
    folder = tmp_path / "sae"
    shutil.copytree(SAES, folder)
    result = cli("run", "--model", tiny_gpt2, "--target", sae_target("jumprelu", 4, folder), "--controls", "2", *RUN)
    assert result.exit_code == 0, result.output
    parent = _parent(store)
    tags = parent.data.tags
    assert tags["target.file_sha256"] == features.file_sha256(Target.parse(sae_target("jumprelu", 4, folder)))
    assert tags["target.file_path"] == str(folder / "jumprelu")
    described = tags["target.description"]
    assert described.startswith("latent 4 of the jumprelu SAE") and "threshold[4]" in described
    files = {f.path for f in MlflowClient(store).list_artifacts(parent.info.run_id, "target_file")}
    assert files == {"target_file/cfg.json", "target_file/sae_weights.safetensors"}  # small: logged whole
    again = cli("reproduce", parent.info.run_id)
    assert again.exit_code == 0 and "reproduced: bit-identical" in again.output, again.output

    cfg = folder / "jumprelu" / "cfg.json"
    cfg.write_text(cfg.read_text().replace('"context_size": 5', '"context_size": 6'))  # any change counts
    n_runs = len(all_runs(store))
    refused = cli("reproduce", parent.info.run_id)
    assert refused.exit_code == 2 and "changed since the run" in refused.output, refused.output
    assert "Traceback" not in refused.output and len(all_runs(store)) == n_runs


def test_run_and_reproduce_a_direction(tiny_gpt2, store, direction):
    result = cli("run", "--model", tiny_gpt2, "--target", f"{SITE}@{direction}", "--controls", "1", *RUN)
    assert result.exit_code == 0, result.output
    parent = _parent(store)
    assert parent.data.params["target_name"] == f"{SITE}@{direction}"
    assert len(children_of(store, parent.info.run_id)) == 2 and "target.file_sha256" in parent.data.tags
    norm = np.linalg.norm(np.load(direction).astype(np.float64))
    assert f"|d| = {norm:.4g} in the file; normalized to 1" in parent.data.tags["target.description"]
    again = cli("reproduce", parent.info.run_id)
    assert again.exit_code == 0 and "reproduced: bit-identical" in again.output, again.output
    assert cli("decode", parent.info.run_id).exit_code == 0


def test_sweep_over_latents_and_reproduce_one(tiny_gpt2, store):
    spec = f"{SITE}@sae:{SAES / 'topk'}[random:3]"
    result = cli("sweep", "--model", tiny_gpt2, "--targets", spec, *RUN)
    assert result.exit_code == 0, result.output
    parents = [r for r in all_runs(store) if "amrepro.target" in r.data.tags]
    names = sorted(r.data.tags["amrepro.target"] for r in parents)
    assert names == sorted(t.name for t in parse_targets(spec, lambda b, s: 32, 10, seed=0))
    assert len({r.data.tags["amrepro.batch"] for r in parents}) == 1  # one SAE, one batch
    assert all(r.info.status == "FINISHED" and "target.file_sha256" in r.data.tags for r in parents)
    again = cli("reproduce", parents[1].info.run_id)  # re-runs the whole batch of three latents
    assert again.exit_code == 0 and "reproduced: bit-identical" in again.output, again.output


def test_sweep_spec_of_latents(direction):
    from amrepro.layout import batch_targets
    from amrepro.sweep import chunks

    spec = f"{SITE}@sae:{SAES / 'topk'}[0:3],{SITE}@sae:{SAES / 'topk'}[random:4],{SITE}[1],{SITE}@{direction}"
    targets = parse_targets(spec, lambda b, s: 32, 10, seed=0)
    assert targets[:3] == [Target(8, "hook_resid_pre", i, f"sae:{SAES / 'topk'}") for i in range(3)]
    assert targets[-2:] == [Target(8, "hook_resid_pre", 1), Target(8, "hook_resid_pre", 0, direction)]
    assert all(t.index < 16 for t in targets)
    assert [len(c) for c in chunks(targets, 64)] == [len(targets) - 2, 1, 1]  # a batch reads one SAE, or one file
    for chunk in chunks(targets, 64):  # the batch tag reproduce reads back names the same targets
        assert batch_targets(f"{chunk[0].prefix}:" + ",".join(str(t.index) for t in chunk)) == chunk
    with pytest.raises(AmreproError, match="1 to 16"):
        parse_targets(f"{SITE}@sae:{SAES / 'topk'}[random:17]", lambda b, s: 32, 10, seed=0)


# --- bad files: one sentence, exit 2, no run ---------------------------------------------------------------

def _bad_files(tmp: Path) -> list[tuple[str, str]]:
    np.save(tmp / "short.npy", np.ones(31, np.float32))
    np.save(tmp / "nan.npy", np.full(32, np.nan, np.float32))
    np.save(tmp / "text.npy", np.array(["a"] * 32))
    for name, edit in (("gated", {"architecture": "gated"}), ("scaled", {"normalize_activations": "layer_norm"}),
                       ("elsewhere", {"metadata": {"hook_name": "blocks.3.hook_resid_pre"}})):
        shutil.copytree(SAES / "standard", tmp / name)
        cfg = json.loads((tmp / name / "cfg.json").read_text())
        (tmp / name / "cfg.json").write_text(json.dumps({**cfg, **edit}))
    shutil.copytree(SAES / "standard", tmp / "noweights")
    (tmp / "noweights" / "sae_weights.safetensors").unlink()
    return [
        (f"{SITE}@{tmp / 'missing.npy'}", "does not exist"),
        (f"{SITE}@{tmp / 'short.npy'}", "shape (31,), but the site needs a float vector of shape (32,)"),
        (f"{SITE}@{tmp / 'nan.npy'}", "non-finite values"),
        (f"{SITE}@{tmp / 'text.npy'}", "but the site needs a float vector"),
        (f"blocks.8.mlp.hook_post@{tmp / 'short.npy'}", "shape (128,)"),
        (sae_target("topk", 16), "latent 16 is out of range"),
        (f"{SITE}@sae:{tmp / 'nowhere'}[0]", "it does not exist"),
        (f"{SITE}@sae:{tmp / 'noweights'}[0]", "one of them is missing"),
        (f"{SITE}@sae:{tmp / 'gated'}[0]", "architecture 'gated'"),
        (f"{SITE}@sae:{tmp / 'scaled'}[0]", "normalize_activations='layer_norm'"),
        (f"{SITE}@sae:{tmp / 'elsewhere'}[0]", "trained on blocks.3.hook_resid_pre"),
        (f"blocks.8.mlp.hook_post@sae:{SAES / 'topk'}[0]", "width 32, but blocks.8.mlp.hook_post has 128"),
    ]


def test_bad_target_files_are_one_sentence_exit_2_and_no_run(tiny_gpt2, store, tmp_path):
    for target, message in _bad_files(tmp_path):
        result = cli("run", "--model", tiny_gpt2, "--target", target, *RUN)
        assert result.exit_code == 2 and message in result.output, (target, result.output)
        assert "Traceback" not in result.output
    sweep = cli("sweep", "--model", tiny_gpt2, "--targets", f"{SITE}@sae:{tmp_path / 'gated'}[0:2]", *RUN)
    assert sweep.exit_code == 2 and "architecture 'gated'" in sweep.output, sweep.output
    assert all_runs(store) == []  # every check ran before the first run existed
