"""One frozen Config: every hyperparameter of an experiment, each field carrying its own help text.

Only the standard library and the method registry (which imports nothing of amrepro but errors.py) are imported
here, so `amrepro --help` stays instant (no torch import) and no import cycle runs through Config.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from dataclasses import dataclass, field

from .errors import AmreproError
from .methods import spec, specs

LR_MAX = 1e37  # float32 max is 3.4e38; Adam divides lr by 1 - beta1 = 0.1 on its first step
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed and MLflow's integer params stay exact below this


def _f(default, help: str, env: str | None = None):
    """A Config field: its default, its help text and the environment variable, if any, of its CLI default."""
    return field(default=default, metadata={"help": help, "env": env})


@dataclass(frozen=True)
class Config:
    model: str = _f("gpt2", "Hugging Face model id, local folder (both loaded with from_pretrained) or .gguf "
                           "file (de-quantized to float32 once, then cached).")
    layer: int = _f(8, "Residual stream after LAYER blocks, i.e. HF hidden_states[LAYER] "
                       "(= blocks.LAYER.hook_resid_pre = output of block LAYER-1); 0 <= LAYER < n_layers.")
    dim: int = _f(91, "Index of the neuron (residual-stream dimension) to maximize.")
    target: str = _f("", "TransformerLens-style target, e.g. 'blocks.6.mlp.hook_post[1234]'; a direction "
                         "'blocks.8.hook_resid_pre@probe.npy' (normalized), or latent i of an SAE saved by SAELens "
                         "'blocks.8.hook_resid_pre@sae:FOLDER[i]'; overrides --layer/--dim when given.")
    runs: int = _f(10, "Number of independent runs (seeds SEED, SEED+1, ...), optimized as one batch.")
    epochs: int = _f(500, "Adam steps per run (the reference notebook used 300).")
    n_tokens: int = _f(5, "Number of input vectors (sequence length) optimized per run.")
    lr: float = _f(1e-3, "Adam learning rate.")
    l2: float = _f(0.01, "Weight of the L2 penalty sum(x**2) in the loss.")
    seed: int = _f(0, "Seed of run 0; run r uses SEED + r.")
    device: str = _f("auto", "auto (cuda if available), cpu or cuda.")
    threads: int = _f(0, "torch CPU threads; 0 = one per core (torch's default). Results are bit-identical only "
                         "for the same thread count; use 1 when several runs share the cores.")
    controls: int = _f(0, "K other targets of the same site (an SAE latent: of the same SAE; a direction: random "
                          "unit directions), chosen reproducibly from the seed, optimized in the same batch to test "
                          "target specificity (0: none).")
    method: str = _f("adam", "Optimizer, the file amrepro/methods/METHOD.py.")
    steps: int = _f(60, "Steps per run; each gcg step scores --candidates token swaps per run.")
    epo_steps: int = _f(12, "Steps per run: each runs the whole model (its LM head reads the last block) "
                            "on --candidates sequences, ~5x the cost of a gcg step on SmolLM2.")
    topk: int = _f(256, "Replacement tokens per position, ranked by the one-hot gradient (nanoGCG: 256).")
    candidates: int = _f(128, "Candidate sequences (one token swap each) evaluated per run per step; epo "
                              "splits them across its population.")
    population: int = _f(8, "Population members per run, with fluency penalties log-spaced from 0.1 to 10 "
                            "(dreamy's defaults).")
    pez_lr: float = _f(0.1, "Adam learning rate of the continuous vectors (Wen et al. 2023: 0.1).")
    corpus_max_tokens: int = _f(1_000_000, "compare/sweep --corpus: score the windows of at most this many tokens of "
                                           "the corpus (its start; 0: the whole file). Time grows with it, one "
                                           "forward per window; memory does not (the file is streamed).")
    figures: bool = _f(True, "Draw each target's five PNG figures (curves, token grid, ...) at the end of the run "
                             "(off: `amrepro figures RUN_ID` draws them later; the statistics, tables and "
                             "dashboard.html are logged all the same). Default from the environment variable "
                             "AMREPRO_FIGURES (0/false/off) when set.", env="AMREPRO_FIGURES")

    @property
    def target_name(self) -> str:
        """The target as a TransformerLens-style name; --layer/--dim is shorthand for resid_pre."""
        return self.target or f"blocks.{self.layer}.hook_resid_pre[{self.dim}]"

    @property
    def n_steps(self) -> int:
        """Steps of the chosen method: the Config field its Spec names as its budget."""
        return getattr(self, spec(self.method).budget)

    @property
    def step_unit(self) -> str:
        """What n_steps counts: "epochs" (adam) or "<method> steps"."""
        return spec(self.method).unit

    @property
    def seeds(self) -> list[int]:
        return [self.seed + r for r in range(self.runs)]

    def validate(self) -> "Config":
        """Checks that need no model; model-dependent ranges are checked once the model is loaded."""
        for name in ("runs", "n_tokens"):
            if getattr(self, name) < 1:
                raise AmreproError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.corpus_max_tokens < 0:
            raise AmreproError(f"--corpus-max-tokens must be 0 (the whole file) or more, got {self.corpus_max_tokens}.")
        for name in ("lr", "l2"):  # nan/inf would only "optimize" into NaN embeddings
            if not math.isfinite(getattr(self, name)):
                raise AmreproError(f"--{name} must be a finite number, got {getattr(self, name)}.")
        if not 0 < self.lr < LR_MAX:
            raise AmreproError(f"--lr must be positive and below {LR_MAX:g} (Adam's first step, lr / (1 - beta1), "
                               f"must fit in float32), got {self.lr}." if self.lr > 0 else
                               f"--lr must be positive, got {self.lr}.")
        if self.l2 < 0:
            raise AmreproError(f"--l2 must be non-negative, got {self.l2}.")
        if self.layer < 0 or self.dim < 0:
            raise AmreproError("--layer and --dim must be non-negative.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise AmreproError(f"--device must be auto, cpu or cuda, got {self.device!r}.")
        if not 0 <= self.seed <= SEED_MAX - (self.runs - 1):
            raise AmreproError(f"--seed must be between 0 and {SEED_MAX - (self.runs - 1)} (the last run uses "
                               f"SEED + RUNS - 1 <= 2**63 - 1), got {self.seed}.")
        if self.threads < 0:
            raise AmreproError(f"--threads must be 0 (one per core) or more, got {self.threads}.")
        spec(self.method)  # an unknown method: one sentence naming them all
        counts = {o for s in specs().values() for o in s.options if type(getattr(self, o)) is int}  # steps, sizes
        for name in sorted(counts):
            if getattr(self, name) < 1:
                raise AmreproError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if not (math.isfinite(self.pez_lr) and 0 < self.pez_lr < LR_MAX):
            raise AmreproError(f"--pez-lr must be a positive finite number below {LR_MAX:g}, got {self.pez_lr}.")
        if self.controls < 0:  # the upper bound (the site's width) is checked once the model is loaded
            raise AmreproError(f"--controls must be non-negative, got {self.controls}.")
        return self

    def to_params(self) -> dict[str, str]:
        """Every field as MLflow params (strings), plus the resolved target name."""
        params = {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return params | {"target_name": self.target_name}

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "Config":
        """Inverse of to_params: rebuild the Config a run was made with (unknown keys are ignored)."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in params:
                if f.name in _ADDED_LATER:  # a run logged before the field existed ran with its default
                    continue
                raise AmreproError(f"the run has no '{f.name}' param: it was not made by amrepro run.")
            kind = type(f.default)
            if kind is bool:  # bool("False") is True: the spellings str() logs, and click's
                kwargs[f.name] = parse_bool(params[f.name])
                if kwargs[f.name] is None:
                    raise AmreproError(f"the run's param {f.name}={params[f.name]!r} is not true or false: it was "
                                       "edited or not made by amrepro run.")
                continue
            try:
                kwargs[f.name] = kind(_unquote(params[f.name]) if kind is str else params[f.name])
            except ValueError:
                raise AmreproError(f"the run's param {f.name}={params[f.name]!r} is not a valid "
                                   f"{kind.__name__}: it was edited or not made by amrepro run.") from None
        return cls(**kwargs)


# Fields added after the first release: runs logged before them are read with the field's default.
_ADDED_LATER = frozenset({"threads", "controls", "method", "steps", "epo_steps", "topk", "candidates",
                          "population", "pez_lr", "corpus_max_tokens", "figures"})


def parse_bool(value: str) -> bool | None:
    """A yes/no option or param as written (true/false, 1/0, yes/no, on/off, any case); None if it is none."""
    return {"true": True, "1": True, "yes": True, "on": True,
            "false": False, "0": False, "no": False, "off": False}.get(_unquote(value).strip().lower())


def _unquote(value: str) -> str:
    """`mlflow run` logs string parameters shell-quoted as it passed them (an empty target becomes "''")."""
    try:
        words = shlex.split(value)
    except ValueError:
        return value
    if not words:
        return ""
    return words[0] if len(words) == 1 and shlex.quote(words[0]) == value else value


def help_for(name: str) -> str:
    """The help text of a Config field, for the CLI: the field's own, plus what the method registry knows (the
    methods to choose from; which methods read an option that not all of them read)."""
    text = Config.__dataclass_fields__[name].metadata["help"]
    if name == "method":
        return text + " One of: " + "; ".join(f"{s.name} ({s.summary})" for s in specs().values()) + "."
    readers = [s.name for s in specs().values() if name in s.options]
    if readers and len(readers) < len(specs()):
        return f"{text} Read by --method {', '.join(readers)}."
    return text
