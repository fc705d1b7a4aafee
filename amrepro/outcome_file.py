"""The computed results of one `amrepro run`, kept on disk from the moment the science is done until every run
is logged: a store that goes away, or a Ctrl-C while logging, then loses nothing (`amrepro log FILE`).

One .npz per parent run, ./amrepro-outcomes/<parent run id>.npz (folder: AMREPRO_OUTCOMES): the Outcome's
arrays, and as JSON the config, the parent's params and tags, the summary, the tokens, the divergences and
the pip freeze. Written to a temporary name and renamed, so a file that exists is complete; mode 0600, and the
tracking URI without its password (`amrepro log` takes the credentials from the environment).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import AmreproError, Config
from .secrets import redact

FORMAT = 1


@dataclass
class Saved:
    outcome: object  # experiment.Outcome
    parent_id: str
    experiment_id: str
    tracking_uri: str
    params: dict[str, str]
    tags: dict[str, str]
    pip_freeze: bytes
    experiment_name: str | None = None  # None in files written before it was recorded


def path_for(parent_id: str) -> Path:
    return Path(os.environ.get("AMREPRO_OUTCOMES", "amrepro-outcomes")) / f"{parent_id}.npz"


def save(outcome, parent_id: str, experiment_id: str, tracking_uri: str, params: dict, tags: dict,
         pip_freeze: bytes, experiment_name: str | None = None) -> Path:
    result = outcome.result
    arrays = {f"result.{f.name}": getattr(result, f.name).numpy() for f in dataclasses.fields(result)
              if f.name not in ("seeds", "history", "frontier", "positions")
              and getattr(result, f.name) is not None}  # ids: the real tokens of pez, gcg, epo only
    arrays.update({f"history.{key}": values.numpy() for key, values in result.history.items()})
    arrays.update({f"positions.{key}": values.numpy() for key, values in result.positions.items()})
    arrays.update(ids=np.asarray(outcome.ids), cosine=np.asarray(outcome.cosine),
                  decoded_activation=np.asarray(outcome.decoded_activation))
    meta = {"format": FORMAT, "parent_id": parent_id, "experiment_id": experiment_id,
            "experiment_name": experiment_name, "tracking_uri": redact(tracking_uri, mask=""),
            "config": outcome.config.to_params(), "target": outcome.target.name, "seeds": list(result.seeds), "frontier": result.frontier,
            "tokens": outcome.tokens, "summary": outcome.summary,
            "diverged": {str(r): why for r, why in outcome.diverged.items()},
            "params": params, "tags": tags, "pip_freeze": pip_freeze.decode(errors="replace")}
    arrays["meta.json"] = np.frombuffer(json.dumps(meta, ensure_ascii=False).encode(), dtype=np.uint8)
    path = path_for(parent_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    # 0600: the file holds the run's parameters, tags and environment, readable by its owner alone
    try:
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(descriptor, 0o600)  # a leftover .partial of another mode keeps its mode through O_CREAT
        with open(descriptor, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)  # atomic: the file is either absent or complete
    except BaseException:  # a full disk, a Ctrl-C: no half-written .partial is left behind
        partial.unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path) -> Saved:
    """The saved outcome, checked whole before anything is logged from it: a file that is truncated, crafted or
    inconsistent is one sentence (AmreproError, exit 2), never a half-logged parent."""
    import torch

    from .experiment import Outcome
    from .optimize import Result
    from .targets import Target

    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(arrays.pop("meta.json").tobytes().decode())
    except FileNotFoundError:
        raise AmreproError(f"{path} does not exist.") from None
    except Exception as error:  # noqa: BLE001 - truncated, not an npz, no meta
        raise AmreproError(f"{path} is not an amrepro outcome file ({type(error).__name__}).") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AmreproError(f"{path} has outcome format {meta.get('format') if isinstance(meta, dict) else None}, "
                           f"this amrepro reads {FORMAT}.")
    try:
        config = Config.from_params(meta["config"]) if isinstance(meta.get("config"), dict) else None
        target = Target.parse(meta["target"]) if isinstance(meta.get("target"), str) else None
    except AmreproError as error:
        raise AmreproError(f"{path} is not a valid amrepro outcome file: {error}") from None
    if problem := _problem(meta, arrays, config, target):
        raise AmreproError(f"{path} is not a valid amrepro outcome file: {problem}; nothing was logged.")
    def tensors(prefix: str) -> dict:
        return {k.removeprefix(prefix): torch.from_numpy(v) for k, v in arrays.items() if k.startswith(prefix)}

    result = Result(seeds=meta["seeds"], **tensors("result."), history=tensors("history."),
                    frontier=meta.get("frontier"), positions=tensors("positions."))
    outcome = Outcome(config, target, result, arrays["ids"], meta["tokens"], arrays["cosine"],
                      arrays["decoded_activation"], meta["summary"],
                      {int(r): why for r, why in meta["diverged"].items()},
                      # --controls: the specificity lives in the summary; None when it was not computed
                      meta["summary"].get("specificity") if "metrics" in meta["summary"].get("specificity", {}) else None)
    return Saved(outcome, meta["parent_id"], meta["experiment_id"], meta["tracking_uri"], meta["params"],
                 meta["tags"], meta["pip_freeze"].encode(), meta.get("experiment_name"))


# meta.json's fields and their JSON types; "frontier" (epo) and "experiment_name" are absent from files written
# before they existed
_META = {"format": int, "parent_id": str, "experiment_id": str, "tracking_uri": str, "config": dict, "target": str,
         "seeds": list, "tokens": list, "summary": dict, "diverged": dict, "params": dict, "tags": dict,
         "pip_freeze": str}
_OPTIONAL_META = {"frontier": (list, type(None)), "experiment_name": (str, type(None))}
# the arrays: name -> its shape in terms of runs (R), positions (P), d_model (D), epochs/steps (E)
_ARRAYS = {"result.initial": "RPD", "result.final": "RPD", "result.loss": "ER", "result.activation": "ER",
           "result.final_activation": "R", "result.diverged_at": "R", "ids": "RP", "cosine": "RP",
           "decoded_activation": "R"}
# pez, gcg, epo: their real tokens; the activation at each position (the dashboard's colours; absent from files
# written before it existed)
_OPTIONAL_ARRAYS = {"result.ids": "RP", "positions.tokens": "RP", "positions.final": "RP"}


def _problem(meta: dict, arrays: dict, config, target) -> str | None:
    """What is wrong with a loaded outcome file (a missing, mistyped or inconsistent field), in a phrase; or None."""
    missing = [k for k in _META if k not in meta]
    extra = [k for k in meta if k not in _META and k not in _OPTIONAL_META]
    if missing or extra:
        return (f"meta.json lacks {', '.join(missing)}" if missing else f"meta.json has unknown fields {', '.join(extra)}")
    wrong = [k for k, kind in {**_META, **_OPTIONAL_META}.items() if k in meta and not isinstance(meta[k], kind)]
    wrong += [k for k in ("params", "tags") if k not in wrong and not all(isinstance(v, str) for v in meta[k].values())]
    if wrong:
        return f"meta.json's {', '.join(wrong)} {'has' if len(wrong) == 1 else 'have'} the wrong type"
    if config is None or target is None:
        return "meta.json's config or target cannot be read"
    runs = len(meta["seeds"])
    if runs != config.runs or not all(isinstance(s, int) for s in meta["seeds"]):
        return f"it holds {runs} seeds for a config of {config.runs} runs"
    missing = [k for k in _ARRAYS if k not in arrays]
    extra = [k for k in arrays if k not in _ARRAYS and k not in _OPTIONAL_ARRAYS and not k.startswith("history.")]
    if missing or extra:
        return f"it lacks the arrays {', '.join(missing)}" if missing else f"it has unknown arrays {', '.join(extra)}"
    sizes: dict[str, int] = {"R": runs}
    for name, dims in {**_ARRAYS, **_OPTIONAL_ARRAYS, **{k: "ER" for k in arrays if k.startswith("history.")}}.items():
        if name not in arrays:
            continue
        array = arrays[name]
        if array.dtype.kind not in "biuf" or array.ndim != len(dims) or any(
                sizes.setdefault(d, n) != n for d, n in zip(dims, array.shape) if d != "E"):
            return f"the array {name} has shape {tuple(array.shape)} ({array.dtype}), which disagrees with {runs} runs"
    if len(meta["tokens"]) != runs or not all(isinstance(row, list) and len(row) == sizes["P"]
                                              and all(isinstance(t, str) for t in row) for row in meta["tokens"]):
        return f"its tokens are not {runs} rows of {sizes['P']} strings"
    if not all(k.isdigit() and int(k) < runs and isinstance(v, str) for k, v in meta["diverged"].items()):
        return f"its diverged runs are not run indices below {runs}"
    summary, stats = meta["summary"], meta["summary"].get("statistics", False)
    if "n_runs_ok" not in summary or not (stats is None or isinstance(stats, dict) and isinstance(
            stats.get("metrics"), dict) and isinstance(stats.get("verdict"), str) and isinstance(
            stats.get("nulls", {}).get("decoded_starts", {}), (dict, type(None)))):
        return "its summary lacks the run count or has malformed statistics"
    return None
