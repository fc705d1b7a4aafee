"""Targets by name, and the generic HookedReader on GPT-2, BERT, GPT-NeoX (parallel and sequential) and GPT-Neo:
every site equals HF's hidden_states or the algebra of HF's own submodules, the forward stops at the site, and
no hook outlives a reader (not after an exception, not after a whole experiment)."""

import pytest
import torch

from amrepro.config import AmreproError, Config
from amrepro.experiment import execute, prepare
from amrepro.model import load_model
from amrepro.readers import HookedReader, site_reader
from amrepro.targets import ALL_SITES, Target, check_target, site_location
from tiny import tiny_tokenizer, write_tiny_gpt2

CPU = torch.device("cpu")
D_MODEL, N_LAYERS = 32, 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine a second spinning thread
    makes each op ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- names -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["blocks.8.hook_resid_pre[91]", "blocks.0.hook_resid_mid[0]",
                                  "blocks.11.hook_resid_post[767]", "blocks.3.hook_attn_out[5]",
                                  "blocks.6.mlp.hook_post[1234]"])
def test_parse_round_trips(name):
    target = Target.parse(f"  {name} ")
    assert target.name == name and Target.parse(target.name) == target


def test_parse_fields_and_layer_dim_shorthand():
    assert Target.parse("blocks.6.mlp.hook_post[1234]") == Target(block=6, site="mlp.hook_post", index=1234)
    assert Target.parse(Config(layer=8, dim=91).target_name) == Target(8, "hook_resid_pre", 91)


@pytest.mark.parametrize("name", ["blocks.8.hook_resid_pre", "blocks.x.hook_resid_pre[1]", "blocks.8.hook_foo[1]",
                                  "resid_pre[91]", "blocks.8.hook_resid_pre[-1]", "blocks.8.mlp.hook_pre[3]", ""])
def test_unknown_names_list_the_valid_sites(name):
    with pytest.raises(AmreproError) as error:
        Target.parse(name)
    assert all(site in str(error.value) for site in ALL_SITES) and "blocks.8.hook_resid_pre[91]" in str(error.value)


def test_range_checks_name_the_valid_range():
    with pytest.raises(AmreproError, match=r"block 12 is out of range: the model has 12 blocks \(valid: 0\.\.11"):
        check_target(Target(12, "hook_resid_pre", 0), n_layers=12, width=768)
    with pytest.raises(AmreproError, match=r"index 768 is out of range for hook_resid_pre, which has 768 "
                                           r"dimensions \(valid: 0\.\.767\)"):
        check_target(Target(3, "hook_resid_pre", 768), n_layers=12, width=768)
    check_target(Target(11, "hook_resid_pre", 767), n_layers=12, width=768)  # the last valid ones pass


def test_site_availability_per_architecture():
    assert site_location("bert", "mlp.hook_post") == ("intermediate", "output")
    assert site_location("opt", "hook_resid_post") == ("", "output")  # residual sites work on any model
    with pytest.raises(AmreproError, match="valid sites: hook_resid_pre, hook_resid_post.$"):
        site_location("opt", "mlp.hook_post")
    with pytest.raises(AmreproError, match=r"parallel: there is no resid_mid\); valid sites: hook_resid_pre, "
                                           r"hook_resid_post, hook_attn_out, mlp.hook_post"):
        site_location("gpt_neox", "hook_resid_mid")


# --- tiny models of each architecture ---------------------------------------------------------------------

def _write(folder, model):
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def paths(tiny_gpt2, tmp_path_factory):
    """Tiny random models of every architecture with site mappings, saved and loaded like real ones."""
    from transformers import BertConfig, BertModel, GPTNeoConfig, GPTNeoModel, GPTNeoXConfig, GPTNeoXModel

    root, vocab = tmp_path_factory.mktemp("arch"), len(tiny_tokenizer())
    torch.manual_seed(0)
    sizes = dict(vocab_size=vocab, hidden_size=D_MODEL, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64)
    return {
        "gpt2": str(write_tiny_gpt2(root / "gpt2", n_layer=N_LAYERS)),
        "bert": _write(root / "bert", BertModel(BertConfig(num_hidden_layers=N_LAYERS, **sizes))),
        "neox": _write(root / "neox", GPTNeoXModel(GPTNeoXConfig(num_hidden_layers=N_LAYERS, **sizes))),
        "neox_seq": _write(root / "neox_seq", GPTNeoXModel(
            GPTNeoXConfig(num_hidden_layers=N_LAYERS, use_parallel_residual=False, **sizes))),
        "neo": _write(root / "neo", GPTNeoModel(GPTNeoConfig(
            num_layers=N_LAYERS, attention_types=[[["global", "local"], N_LAYERS // 2]], window_size=4, **sizes))),
    }


def loud(lm):
    """Weights far from the tiny init (0.02), so that attention and MLP are not drowned by the residual path and
    a wrong site would be far off, not 1e-3 off."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in lm.model.modules():
            for name, p in module.named_parameters(recurse=False):
                is_gain = isinstance(module, torch.nn.LayerNorm) and name == "weight"
                p.copy_((1.0 if is_gain else 0.0) + 0.3 * torch.randn(p.shape, generator=generator))
    return lm


@pytest.fixture(scope="module")
def models(paths):
    return {arch: loud(load_model(path, CPU)) for arch, path in paths.items()}


def _x(seed=1, runs=2, pos=5):
    return torch.randn(runs, pos, D_MODEL, generator=torch.Generator().manual_seed(seed))  # [runs, pos, d_model]


def read(lm, site, block, x, index=0):
    with HookedReader(lm, Target(block, site, index)) as reader:
        return reader.read_site(x).detach(), reader(x).detach()  # [runs, pos, width], [runs, pos]


def hidden_states(lm, x):
    with torch.no_grad():
        return lm.model(inputs_embeds=x, output_hidden_states=True).hidden_states


def close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * max(1.0, float(b.abs().max())))


# --- residual sites are HF's hidden_states ------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "bert", "neox", "neox_seq", "neo"])
def test_residual_sites_equal_hidden_states(models, arch):
    lm, x = models[arch], _x()
    hs = hidden_states(lm, x)
    for layer in range(N_LAYERS):  # hidden_states[N_LAYERS] has the final LayerNorm (GPT-2, NeoX, Neo) folded in
        site, one = read(lm, "hook_resid_pre", layer, x, index=D_MODEL - 1)
        assert torch.equal(site, hs[layer]) and torch.equal(one, hs[layer][..., D_MODEL - 1])
        if layer > 0:
            assert torch.equal(read(lm, "hook_resid_post", layer - 1, x, index=D_MODEL - 1)[1],
                               hs[layer][..., D_MODEL - 1])


def test_tiny_gpt2_fixture_blocks_8_and_7(tiny_gpt2):
    """The reference's target, blocks.8.hook_resid_pre, on the 10-layer fixture (d_model 32: dim 31)."""
    lm, x = load_model(tiny_gpt2, CPU), _x(seed=2)
    hs = hidden_states(lm, x)
    assert torch.equal(read(lm, "hook_resid_pre", 8, x, index=31)[1], hs[8][..., 31])
    assert torch.equal(read(lm, "hook_resid_post", 7, x, index=31)[1], hs[8][..., 31])


# --- the other sites satisfy the block's algebra, computed with HF's own submodules --------------------------
# Three equations per architecture pin all three sites: the MLP equation fixes resid_mid (it determines
# hidden_states[L+1] on its own), the residual sum then fixes attn_out, and mlp.hook_post is recomputed.

def _sites(lm, layer, x):
    available = [s for s in ("hook_resid_mid", "hook_attn_out", "mlp.hook_post")
                 if s != "hook_resid_mid" or lm.model_type != "gpt_neox" or not lm.model.config.use_parallel_residual]
    return {s: read(lm, s, layer, x)[0] for s in available}


@pytest.mark.parametrize("arch", ["gpt2", "neo"])
@pytest.mark.parametrize("layer", [0, 2])
def test_pre_ln_gpt_sites(models, arch, layer):
    lm, x = models[arch], _x()
    hs, block = hidden_states(lm, x), lm.blocks[layer]
    s = _sites(lm, layer, x)
    with torch.no_grad():
        close(s["hook_resid_mid"], hs[layer] + s["hook_attn_out"])
        close(s["mlp.hook_post"], block.mlp.act(block.mlp.c_fc(block.ln_2(s["hook_resid_mid"]))))
        close(hs[layer + 1], s["hook_resid_mid"] + block.mlp.c_proj(s["mlp.hook_post"]))
    assert s["mlp.hook_post"].shape[-1] == {"gpt2": 4 * D_MODEL, "neo": 64}[arch]  # n_inner / intermediate_size


@pytest.mark.parametrize("layer", [0, 2])
def test_bert_sites_post_ln(models, layer):
    lm, x = models["bert"], _x()
    hs, block = hidden_states(lm, x), lm.blocks[layer]
    s = _sites(lm, layer, x)
    with torch.no_grad():  # post-LN: resid_mid is LayerNorm(resid_pre + attn_out), the MLP's input and residual
        close(s["hook_resid_mid"], block.attention.output.LayerNorm(hs[layer] + s["hook_attn_out"]))
        close(s["mlp.hook_post"], block.intermediate.intermediate_act_fn(block.intermediate.dense(s["hook_resid_mid"])))
        close(hs[layer + 1], block.output.LayerNorm(block.output.dense(s["mlp.hook_post"]) + s["hook_resid_mid"]))
    assert s["mlp.hook_post"].shape[-1] == 64


@pytest.mark.parametrize("layer", [0, 2])
def test_gpt_neox_parallel_sites(models, layer):
    lm, x = models["neox"], _x()
    hs, block = hidden_states(lm, x), lm.blocks[layer]
    s = _sites(lm, layer, x)
    assert "hook_resid_mid" not in s
    with torch.no_grad():  # attention and MLP both read resid_pre
        close(s["mlp.hook_post"], block.mlp.act(block.mlp.dense_h_to_4h(block.post_attention_layernorm(hs[layer]))))
        close(hs[layer + 1], hs[layer] + s["hook_attn_out"] + block.mlp.dense_4h_to_h(s["mlp.hook_post"]))
    with pytest.raises(AmreproError, match="no resid_mid"):
        HookedReader(lm, Target(layer, "hook_resid_mid", 0))


@pytest.mark.parametrize("layer", [0, 2])
def test_gpt_neox_sequential_sites(models, layer):
    lm, x = models["neox_seq"], _x()
    hs, block = hidden_states(lm, x), lm.blocks[layer]
    s = _sites(lm, layer, x)
    with torch.no_grad():
        close(s["hook_resid_mid"], hs[layer] + s["hook_attn_out"])
        close(s["mlp.hook_post"],
              block.mlp.act(block.mlp.dense_h_to_4h(block.post_attention_layernorm(s["hook_resid_mid"]))))
        close(hs[layer + 1], s["hook_resid_mid"] + block.mlp.dense_4h_to_h(s["mlp.hook_post"]))


# --- the forward stops at the site ---------------------------------------------------------------------------

def _counter(module, calls, key):
    return module.register_forward_pre_hook(lambda *_: calls.__setitem__(key, calls.get(key, 0) + 1))


# the first module, inside the target's block, that runs after the site: it must not run either
RUNS_AFTER = {"hook_attn_out": {"gpt2": "mlp", "bert": "intermediate", "neox": "mlp"},
              "hook_resid_mid": {"gpt2": "mlp", "bert": "intermediate"},
              "mlp.hook_post": {"gpt2": "mlp.c_proj", "bert": "output.dense", "neox": "mlp.dense_4h_to_h"}}


@pytest.mark.parametrize("arch,site", [(arch, site) for arch in ("gpt2", "bert", "neox") for site in ALL_SITES
                                       if (arch, site) != ("neox", "hook_resid_mid")])  # parallel: no resid_mid
def test_forward_stops_after_the_site(models, arch, site):
    lm, layer = models[arch], 1
    reader = HookedReader(lm, Target(layer, site, 0))
    calls = {}
    handles = [_counter(lm.blocks[layer - 1], calls, "before")]
    handles += [_counter(b, calls, "later block") for b in lm.blocks[layer + 1:]]
    if site in RUNS_AFTER:
        handles.append(_counter(lm.blocks[layer].get_submodule(RUNS_AFTER[site][arch]), calls, "later module"))
    try:
        with reader:
            reader(_x())
    finally:
        for h in handles:
            h.remove()
    assert calls == {"before": 1}  # the blocks before ran (the counters work), nothing after the site did


# --- no hook outlives a reader -----------------------------------------------------------------------------

def hooks(model) -> dict:
    """Every forward hook and pre-hook on every module (and the global ones), by module name."""
    found = {name: (list(m._forward_hooks), list(m._forward_pre_hooks))
             for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks}
    glob = torch.nn.modules.module
    if glob._global_forward_hooks or glob._global_forward_pre_hooks:
        found["<global>"] = (list(glob._global_forward_hooks), list(glob._global_forward_pre_hooks))
    return found


@pytest.fixture
def fresh(paths):
    """Freshly loaded models: HF installs no hook until output_hidden_states is first asked for."""
    def load(arch):
        lm = load_model(paths[arch], CPU)
        assert hooks(lm.model) == {}
        return lm
    return load


@pytest.mark.parametrize("site", ALL_SITES)
def test_reader_leaves_no_hook(fresh, site):
    lm = fresh("gpt2")
    reader = HookedReader(lm, Target(2, site, 3))
    with reader:
        reader(_x())
        assert sum(len(a) + len(b) for a, b in hooks(lm.model).values()) == 1  # the guard sees live hooks
    assert hooks(lm.model) == {}
    with pytest.raises(ZeroDivisionError):
        with reader:
            reader(_x())
            1 / 0
    assert hooks(lm.model) == {}
    with pytest.raises(RuntimeError):  # the forward itself fails: wrong width
        with reader:
            reader(torch.zeros(1, 2, D_MODEL + 1))
    assert hooks(lm.model) == {}


def test_reader_refuses_to_nest_and_needs_a_with_block(fresh):
    lm = fresh("bert")
    reader = HookedReader(lm, Target(1, "hook_resid_pre", 0))
    with pytest.raises(RuntimeError, match="inside a `with` block"):
        reader(_x())
    with reader:
        with pytest.raises(RuntimeError, match="already in use"):
            reader.__enter__()
        assert sum(len(a) + len(b) for a, b in hooks(lm.model).values()) == 1
    assert hooks(lm.model) == {}


def test_readers_do_not_interfere(models):
    """Two readers live on one model at once, and a plain forward inside a reader's block: each hook stops only
    its own reader's forward (the inner block's hook fires first in the outer reader's forward)."""
    lm, x = models["bert"], _x(seed=3)
    hs = hidden_states(lm, x)
    late, early = HookedReader(lm, Target(3, "hook_resid_pre", 4)), HookedReader(lm, Target(1, "hook_resid_post", 4))
    with late, early:
        assert torch.equal(late(x), hs[3][..., 4]) and torch.equal(early(x), hs[2][..., 4])
        with torch.no_grad():
            assert torch.equal(lm.model(inputs_embeds=x).last_hidden_state, hs[-1])  # runs to the end


def test_hf_hooks_are_left_alone(models):
    """After output_hidden_states HF keeps its own (inactive) capture hooks: a reader must leave them as they are."""
    lm = models["gpt2"]
    hidden_states(lm, _x())
    before = hooks(lm.model)
    assert before  # HF's hooks are there
    read(lm, "hook_resid_post", 2, _x())
    assert hooks(lm.model) == before


@pytest.mark.parametrize("arch,target", [("gpt2", "blocks.3.hook_resid_pre[5]"),  # site_reader's probe, fast path
                                         ("bert", "blocks.2.mlp.hook_post[7]")])  # HookedReader throughout
def test_experiment_leaves_no_hook(fresh, paths, arch, target):
    lm = fresh(arch)
    config = Config(model=paths[arch], target=target, runs=2, epochs=3, n_tokens=3, device="cpu")
    outcome = execute(prepare(config, lm=lm))
    assert outcome.ids.shape == (2, 3)
    assert hooks(lm.model) == {}

    def interrupt(epoch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute(prepare(config, lm=lm), on_epoch=interrupt)
    assert hooks(lm.model) == {}


# --- ranges against a real model -------------------------------------------------------------------------

def test_site_reader_checks_ranges_against_the_model(models):
    lm = models["gpt2"]
    before = hooks(lm.model)
    with pytest.raises(AmreproError, match=r"block 4 is out of range: the model has 4 blocks \(valid: 0\.\.3"):
        site_reader(lm, Target(4, "hook_resid_pre", 0))
    with pytest.raises(AmreproError, match=r"which has 32 dimensions \(valid: 0\.\.31\)"):
        site_reader(lm, Target(1, "hook_resid_post", 32))
    site_reader(lm, Target(1, "mlp.hook_post", 127))  # the MLP is 4 x d_model wide
    with pytest.raises(AmreproError, match=r"mlp.hook_post, which has 128 dimensions \(valid: 0\.\.127\)"):
        site_reader(lm, Target(1, "mlp.hook_post", 128))
    assert hooks(lm.model) == before  # the width probe and the failed checks left nothing behind
