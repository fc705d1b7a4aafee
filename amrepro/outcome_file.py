"""The computed results of one `amrepro run`, kept on disk from the moment the science is done until every run
is logged: a store that goes away, or a Ctrl-C while logging, then loses nothing (`amrepro log FILE`).

One .npz per parent run, ./amrepro-outcomes/<parent run id>.npz (folder: AMREPRO_OUTCOMES): the Outcome's
arrays, and as JSON the config, the parent's params and tags, the summary, the tokens, the divergences and
the pip freeze. Written to a temporary name and renamed, so a file that exists is complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import AmreproError, Config

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


def folder() -> Path:
    return Path(os.environ.get("AMREPRO_OUTCOMES", "amrepro-outcomes"))


def path_for(parent_id: str) -> Path:
    return folder() / f"{parent_id}.npz"


def save(outcome, parent_id: str, experiment_id: str, tracking_uri: str, params: dict, tags: dict,
         pip_freeze: bytes) -> Path:
    result = outcome.result
    arrays = {f"result.{f.name}": getattr(result, f.name).numpy() for f in dataclasses.fields(result)
              if f.name not in ("seeds", "ids", "history", "frontier")}
    if result.ids is not None:  # pez, gcg, epo: their real tokens
        arrays["result.ids"] = result.ids.numpy()
    arrays.update({f"history.{key}": values.numpy() for key, values in result.history.items()})
    arrays.update(ids=np.asarray(outcome.ids), cosine=np.asarray(outcome.cosine),
                  decoded_activation=np.asarray(outcome.decoded_activation))
    meta = {"format": FORMAT, "parent_id": parent_id, "experiment_id": experiment_id, "tracking_uri": tracking_uri,
            "config": outcome.config.to_params(), "target": outcome.target.name, "seeds": list(result.seeds), "frontier": result.frontier,
            "tokens": outcome.tokens, "summary": outcome.summary,
            "diverged": {str(r): why for r, why in outcome.diverged.items()},
            "params": params, "tags": tags, "pip_freeze": pip_freeze.decode(errors="replace")}
    arrays["meta.json"] = np.frombuffer(json.dumps(meta, ensure_ascii=False).encode(), dtype=np.uint8)
    path = path_for(parent_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)  # atomic: the file is either absent or complete
    return path


def load(path: str | Path) -> Saved:
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
    if meta.get("format") != FORMAT:
        raise AmreproError(f"{path} has outcome format {meta.get('format')}, this amrepro reads {FORMAT}.")
    tensors = {k.removeprefix("result."): torch.from_numpy(v) for k, v in arrays.items() if k.startswith("result.")}
    history = {k.removeprefix("history."): torch.from_numpy(v) for k, v in arrays.items() if k.startswith("history.")}
    result = Result(seeds=meta["seeds"], **tensors, history=history, frontier=meta.get("frontier"))
    config = Config.from_params(meta["config"])
    outcome = Outcome(config, Target.parse(meta["target"]), result, arrays["ids"], meta["tokens"], arrays["cosine"],
                      arrays["decoded_activation"], meta["summary"],
                      {int(r): why for r, why in meta["diverged"].items()},
                      # --controls: the specificity lives in the summary; None when it was not computed
                      meta["summary"].get("specificity") if "metrics" in meta["summary"].get("specificity", {}) else None)
    return Saved(outcome, meta["parent_id"], meta["experiment_id"], meta["tracking_uri"], meta["params"],
                 meta["tags"], meta["pip_freeze"].encode())
