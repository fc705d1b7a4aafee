"""The GPT-2 fast path (hand-written forward and input-gradient backward, packed weights on the CPU) must
equal the generic HookedReader and HF's own hidden_states, values and gradients, for every site."""

import pytest
import torch

from amrepro import kernels
from amrepro.gpt2 import GPT2Reader
from amrepro.model import load_model
from amrepro.readers import HookedReader, site_reader
from amrepro.targets import ALL_SITES, Target

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lm(tiny_gpt2):
    """The tiny GPT-2 with weights large enough that attention and MLP shape the gradient: with GPT-2's 0.02
    init, the residual path alone gives almost the whole gradient and a wrong backward would hide in it."""
    lm = load_model(tiny_gpt2, CPU)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return lm


def _x(R=3, P=6, D=32, seed=1) -> torch.Tensor:
    return torch.randn(R, P, D, generator=torch.Generator().manual_seed(seed))  # [runs, pos, d_model]


def value_and_grad(reader_cls, lm, target, x):
    """The site values [R, P] and d(sum of weighted values)/dx [R, P, D]; the weights make every position count."""
    x = x.clone().requires_grad_(True)
    with reader_cls(lm, target) as read:
        act = read(x)  # [R, P]
        weights = torch.linspace(-1.0, 2.0, act.numel()).view(act.shape)
        (act * weights).sum().backward()
    return act.detach(), x.grad


def assert_close(a, b):
    """Equal up to float32 round-off, relative to the tensor's scale: values and gradients reach ~10-30 here, and
    GEMMs summing in another order (oneDNN vs MKL) differ by ~1e-6 of that; a wrong formula differs by ~1e-1."""
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


SITE_CASES = [(site, block) for site in ALL_SITES for block in (0, 4, 9)]


@pytest.mark.parametrize("site,block", SITE_CASES)
def test_equals_hooked_reader(lm, site, block):
    target = Target(block=block, site=site, index=20 if site == "mlp.hook_post" else 7)
    act, grad = value_and_grad(GPT2Reader, lm, target, _x())
    act_ref, grad_ref = value_and_grad(HookedReader, lm, target, _x())
    assert_close(act, act_ref)
    assert_close(grad, grad_ref)
    assert grad.abs().max() > 0.1  # the gradient is not trivially small


@pytest.mark.parametrize("layer", [0, 1, 5, 9])
def test_equals_hf_hidden_states(lm, layer):
    """--layer L --dim D is HF hidden_states[L][..., D] (hidden_states[n_layers] is after ln_f: not a site)."""
    dim = 13
    x = _x().requires_grad_(True)
    hs = lm.model(inputs_embeds=x, output_hidden_states=True).hidden_states[layer][..., dim]  # [R, P]
    weights = torch.linspace(-1.0, 2.0, hs.numel()).view(hs.shape)
    (grad_ref,) = torch.autograd.grad((hs * weights).sum(), x)
    act, grad = value_and_grad(GPT2Reader, lm, Target(layer, "hook_resid_pre", dim), _x())
    assert_close(act, hs.detach())
    assert_close(grad, grad_ref)


@pytest.fixture
def kernel_state():
    """Tests that force a GEMM kernel leave the process's choice as they found it."""
    saved = dict(kernels._state)
    yield
    kernels._state.update(saved)


AVAILABLE = [k for k in kernels.KERNELS if kernels.available(k)]


@pytest.mark.parametrize("kernel", AVAILABLE)
@pytest.mark.parametrize("site", ["hook_resid_post", "mlp.hook_post"])
def test_every_gemm_kernel_equals_hooked_and_repeats_bit_for_bit(lm, site, kernel, kernel_state):
    """Each kernel the probe may choose (oneDNN, MKL packed, plain addmm) computes the same values and gradients;
    the same kernel twice gives the same bits (kernels round differently, so the choice is logged)."""
    target = Target(block=6, site=site, index=3)
    kernels.force(kernel)
    act, grad = value_and_grad(GPT2Reader, lm, target, _x())
    again = value_and_grad(GPT2Reader, lm, target, _x())
    assert torch.equal(act, again[0]) and torch.equal(grad, again[1])
    assert kernels.tags()["env.kernels"] == kernel
    act_ref, grad_ref = value_and_grad(HookedReader, lm, target, _x())
    assert_close(act, act_ref)
    assert_close(grad, grad_ref)


def test_kernel_is_chosen_by_measurement_once_per_process(lm, kernel_state, monkeypatch, tmp_path):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.setenv("AMREPRO_CACHE", str(tmp_path))
    kernels.force(None)
    target = Target(block=2, site="hook_resid_post", index=3)
    with GPT2Reader(lm, target) as reader:
        reader(_x())
    tags = kernels.tags()
    assert reader.kernel == tags["env.kernels"] in AVAILABLE
    assert [part.split()[0] for part in tags["env.kernels_probe"].split(", ")] == AVAILABLE  # every one timed
    with GPT2Reader(lm, Target(block=4, site="hook_attn_out", index=1)) as other:
        other(_x(R=5))
    assert other.kernel == reader.kernel  # no second probe, whatever it would measure now
    # another process on this machine (state reset) reads the cached measurement instead of probing again
    kernels.force(None)
    monkeypatch.setattr(kernels, "probe", lambda *a: pytest.fail("probed again despite the cache"))
    with GPT2Reader(lm, target) as again:
        again(_x())
    assert again.kernel == reader.kernel and (tmp_path / "kernels.json").exists()


def test_unknown_forced_kernel_is_one_sentence(monkeypatch, kernel_state):
    monkeypatch.setenv(kernels.ENV_VAR, "blas")
    with pytest.raises(ValueError, match="unknown GEMM kernel 'blas'; use one of onednn, mkl, plain"):
        kernels.forced()


@pytest.mark.parametrize("kernel", [k for k in AVAILABLE if k != "plain"])
def test_packs_weights_on_cpu_and_handles_other_batch_sizes(lm, kernel, kernel_state):
    """The weights are packed once for the first batch size; a later call with another size stays correct."""
    kernels.force(kernel)
    target = Target(block=9, site="hook_resid_post", index=5)
    reader = GPT2Reader(lm, target)
    with reader, HookedReader(lm, target) as hooked:
        reader(_x(R=2, P=3))
        assert all(blk.attn.kernel == kernel and blk.attn.rows == 6 for blk in reader._blocks)
        for R, P in ((1, 1), (5, 9), (16, 4)):
            assert_close(reader(_x(R, P)), hooked(_x(R, P)))
    assert reader._blocks is None  # __exit__ frees the packed copies


def test_no_grad_path_equals_grad_path(lm):
    target = Target(block=5, site="hook_attn_out", index=2)
    act, _ = value_and_grad(GPT2Reader, lm, target, _x())
    with GPT2Reader(lm, target) as read, torch.no_grad():
        assert torch.equal(read(_x()), act)


def test_site_reader_picks_fast_path_only_for_frozen_weights(tiny_gpt2):
    lm = load_model(tiny_gpt2, CPU)
    target = Target(block=3, site="hook_resid_pre", index=1)
    assert isinstance(site_reader(lm, target), GPT2Reader)
    lm.model.requires_grad_(True)  # the hand-written backward gives no weight gradients
    assert isinstance(site_reader(lm, target), HookedReader)


def test_backward_after_the_reader_is_closed(lm):
    """The graph keeps the weights its forward used: closing the reader (freeing its packed copies) before
    backward() is safe."""
    target = Target(block=7, site="hook_resid_post", index=4)
    _, grad_ref = value_and_grad(HookedReader, lm, target, _x())
    x = _x().requires_grad_(True)
    with GPT2Reader(lm, target) as read:
        act = read(x)  # [R, P]
    (act * torch.linspace(-1.0, 2.0, act.numel()).view(act.shape)).sum().backward()
    assert_close(x.grad, grad_ref)


def test_the_probe_keeps_onednn_unless_another_kernel_is_clearly_faster():
    """A probe of a fraction of a second on a busy machine once picked mkl at 519 vs 539 ms, which was 2.4x slower
    in the real step: a near tie keeps oneDNN; a clear win (the Xeon's MKL, say) still changes the kernel."""
    from amrepro.kernels import pick

    assert pick({"onednn": 538.7, "mkl": 519.1, "plain": 780.0}) == "onednn"
    assert pick({"onednn": 538.7, "mkl": 300.0, "plain": 780.0}) == "mkl"
    assert pick({"mkl": 2.0, "plain": 1.0}) == "plain"  # no oneDNN in this torch build: the fastest
