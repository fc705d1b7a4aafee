"""Features of a site's vector as targets: directions from .npy files, random directions, and SAE latents.

A feature target reads the site's vector s [..., width] through a `Readout`, one row of parameters per batch row:

    direction (a .npy file, or random:S[k]):  act = s . d / |d|              (normalized: unit direction)
    SAE latent i (SAELens's on-disk format):  pre = (s - b_dec) . W_enc[:, i] + b_enc[i]
                                              standard: relu(pre)    jumprelu: relu(pre) * (pre > threshold[i])
                                              topk: relu(pre), the value latent i takes whenever it is among the
                                              top k (a single latent's rank needs all d_sae pre-activations);
                                              with rescale_acts_by_decoder_norm, pre is scaled by |W_dec[i]|

Only W_enc[:, i], b_enc[i], b_dec and threshold[i] are read, never the [rows, pos, d_sae] activations. b_dec is
subtracted only when the SAE's cfg.json says apply_b_dec_to_input (SAELens's process_sae_in). The files are read
with json + safetensors, without importing SAELens.

Directions are unit vectors so that activations are comparable across directions (and with the random unit
directions that are their controls); the file's own norm is logged with the run (target_tags).
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .config import AmreproError
from .specificity import choose_controls
from .targets import Target

ARCHITECTURES = ("standard", "jumprelu", "topk")
_RANDOM_STREAM = 0xD1EC  # numpy stream of the random directions, apart from the controls' and sweeps' streams
# a target file up to this size is logged as an artifact with each target parent (a sweep of 64 latents logs 64
# copies); larger: its sha256 and path only. A direction is a few KiB; a real SAE is tens of MiB or more.
_ARTIFACT_MAX_BYTES = 2**20
CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"


# --- files ------------------------------------------------------------------------------------------------
def _stamp(files) -> tuple:  # the caches' key: a changed file is read again
    return tuple((os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in files)


def load_direction(path: str, width: int) -> np.ndarray:
    """The unit direction [width] (float64) of a .npy file, checked against the site's width."""
    if not os.path.isfile(path):
        raise AmreproError(f"direction file {path} does not exist.")
    try:
        d = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise AmreproError(f"direction file {path} is not a readable .npy array ({error}).") from None
    if d.dtype.kind not in "fiu" or d.shape != (width,):
        raise AmreproError(f"direction file {path} holds a {d.dtype} array of shape {d.shape}, but the site needs "
                           f"a float vector of shape ({width},).")
    d = d.astype(np.float64)
    norm = float(np.linalg.norm(d))
    if not np.isfinite(d).all() or norm == 0:
        raise AmreproError(f"direction file {path} has non-finite values or is all zeros: it gives no direction.")
    return d / norm


def random_direction(seed: int, block: int, site: str, k: int, width: int) -> np.ndarray:
    """The k-th random unit direction [width] of seed S at a site: Gaussian, normalized, reproducible."""
    rng = np.random.default_rng([seed, _RANDOM_STREAM, block, zlib.crc32(site.encode()), k])
    d = rng.standard_normal(width)
    return d / np.linalg.norm(d)


@dataclass(frozen=True)
class SAE:
    path: str
    architecture: str
    d_in: int
    d_sae: int
    apply_b_dec_to_input: bool
    hook_name: str | None
    rescale_by_decoder_norm: bool = False  # TopK's rescale_acts_by_decoder_norm: pre *= |W_dec[i]|

    def read(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """W [n, d_in] (= W_enc[:, indices].T), b [n], threshold [n] (jumprelu), b_dec [d_in], float32: only
        the columns asked for are read from the file."""
        with safe_open(os.path.join(self.path, WEIGHTS), framework="pt") as f:
            w_enc = f.get_slice("W_enc")  # [d_in, d_sae], read lazily
            out = {"W": torch.stack([w_enc[:, i:i + 1][:, 0] for i in indices]).float(),  # [n, d_in]
                   "b": f.get_tensor("b_enc")[indices].float(),  # [n]
                   "b_dec": f.get_tensor("b_dec").float()}  # [d_in]
            if self.architecture == "jumprelu":
                out["threshold"] = f.get_tensor("threshold")[indices].float()  # [n]
            if self.rescale_by_decoder_norm:  # SAELens: hidden_pre * |W_dec[i]|, i.e. W_enc[:, i] and b_enc[i] scaled
                w_dec = f.get_slice("W_dec")  # [d_sae, d_in]
                norm = torch.stack([w_dec[i:i + 1][0].float().norm() for i in indices])  # [n]
                out["W"], out["b"] = out["W"] * norm[:, None], out["b"] * norm
        if not all(torch.isfinite(v).all() for v in out.values()):
            raise AmreproError(f"the SAE in {self.path} has non-finite weights for latents {indices[:5]}.")
        return out


@lru_cache(maxsize=16)
def _load_sae(path: str, stamp: tuple) -> SAE:
    cfg_path, weights_path = os.path.join(path, CFG), os.path.join(path, WEIGHTS)
    if not (os.path.isfile(cfg_path) and os.path.isfile(weights_path)):
        raise AmreproError(f"SAE folder {path} needs {CFG} and {WEIGHTS} (SAELens's save format); "
                           f"{'it does not exist' if not os.path.isdir(path) else 'one of them is missing'}.")
    try:
        cfg = json.loads(Path(cfg_path).read_text())
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (ValueError, KeyError, TypeError) as error:
        raise AmreproError(f"{cfg_path} is not an SAELens cfg.json with integer d_in and d_sae ({error!r}).") from None
    arch = cfg.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise AmreproError(f"the SAE in {path} has architecture '{arch}'; amrepro reads {', '.join(ARCHITECTURES)}.")
    for key in ("normalize_activations", "reshape_activations"):
        if cfg.get(key, "none") not in ("none", None):
            raise AmreproError(f"the SAE in {path} has {key}='{cfg[key]}'; amrepro reads only SAEs with "
                               f"{key}='none' (fold the scaling into the weights first).")
    try:
        with safe_open(weights_path, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise AmreproError(f"{weights_path} is not a readable safetensors file ({error}).") from None
    need = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    if arch == "jumprelu":
        need["threshold"] = (d_sae,)
    for key, shape in need.items():
        if shapes.get(key) != shape:
            raise AmreproError(f"{weights_path} has {key} of shape {shapes.get(key, 'missing')}, but its cfg.json "
                               f"(d_in {d_in}, d_sae {d_sae}, {arch}) needs {shape}.")
    # SAELens 6 keeps the hook in "metadata" (6.0-6.12: "meta"); SAELens 3-5 at the top level
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    hook = cfg.get("hook_name") or meta.get("hook_name") or cfg.get("hook_point")
    return SAE(path, arch, d_in, d_sae, bool(cfg.get("apply_b_dec_to_input", True)), hook,
               arch == "topk" and bool(cfg.get("rescale_acts_by_decoder_norm", False)))


def load_sae(path: str) -> SAE:
    """The SAE's config, checked against its weights' shapes (cached while the files are unchanged)."""
    try:
        stamp = _stamp(os.path.join(path, f) for f in (CFG, WEIGHTS))
    except OSError:
        stamp = ()
    return _load_sae(path, stamp)


def sae_of(target: Target, width: int) -> SAE:
    """target's SAE, checked against the site (its width, its hook where cfg.json names one) and the latent."""
    sae, site = load_sae(target.source.removeprefix("sae:")), f"blocks.{target.block}.{target.site}"
    if sae.d_in != width:
        raise AmreproError(f"the SAE in {sae.path} reads vectors of width {sae.d_in}, but {site} has {width} "
                           "dimensions.")
    if sae.hook_name and sae.hook_name != site:
        raise AmreproError(f"the SAE in {sae.path} was trained on {sae.hook_name}, not on {site}: name that site.")
    if not 0 <= target.index < sae.d_sae:
        raise AmreproError(f"latent {target.index} is out of range for the SAE in {sae.path}, which has {sae.d_sae} "
                           f"latents (valid: 0..{sae.d_sae - 1}).")
    return sae


# --- the readout --------------------------------------------------------------------------------------------
@dataclass
class Readout:
    """Per-row parameters of a linear feature and its activation: act = f((s - b_dec) . W[r] + b[r])."""
    W: torch.Tensor  # [n, width]
    b: torch.Tensor  # [n]
    activation: str  # "linear", "standard", "jumprelu" or "topk"
    b_dec: torch.Tensor | None = None  # [width], subtracted from s first
    threshold: torch.Tensor | None = None  # [n], jumprelu

    def to(self, device: torch.device) -> "Readout":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Readout(move(self.W), move(self.b), self.activation, move(self.b_dec), move(self.threshold))

    def select(self, rows: torch.Tensor) -> "Readout":
        """The readout whose row j is row rows[j] of this one."""
        pick = lambda t: None if t is None else t[rows.to(t.device)]  # noqa: E731
        return Readout(self.W[rows.to(self.W.device)], pick(self.b), self.activation, self.b_dec, pick(self.threshold))

    def __call__(self, site: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """site [R, pos, width] -> act [R, pos]. rows: None (one parameter row, shared by every row) or the
        parameter row of each site row [R]."""
        ro = self if rows is None else self.select(rows)
        s = site if ro.b_dec is None else site - ro.b_dec  # [R, pos, width]
        if rows is None and ro.W.shape[0] == 1:
            pre = s @ ro.W[0] + ro.b[0]  # [R, pos]
        else:
            if ro.W.shape[0] != s.shape[0]:
                raise ValueError(f"this readout has {ro.W.shape[0]} rows, got {s.shape[0]}")
            pre = torch.einsum("rpw,rw->rp", s, ro.W) + ro.b[:, None]  # [R, pos]
        if ro.activation == "linear":
            return pre
        act = torch.relu(pre)
        if ro.activation == "jumprelu":  # SAELens: relu(pre) * (pre > threshold); no gradient below it
            act = act * (pre > ro.threshold[:, None]).to(act.dtype)  # threshold [R or 1, 1]
        return act


def readout(targets: list[Target], width: int) -> Readout:
    """The readout of one row per target (all of one SAE, or all directions), validated against the width."""
    kinds = {t.kind for t in targets}
    if kinds <= {"direction", "random"}:
        rows = [load_direction(t.source, width) if t.kind == "direction" else
                random_direction(int(t.source.split(":")[1]), t.block, t.site, t.index, width) for t in targets]
        W = torch.from_numpy(np.stack(rows)).float()  # [n, width]
        return Readout(W, torch.zeros(len(rows)), "linear")
    if kinds == {"sae"} and len({t.source for t in targets}) == 1:
        sae = [sae_of(t, width) for t in targets][0]  # each latent checked against d_sae
        unique = sorted({t.index for t in targets})
        read = sae.read(unique)
        at = torch.tensor([unique.index(t.index) for t in targets])  # [n]
        return Readout(read["W"][at], read["b"][at], sae.architecture,
                       read["b_dec"] if sae.apply_b_dec_to_input else None,
                       read["threshold"][at] if "threshold" in read else None)
    sources = ", ".join(sorted({t.source or t.name for t in targets}))
    raise AmreproError(f"one batch reads one SAE or directions only, got {sources}.")


# --- controls -----------------------------------------------------------------------------------------------
def controls(target: Target, k: int, seed: int, width: int) -> tuple[Target, ...]:
    """--controls K of a feature target: K other latents of the same SAE (drawn like a neuron's controls), or K
    random unit directions of the seed (random:SEED[0..K-1]) for a direction."""
    if target.kind == "sae":
        picked = choose_controls(target.index, sae_of(target, width).d_sae, k, seed, target.prefix)
        return tuple(Target(target.block, target.site, i, target.source) for i in picked)
    return tuple(Target(target.block, target.site, j, f"random:{seed}") for j in range(k))


# --- the target's file is part of the result -------------------------------------------------------------------
def _files(target: Target) -> list[str]:
    if target.kind == "sae":
        return [os.path.join(target.source.removeprefix("sae:"), f) for f in (CFG, WEIGHTS)]
    return [target.source] if target.kind == "direction" else []


@lru_cache(maxsize=64)
def _sha256(files: tuple[str, ...], stamp: tuple) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
    return digest.hexdigest()


def file_sha256(target: Target) -> str | None:
    """sha256 of the target's file (an SAE: of cfg.json and the weights, names included); None for a neuron."""
    files = tuple(_files(target))
    return _sha256(files, _stamp(files)) if files else None


def describe(target: Target) -> str:
    """One line that says what a feature target's activation is (its normalization, its SAE's activation)."""
    site = f"blocks.{target.block}.{target.site}"
    if target.kind == "direction":
        norm = float(np.linalg.norm(np.load(target.source, allow_pickle=False).astype(np.float64)))
        return f"{site} . d/|d| with d from {target.source} (|d| = {norm:.4g} in the file; normalized to 1)"
    if target.kind == "random":
        return f"{site} . d with d the random unit direction {target.index} of seed {target.source.split(':')[1]}"
    sae, i = load_sae(target.source.removeprefix("sae:")), target.index
    pre = ("(x - b_dec)" if sae.apply_b_dec_to_input else "x") + f" . W_enc[:, {i}] + b_enc[{i}]"
    act = {"standard": "relu(pre)", "jumprelu": f"relu(pre) * (pre > threshold[{i}])",
           "topk": "relu(pre), whether or not the latent is among the top k"
                   + (" (pre scaled by |W_dec[i]|)" if sae.rescale_by_decoder_norm else "")}[sae.architecture]
    return (f"latent {i} of the {sae.architecture} SAE in {sae.path} (d_sae {sae.d_sae}) on {site}: {act} with "
            f"pre = {pre}")


def target_tags(target: Target) -> dict[str, str]:
    """Tags of a feature target: what its activation is, and what pins its file (sha256 and absolute path; an
    SAE: of cfg.json and the weights). Nothing for a neuron."""
    if target.kind == "neuron":
        return {}
    try:  # `amrepro log` may log a saved outcome after the file moved: the run's tags then say so
        tags = {"target.description": describe(target)}
        sha = file_sha256(target)
    except OSError as error:
        return {"target.description": f"{target.name} (its file could not be read when logged: {error.strerror})"}
    if sha is not None:
        path = os.path.abspath(target.source.removeprefix("sae:"))
        tags.update({"target.file_sha256": sha, "target.file_path": path})
    return tags


def file_artifacts(target: Target) -> dict[str, bytes]:
    """The target's file(s) as artifacts under target_file/, when at most 1 MiB together; else nothing (the
    tags keep its sha256 and path)."""
    files = _files(target)
    if files and all(map(os.path.isfile, files)) and sum(map(os.path.getsize, files)) <= _ARTIFACT_MAX_BYTES:
        return {f"target_file/{os.path.basename(p)}": Path(p).read_bytes() for p in files}
    return {}


def check_unchanged(target: Target, tags: dict[str, str]) -> None:
    """Refuse to reproduce a run whose target file is not the one it ran with."""
    if (logged := tags.get("target.file_sha256")) is not None and (now := file_sha256(target)) != logged:
        raise AmreproError(f"the target's file {tags.get('target.file_path', target.source)} changed since the run "
                           f"(sha256 {logged[:12]}... then, {now[:12]}... now): restore it to reproduce the run.")
