"""Optimization methods, one file each, one shape: method(problem, on_step) -> optimize.Result.

Each method file declares `SPEC = Spec(...)`: its name, the Config fields it reads, its budget field, its start
distribution and what it needs from the model. This registry reads those declarations and is what the CLI
(--method, compare --methods and their help), Config.validate, compare, the report and the generated MLproject
consult, so a new method is one new file here (plus its tests). The declarations are read from the files' source
(`ast`), not imported: the methods import torch, and `amrepro --help` must not.

- adam.py: the reference. Continuous vectors, Adam, decoded to their nearest tokens afterwards (unchanged).
- pez.py: continuous vectors whose forward runs on their nearest tokens (Wen et al. 2023, "Hard prompts made easy").
- gcg.py: token swaps ranked by the one-hot gradient, a batch of one-swap candidates per step (Zou et al. 2023).
- epo.py: gcg with a population trading activation against fluency (Thompson et al. 2024, `dreamy`).

pez, gcg and epo end in real tokens: Result.ids holds them and their target activation IS the score. Every
random choice (start, candidate sampling) draws from the row's own generator, seeded by the row's seed, so a
run depends on its seed alone and `amrepro reproduce` is bit-identical. candidates.py is the one place that
evaluates token sequences forward-only through the stop-at-block reader; tokens.py holds what the token methods
share; problem.py what a method is handed (Problem) and what the experiment asks of it once the model is loaded.
This registry imports no method file (Spec.run imports one when it is run) and nothing of amrepro but errors.py:
Config reads it, and the method files import Config.

The null of each method is its own start distribution, decoded as its results are (nulls.py): "vectors" starts
are N(0, std(E)) vectors decoded to their nearest tokens; "tokens" starts are drawn uniformly from the
vocabulary and "decode" to themselves, so their chance level is uniform random tokens.
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
    """A method's declaration, written with literals only (the registry reads it without importing the file).

    name: --method NAME, the file amrepro/methods/NAME.py, whose `run(problem, on_step)` does the work.
    summary: one phrase for --help.
    budget: the Config field that counts its steps (epochs, steps, epo_steps).
    options: every Config field its run reads besides the shared ones (SHARED).
    start: its start distribution, a key of START_NULLS; it names the primary null.
    needs: from NEEDS, checked once the model is loaded, before any MLflow run exists.
    """
    name: str
    summary: str
    budget: str
    options: tuple[str, ...]
    start: str
    needs: tuple[str, ...] = ()

    @property
    def run(self):
        """The method function, imported on first use."""
        return importlib.import_module(f"{__name__}.{self.name}").run

    @property
    def null_name(self) -> str:
        return START_NULLS[self.start]

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
    """The method function of --method NAME."""
    return spec(name).run


def start_name(method: str) -> str:
    """What the verdict calls the method's primary null: its own starts, decoded as its results are."""
    return spec(method).null_name
