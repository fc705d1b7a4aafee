"""The method seam: adam unchanged to the bit, pez/gcg/epo raise the activation of real tokens, GCG finds a
planted optimum from every seed, reruns are bit-identical, EPO refuses encoders, candidates score correctly."""

import dataclasses

import pytest
import torch

from amrepro import methods
from amrepro.config import Config
from amrepro.experiment import execute, prepare
from amrepro.methods.candidates import Candidates
from amrepro.methods.problem import Problem
from amrepro.model import load_model
from amrepro.objectives import reference_loss
from amrepro.optimize import optimize
from amrepro.readers import HookedReader, site_reader
from amrepro.seeding import initial_embeddings
from amrepro.targets import Target
from helpers import all_runs, cli

CPU = torch.device("cpu")
SMALL = dict(runs=3, dim=3, steps=12, epo_steps=12, topk=32, candidates=32, population=4, device="cpu")


@pytest.fixture(scope="module")
def lm(tiny_gpt2):
    return load_model(tiny_gpt2, CPU)


def test_adam_is_the_reference_loop_to_the_bit(lm, tiny_gpt2):
    """--method adam (the default) is exactly optimize() on the reference's starts and loss."""
    config = Config(model=tiny_gpt2, runs=3, epochs=15, dim=3, lr=0.01, device="cpu")
    assert config.method == "adam"
    outcome = execute(prepare(config, lm=lm))
    start = initial_embeddings(config.seeds, config.n_tokens, lm.embedding_std(), lm.d_model)
    with site_reader(lm, Target.parse(config.target_name)) as reader:
        direct = optimize(reader, start, reference_loss(config.l2), config.seeds, config.epochs, config.lr, CPU)
    assert outcome.result.final.numpy().tobytes() == direct.final.numpy().tobytes()
    assert outcome.result.loss.numpy().tobytes() == direct.loss.numpy().tobytes()
    assert outcome.result.ids is None and outcome.result.history == {}


@pytest.mark.parametrize("method", ["pez", "gcg", "epo"])
def test_each_method_raises_the_activation_of_its_real_tokens(lm, tiny_gpt2, method):
    config = Config(model=tiny_gpt2, method=method, **SMALL)
    outcome = execute(prepare(config, lm=lm))
    result = outcome.result
    assert torch.equal(lm.embedding[result.ids], result.final)  # real tokens, exactly
    with site_reader(lm, Target.parse(config.target_name)) as reader:
        start_act = reader(result.initial).mean(1)  # [runs]
    assert (result.final_activation > start_act + 1e-4).all(), (start_act, result.final_activation)
    # the score IS the activation of the real tokens: nothing is lost to decoding
    assert torch.allclose(torch.from_numpy(outcome.decoded_activation), result.final_activation, atol=1e-6)
    hist = result.history["act/tokens"]  # [steps, runs]
    assert hist.shape == (config.n_steps, config.runs)
    if method != "epo":  # the best so far never falls (epo's best member may trade activation for fluency)
        assert (hist[1:] >= hist[:-1]).all()
    if method == "epo":
        assert result.history["xent/tokens"].shape == hist.shape and (result.history["xent/tokens"] > 0).all()
        assert len(outcome.summary["frontier"][0]) == config.population


@pytest.mark.parametrize("method", ["pez", "gcg", "epo"])
def test_reruns_are_bit_identical(lm, tiny_gpt2, method):
    config = Config(model=tiny_gpt2, method=method, **SMALL)
    a, b = (execute(prepare(config, lm=lm)) for _ in range(2))
    assert a.result.final.numpy().tobytes() == b.result.final.numpy().tobytes()
    assert torch.equal(a.result.ids, b.result.ids)
    for key in a.result.history:
        assert a.result.history[key].numpy().tobytes() == b.result.history[key].numpy().tobytes()
    other = execute(prepare(dataclasses.replace(config, seed=7), lm=lm))  # the seed matters
    assert not torch.equal(other.result.initial, a.result.initial)


def test_gcg_finds_a_planted_optimum_from_every_seed(tiny_gpt2):
    """One token's embedding carries a large value in dimension 5: the residual stream two blocks later is
    largest there when every position holds that token, so [t*] * n_tokens is the known optimum."""
    lm = load_model(tiny_gpt2, CPU)
    planted = 123
    with torch.no_grad():
        lm.embedding[planted, 5] = 8.0
    config = Config(model=tiny_gpt2, method="gcg", runs=4, target="blocks.2.hook_resid_pre[5]", n_tokens=4,
                    steps=10, topk=8, candidates=32, device="cpu")
    outcome = execute(prepare(config, lm=lm))
    assert (outcome.result.ids == planted).all(), outcome.result.ids
    assert outcome.summary["n_unique_tokens"] == 1


def test_candidates_match_hooked_reader_and_per_row_targets(lm):
    """The shared scorer (GPT-2 fast path here) gives the activation HF's own modules give, and with a per-row
    index (--controls) candidate c of row r reads row r's target."""
    target = Target.parse("blocks.4.hook_resid_pre[3]")
    ids = torch.randint(lm.embedding.shape[0], (2, 6, 5), generator=torch.Generator().manual_seed(0))
    index = torch.tensor([3, 17])
    with site_reader(lm, target, index=index) as fast:
        problem = Problem(lm, fast, [0, 0], Config())
        with Candidates(problem) as score:
            got = score.activation(ids)  # [2, 6]
    assert type(fast).__name__ == "GPT2Reader"
    for r, i in enumerate(index.tolist()):
        with HookedReader(lm, Target(4, "hook_resid_pre", i)) as slow, torch.no_grad():
            want = slow(lm.embedding[ids[r]]).mean(1)
        assert torch.allclose(got[r], want, atol=1e-5)


def test_run_and_reproduce_epo(tiny_gpt2, store):
    """The richest method end to end (gcg and pez reruns are pinned in-process above): its budget, null, both
    per-step histories, and a bit-identical reproduction."""
    result = cli("run", "--model", tiny_gpt2, "--method", "epo", "--runs", "2", "--epo-steps", "4", "--topk", "16",
                 "--candidates", "16", "--population", "2", "--dim", "3")
    assert result.exit_code == 0, result.output
    (parent,) = [r for r in all_runs(store) if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.params["method"] == "epo"
    page = parent.data.tags["mlflow.note.content"]  # the parent's description names the method's budget and null
    assert "2 seeds x 4 epo steps" in page and "chance: random start tokens" in page
    child = next(r for r in all_runs(store) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    from mlflow import MlflowClient

    for key in ("act/tokens", "xent/tokens"):
        assert len(MlflowClient(store).get_metric_history(child.info.run_id, key)) == 4, key
    again = cli("reproduce", parent.info.run_id)
    assert again.exit_code == 0 and "reproduced: bit-identical" in again.output, again.output


def test_epo_refuses_an_encoder_in_one_sentence(store):
    from test_minilm import minilm_path

    result = cli("run", "--model", minilm_path(), "--method", "epo", "--runs", "2", "--steps", "2",
                 "--target", "blocks.3.hook_resid_pre[100]")
    assert result.exit_code == 2, result.output
    assert "needs a causal language model" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert all_runs(store) == []  # refused before any MLflow run exists


def test_bad_method_is_one_sentence(store):
    result = cli("run", "--method", "sgd")
    sentence = result.output.strip()
    assert result.exit_code == 2 and sentence.startswith("error: --method must be one of adam, ") and "\n" not in sentence
    assert sentence.endswith(", got 'sgd'.") and all(f" {name}," in sentence for name in ("epo", "gcg", "pez"))


def test_the_registry_is_what_each_method_file_declares():
    """specs() reads every method file's SPEC from its source (so --help needs no torch): importing the file gives
    the same declaration, its run is the file's run, and the helper files are not methods."""
    import importlib

    assert {"adam", "pez", "gcg", "epo"} <= set(methods.names()) and "tokens" not in methods.names()
    for name, spec in methods.specs().items():
        module = importlib.import_module(f"amrepro.methods.{name}")
        assert module.SPEC == spec and methods.get(name) is module.run
        assert spec.budget in spec.options and spec.budget in {f.name for f in dataclasses.fields(Config)}


class RecordingConfig:
    """A Config that notes which of its fields a method reads."""

    def __init__(self, config):
        self.config, self.read = config, set()

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self.config, name)


@pytest.mark.parametrize("name", methods.names())
def test_each_method_reads_exactly_the_options_it_declares(lm, tiny_gpt2, name):
    """A Spec's options are the Config fields its run reads besides the shared ones: the CLI's "Read by" help,
    validation and the docs rely on it."""
    config = Config(model=tiny_gpt2, method=name, **{**SMALL, "runs": 1, "epochs": 2, "steps": 2, "epo_steps": 1})
    recording = RecordingConfig(config)
    with site_reader(lm, Target.parse(config.target_name)) as reader:
        methods.get(name)(Problem(lm, reader, config.seeds, recording))
    fields = {f.name for f in dataclasses.fields(Config)}
    assert recording.read & fields == set(methods.SHARED) | set(methods.spec(name).options)


@pytest.mark.parametrize("method", ["gcg", "epo"])
def test_controls_rows_read_their_own_targets(lm, tiny_gpt2, method):
    """With --controls the batch grows by the control targets' rows (per-row index through the candidate
    scorer too): the target's own runs find the same tokens as without them."""
    config = Config(model=tiny_gpt2, method=method, **{**SMALL, "steps": 4, "epo_steps": 3})
    alone = execute(prepare(config, lm=lm))
    with_controls = execute(prepare(dataclasses.replace(config, controls=2), lm=lm))
    assert with_controls.ids.tolist() == alone.ids.tolist()
    assert len(with_controls.summary["specificity"]["control_token_ids"]) == 2


def test_outcome_file_keeps_tokens_histories_and_frontier(lm, tiny_gpt2, tmp_path, monkeypatch):
    """`amrepro log FILE` logs what the file kept: a discrete method's ids, per-step metrics and epo frontier."""
    from amrepro import outcome_file

    monkeypatch.setenv("AMREPRO_OUTCOMES", str(tmp_path))
    config = Config(model=tiny_gpt2, method="epo", **{**SMALL, "epo_steps": 2})
    outcome = execute(prepare(config, lm=lm))
    path = outcome_file.save(outcome, "p" * 32, "0", "sqlite:///x.db", config.to_params(), {}, b"")
    back = outcome_file.load(path).outcome.result
    assert torch.equal(back.ids, outcome.result.ids) and back.frontier == outcome.result.frontier
    assert set(back.history) == {"act/tokens", "xent/tokens"}
    assert torch.equal(back.history["xent/tokens"], outcome.result.history["xent/tokens"])
