"""Site readers: callables x [runs, pos, d_model] -> target activation [runs, pos] that compute only the
blocks the target needs. Used as context managers, so no hook outlives a run.

- HookedReader works on any HF transformer that takes `inputs_embeds`: a hook captures the site and
  stops the forward right there (TransformerLens' stop_at_layer, done with an exception).
- GPT2Reader (gpt2.py) is the fast path for GPT-2: a functional forward on the same weights that also skips
  the part of the last block the target does not read. Tests pin it to HookedReader and to HF hidden_states.
- FeatureReader reads a feature of the site (a direction, an SAE latent: features.py) through HookedReader's
  whole site.

An optional per-row `index` [rows] makes row r read index[r] of the target's site and block, so one batch
optimizes several targets of a site (--controls; tests/test_controls.py pins each row to a reader of that index
alone). FeatureReader's per-row targets are Targets, and its `index` each row's row of its Readout, so that
methods can select rows for their candidates (FeatureReader.select).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import AmreproError
from .model import LoadedModel
from .targets import Target, check_target, site_location


class _StopForward(Exception):
    """Raised by the capture hook: everything after the site is unused compute."""


def site_hook(module, kind: str, capture):
    """Register capture(tensor) on a site: on the module's input ("input": its first argument or hidden_states)
    or on its output. Returns the hook's handle; the caller removes it (readers do so in __exit__)."""
    if kind == "input":
        return module.register_forward_pre_hook(
            lambda module, args, kwargs: capture(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    return module.register_forward_hook(lambda module, args, out: capture(out))


class HookedReader:
    def __init__(self, lm: LoadedModel, target: Target, index: torch.Tensor | Sequence[int] | None = None):
        self.lm, self.target = lm, target
        self.index = None if index is None else torch.as_tensor(index, dtype=torch.long, device=lm.device)  # [rows]
        path, self.kind = site_location(lm.model_type, target.site, lm.model.config)
        if not 0 <= target.block < lm.n_layers:
            check_target(target, lm.n_layers, width=target.index + 1)
        block = lm.blocks[target.block]
        self.module = block.get_submodule(path) if path else block
        self._handle = self._site = None
        self._reading = False

    def _capture(self, tensor) -> None:
        # Only this reader's own forward stops here. Any other forward of the model while the hook is installed
        # (another reader's, or a plain model call) passes through: otherwise it would be cut short at this
        # site, and the other reader would catch our stop and return nothing.
        if not self._reading:
            return
        self._site = tensor[0] if isinstance(tensor, (tuple, list)) else tensor
        raise _StopForward

    def __enter__(self) -> "HookedReader":
        if self._handle is not None:  # a second hook would replace the first's handle: that hook would leak
            raise RuntimeError("this reader is already in use: leave its `with` block before entering it again")
        self._handle = site_hook(self.module, self.kind, self._capture)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = self._site = None

    def read_site(self, x: torch.Tensor) -> torch.Tensor:
        """The whole site tensor [runs, pos, width] for inputs x [runs, pos, d_model]."""
        if self._handle is None:
            raise RuntimeError("use the reader inside a `with` block")
        self._reading = True
        try:
            self.lm.model(inputs_embeds=x)
        except _StopForward:
            pass
        else:
            raise RuntimeError(f"the forward never reached {self.target.name}")
        finally:
            self._reading = False
        site, self._site = self._site, None
        return site

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        site = self.read_site(x)  # [runs, pos, width]
        if self.index is None:
            return site[..., self.target.index]  # [runs, pos]
        if self.index.shape != site.shape[:1]:
            raise ValueError(f"this reader reads {self.index.shape[0]} per-row indices, got {site.shape[0]} rows")
        return site.gather(-1, self.index.view(-1, 1, 1).expand(*site.shape[:2], 1)).squeeze(-1)  # [runs, pos]


class FeatureReader(HookedReader):
    """x [runs, pos, d_model] -> the feature's activation [runs, pos] (features.Readout of the site's vector)."""

    def __init__(self, lm: LoadedModel, target: Target, readout, per_row: bool):
        super().__init__(lm, target)
        self.readout = readout.to(lm.device)
        # per-row: row r reads readout row r (the methods repeat or slice these for their candidates)
        self.index = torch.arange(readout.W.shape[0], device=lm.device) if per_row else None  # [rows] or None

    def select(self, rows: torch.Tensor) -> "FeatureReader":
        """A reader whose row j reads this reader's row rows[j] (rows [n])."""
        return FeatureReader(self.lm, self.target, self.readout.select(rows), per_row=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.read_site(x), self.index)  # [runs, pos, width] -> [runs, pos]


def site_width(lm: LoadedModel, target: Target) -> int:
    """How many dimensions the target's site has (d_model, d_mlp, ...): one tiny forward, any architecture."""
    with HookedReader(lm, target) as probe:
        return probe.read_site(torch.zeros(1, 1, lm.d_model, device=lm.device)).shape[-1]


def site_reader(lm: LoadedModel, target: Target, index: torch.Tensor | Sequence[int] | None = None,
                width: int | None = None):
    """The fastest reader for this model and target, validated against the model. index: per-row indices [rows]
    of the same site and block (module docstring), or per-row Targets; width: the site's, when already probed."""
    width = width or site_width(lm, target)
    check_target(target, lm.n_layers, width)
    rows = list(index) if index is not None and len(index) and isinstance(index[0], Target) else None
    if target.source or (rows and any(t.source for t in rows)):
        from .features import readout

        return FeatureReader(lm, target, readout(rows or [target], width), per_row=rows is not None)
    if index is not None:
        index = torch.as_tensor([t.index for t in rows] if rows else index, dtype=torch.long)
        for i in index.unique().tolist():
            check_target(Target(target.block, target.site, i), lm.n_layers, width)
    from .gpt2 import GPT2Reader

    if GPT2Reader.supports(lm):
        return GPT2Reader(lm, target, index)
    return HookedReader(lm, target, index)


def check_positions(lm: LoadedModel, n_tokens: int) -> None:
    config = lm.model.config
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_pos is not None and n_tokens > max_pos:
        raise AmreproError(f"--n-tokens {n_tokens} exceeds the model's {max_pos} positions.")
