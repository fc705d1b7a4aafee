"""The science of the loop: activation rises, batching changes nothing, the same seed is bit-identical."""

import torch

from amrepro.config import Config
from amrepro.experiment import execute, prepare
from amrepro.seeding import initial_embeddings


def run(tiny_gpt2, **kw):
    config = Config(model=tiny_gpt2, dim=3, device="cpu", **{"runs": 3, "epochs": 40, **kw})
    return execute(prepare(config))


def test_activation_rises_and_loss_falls(tiny_gpt2):
    out = run(tiny_gpt2, epochs=60, lr=1e-2)
    r = out.result
    assert r.loss.shape == (60, 3) and r.activation.shape == (60, 3)
    assert (r.activation[-1] > r.activation[0]).all()
    assert (r.loss[-1] < r.loss[0]).all()
    assert (r.final_activation > r.activation[0]).all()


def test_initial_embeddings_follow_the_seed_and_wte_std(tiny_gpt2):
    out = run(tiny_gpt2, runs=2, epochs=1)
    prep = prepare(Config(model=tiny_gpt2, dim=3, device="cpu", runs=2))
    std = prep.lm.embedding.detach().std().item()
    expected = torch.stack([torch.randn(5, 32, generator=torch.Generator().manual_seed(s)) * std for s in (0, 1)])
    assert torch.equal(out.result.initial, expected)
    # a run's start depends on its seed alone, not on the batch it is in
    assert torch.equal(initial_embeddings([1], 5, std, 32)[0], out.result.initial[1])


def test_batched_equals_one_by_one(tiny_gpt2):
    """Adam is elementwise and runs never interact: a batch of 3 is the same optimization as 3 runs alone."""
    batch = run(tiny_gpt2, runs=3, seed=10, epochs=100, lr=1e-2)
    for r in range(3):
        alone = run(tiny_gpt2, runs=1, seed=10 + r, epochs=100, lr=1e-2)
        assert torch.equal(alone.result.initial[0], batch.result.initial[r])
        torch.testing.assert_close(alone.result.final[0], batch.result.final[r], atol=1e-5, rtol=0)
        assert alone.ids[0].tolist() == batch.ids[r].tolist()


def test_same_seed_twice_is_bit_identical(tiny_gpt2):
    a, b = run(tiny_gpt2, seed=5), run(tiny_gpt2, seed=5)
    assert torch.equal(a.result.final, b.result.final)
    assert torch.equal(a.result.loss, b.result.loss)
    c = run(tiny_gpt2, seed=6)
    assert not torch.equal(a.result.initial, c.result.initial)


def test_prepare_turns_on_torch_deterministic_mode(tiny_gpt2):
    """A kernel without a deterministic implementation raises rather than silently changing bits. (A fresh
    interpreter gets the same bytes as this one: test_mlproject runs `mlflow run` in a new process, then
    `reproduce` here, and asserts bit-identical.)"""
    torch.use_deterministic_algorithms(False)
    try:
        prepare(Config(model=tiny_gpt2, dim=3, device="cpu", runs=1))
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()  # errors, not warnings
    finally:
        torch.use_deterministic_algorithms(True)
