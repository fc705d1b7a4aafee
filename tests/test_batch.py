"""Many targets in one batch (batch.py) give what each target gives alone (`amrepro run --target T`)."""

import dataclasses

import numpy as np
import pytest
import torch

from amrepro.batch import execute_many, prepare_many
from amrepro.config import AmreproError, Config
from amrepro.experiment import execute, prepare
from amrepro.model import load_model
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
