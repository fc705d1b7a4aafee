"""Many targets in one batch (experiment.prepare_many / execute_many) give what each target gives alone (`amrepro
run --target T`, a batch of one), and both give, bit for bit, what the reads they replaced gave."""

import dataclasses

import numpy as np
import pytest
import torch

from amrepro import methods
from amrepro.config import AmreproError, Config
from amrepro.experiment import execute, execute_many, prepare, prepare_many
from amrepro.methods.problem import Problem
from amrepro.model import load_model
from amrepro.readers import site_reader, site_width
from amrepro.specificity import choose_controls
from amrepro.targets import Target


@pytest.mark.parametrize("site, indices, controls", [("hook_resid_pre", [3, 17, 30], 0),
                                                     ("mlp.hook_post", [5, 100], 2)])
def test_each_target_of_a_batch_equals_its_run_alone(tiny_gpt2, site, indices, controls):
    lm = load_model(tiny_gpt2, torch.device("cpu"))
    config = Config(model=tiny_gpt2, runs=3, epochs=25, lr=0.05, controls=controls, threads=1)
    targets = [Target(4, site, i) for i in indices]
    together = execute_many(prepare_many(config, targets, lm))
    assert [o.target for o in together] == targets
    for target, many in zip(targets, together):
        alone = execute(prepare(dataclasses.replace(config, target=target.name), lm=lm))
        assert many.config == alone.config and many.config.target == target.name
        np.testing.assert_allclose(many.result.final.numpy(), alone.result.final.numpy(), rtol=0, atol=1e-6)
        assert torch.equal(many.result.initial, alone.result.initial)  # the same starts, bit for bit
        np.testing.assert_array_equal(many.ids, alone.ids)
        assert many.tokens == alone.tokens
        assert many.summary["statistics"]["verdict"] == alone.summary["statistics"]["verdict"]
        if controls:
            assert many.specificity["controls"] == alone.specificity["controls"]
    # the targets really differ: a batch that read one index for every row would fail here
    assert not np.allclose(together[0].result.final.numpy(), together[1].result.final.numpy())


def test_a_batch_reads_one_site(tiny_gpt2):
    lm = load_model(tiny_gpt2, torch.device("cpu"))
    with pytest.raises(AmreproError, match="one batch reads one site"):
        prepare_many(Config(model=tiny_gpt2), [Target(4, "hook_resid_pre", 1), Target(5, "hook_resid_pre", 1)], lm)
    with pytest.raises(AmreproError, match="out of range"):
        prepare_many(Config(model=tiny_gpt2), [Target(4, "hook_resid_pre", 1), Target(4, "hook_resid_pre", 32)], lm)


@pytest.mark.parametrize("controls", [0, 2])
def test_one_path_is_bit_identical_to_the_two_it_replaced(tiny_gpt2, controls):
    # What the code before the one science path optimized, spelt out here: `amrepro run` read its target with
    # site_reader(index=None) (with --controls, per-row indices target-then-controls), a sweep batch read per-row
    # indices for every row; both ran the method on seeds x targets. Equal bit for bit: runs logged before
    # reproduce. mlp.hook_post, where a per-row read rounds differently from a single-target one on GPT-2.
    lm = load_model(tiny_gpt2, torch.device("cpu"))
    config = Config(model=tiny_gpt2, target="blocks.4.mlp.hook_post[5]", runs=3, epochs=12, lr=0.05,
                    controls=controls, threads=1)
    targets = [Target(4, "mlp.hook_post", i) for i in (5, 9)]
    width = site_width(lm, targets[0])

    def before(rows: list[Target], per_row: bool) -> torch.Tensor:
        index = [t.index for t in rows for _ in range(config.runs)] if per_row else None
        with site_reader(lm, targets[0], index=index) as reader:
            return methods.get(config.method)(Problem(lm, reader, config.seeds * len(rows), config), None).final

    def with_controls(target: Target) -> list[Target]:
        picked = choose_controls(target.index, width, controls, config.seed, "blocks.4.mlp.hook_post")
        return [target] + [Target(4, "mlp.hook_post", i) for i in picked]

    alone = execute(prepare(config, lm=lm))
    assert torch.equal(alone.result.final, before(with_controls(targets[0]), per_row=bool(controls))[:config.runs])
    share = config.runs * (1 + controls)
    for batch in (targets, targets[:1]):  # a sweep's batch, also of one target (the last chunk of a sweep)
        expected = before([t for target in batch for t in with_controls(target)], per_row=True)
        for k, outcome in enumerate(execute_many(prepare_many(config, batch, lm))):
            assert torch.equal(outcome.result.final, expected[k * share:k * share + config.runs])
