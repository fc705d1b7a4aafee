"""Optimization methods, one file each, one shape: method(problem, on_step) -> optimize.Result.

Each method file declares `SPEC = Spec(...)`. This registry reads those declarations from the files' source
(`ast`), without importing them (they import torch, and `amrepro --help` must not), for the CLI, Config.validate,
compare, the report and the generated MLproject: a new method is one new file here (plus its tests).

- adam.py: the reference. Continuous vectors, Adam, decoded to their nearest tokens afterwards (unchanged).
- pez.py: continuous vectors whose forward runs on their nearest tokens (Wen et al. 2023, "Hard prompts made easy").
- gcg.py: token swaps ranked by the one-hot gradient, a batch of one-swap candidates per step (Zou et al. 2023).
- epo.py: gcg with a population trading activation against fluency (Thompson et al. 2024, `dreamy`).

pez, gcg and epo end in real tokens: Result.ids holds them and their target activation IS the score. Every
random choice draws from the row's own generator, seeded by the row's seed, so `amrepro reproduce` is
bit-identical. candidates.py scores token sequences forward-only; tokens.py holds what the token methods share;
problem.py what a method is handed and what the experiment asks of it once the model is loaded. This registry
imports nothing of amrepro but errors.py: Config reads it, and the method files import Config.

The null of each method is its own start distribution, decoded as its results are (nulls.py): "vectors" starts
are N(0, std(E)) vectors decoded to their nearest tokens; "tokens" starts are uniform random tokens, which
decode to themselves.
"""

from __future__ import annotations

import ast
import functools
import importlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import AmreproError

# start distribution -> what the verdict and the report call the method's primary null (its own starts, decoded)
START_NULLS = {"vectors": "decoded random starts", "tokens": "random start tokens"}
NEEDS = {"lm_head"}  # what a method may need beyond the site reader (epo: the LM head, for its fluency term)


@dataclass(frozen=True)
class Spec:
    """A method's declaration, in literals only (the registry reads it without importing the file).

    name: --method NAME, the file amrepro/methods/NAME.py, whose `run(problem, on_step)` does the work.
    budget: the Config field that counts its steps. options: every Config field its run reads but SHARED.
    start: a key of START_NULLS. needs: from NEEDS, checked once the model is loaded, before any MLflow run.
    """
    name: str
    summary: str
    budget: str
    options: tuple[str, ...]
    start: str
    needs: tuple[str, ...] = ()

    @property
    def unit(self) -> str:
        """What its budget counts, for "10 seeds x 500 epochs" / "x 60 gcg steps"."""
        return "epochs" if self.budget == "epochs" else f"{self.name} steps"


SHARED = ("n_tokens",)  # Config fields every method reads (its seeds come with the Problem, one per row)


@functools.cache
def specs() -> dict[str, Spec]:
    """{name: Spec} of every method file in this folder (a file without a SPEC is a helper), sorted by name."""
    found = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["SPEC"]:
                spec = Spec(**{k.arg: ast.literal_eval(k.value) for k in node.value.keywords})
                assert spec.name == path.stem and spec.start in START_NULLS and set(spec.needs) <= NEEDS, spec
                found[spec.name] = spec
    return found


def names() -> list[str]:
    return list(specs())


def spec(name: str) -> Spec:
    """The Spec of --method NAME; an unknown name is the user's error, in one sentence."""
    if name not in specs():
        raise AmreproError(f"--method must be one of {', '.join(specs())}, got {name!r}.")
    return specs()[name]


def get(name: str):
    """The method function of --method NAME, imported on first use."""
    return importlib.import_module(f"{__name__}.{spec(name).name}").run


def start_name(method: str) -> str:
    """What the verdict calls the method's primary null: its own starts, decoded as its results are."""
    return START_NULLS[spec(method).start]
