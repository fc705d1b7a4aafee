"""Speed never changes the science: amrepro's engine (batched runs, stop at the target block, hand-written
backward, packed GEMMs) and the reference notebook's loop (bench/reference.py: full HF forward, batch 1,
trainable weights) reach the same embeddings from the same start after the same number of Adam steps."""

import importlib.util
from pathlib import Path

import pytest
import torch

from amrepro.config import Config
from amrepro.experiment import batch_reader, prepare
from amrepro.objectives import reference_loss
from amrepro.optimize import optimize
from amrepro.seeding import initial_embeddings

_spec = importlib.util.spec_from_file_location("bench_reference", Path(__file__).parent.parent / "bench" / "reference.py")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

EPOCHS = 40


@pytest.fixture(scope="module")
def model_path(tiny_gpt2, tmp_path_factory) -> str:
    """The tiny GPT-2 with weights large enough that attention and MLP shape the gradient (with the 0.02 init the
    residual path alone would carry it), saved so that both sides load it with from_pretrained."""
    from transformers import AutoTokenizer, GPT2Model

    model = GPT2Model.from_pretrained(tiny_gpt2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            ln_scale = name.endswith(("ln_1.weight", "ln_2.weight"))
            p.copy_((1 if ln_scale else 0) + 0.2 * torch.randn(p.shape, generator=generator))
    folder = tmp_path_factory.mktemp("models") / "spiky-gpt2"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(folder)
    return str(folder)


def engine(model_path, layer, dim, distort=None):
    """amrepro's science path for 3 seeds, as `execute` runs it; distort(act, x) alters the activation (test only)."""
    config = Config(model=model_path, layer=layer, dim=dim, runs=3, epochs=EPOCHS, n_tokens=5, device="cpu", seed=7)
    prep = prepare(config)
    start = initial_embeddings(config.seeds, config.n_tokens, prep.lm.embedding_std(), prep.lm.d_model)
    with batch_reader([prep]) as reader:
        read = reader if distort is None else (lambda x: distort(reader(x), x))
        result = optimize(read, start, reference_loss(config.l2), config.seeds,
                          config.epochs, config.lr, prep.lm.device)
    return config, start, result.final  # [runs, pos, d_model] x2


@pytest.mark.parametrize("layer,dim", [(8, 11), (1, 30)])
def test_engine_reaches_the_reference_embeddings(model_path, layer, dim):
    config, start, final = engine(model_path, layer, dim)
    model = reference.load_reference_model(model_path)
    assert any(p.requires_grad for p in model.parameters())  # the notebook's unfrozen model, as it was
    for r in range(config.runs):
        expected = reference.reference_train(model, start[r], layer=layer, dim=dim, epochs=EPOCHS,
                                             lr=config.lr, l2=config.l2)  # [pos, d_model]
        assert (expected - start[r]).abs().max() > 0.5 * EPOCHS * config.lr  # every run really moved
        torch.testing.assert_close(final[r], expected, rtol=0, atol=1e-5)


def test_tolerance_catches_a_small_gradient_error(model_path):
    """The same comparison fails when the engine's gradient is slightly off (a 1e-2 leak of the input's first
    dimension into the activation): the tolerance has teeth."""
    config, start, final = engine(model_path, 8, 11, distort=lambda act, x: act + 1e-2 * x[..., 0])
    model = reference.load_reference_model(model_path)
    expected = reference.reference_train(model, start[0], layer=8, dim=11, epochs=EPOCHS)
    assert (final[0] - expected).abs().max() > 5e-5  # 5x the tolerance
