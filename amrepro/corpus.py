"""Real text as the yardstick: the target's activation over every n_tokens window of a corpus (any UTF-8 text),
forward-only through the stop-at-block reader, in batches. Its maximum and 99th percentile say how far the
optimized tokens go beyond what text reaches; its top windows are the max-activating examples interpretability
users know from Neuronpedia.

A window is scored exactly as an optimized sequence is: its n_tokens tokens alone, from position 0 (no BOS,
no preceding context), mean activation over its positions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import AmreproError
from .model import LoadedModel
from .readers import site_reader
from .targets import Target

BATCH = 512  # windows per forward
TOP = 20  # top windows kept for the artifact


def read(path: str) -> str:
    """The corpus text; one sentence for a file that is missing or not UTF-8."""
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AmreproError(f"--corpus {path}: no such file.") from None
    except UnicodeDecodeError as error:
        raise AmreproError(f"--corpus {path} is not UTF-8 text (byte {error.start} cannot be decoded).") from None
    except OSError as error:
        raise AmreproError(f"--corpus {path} cannot be read: {error.strerror}.") from None


def windows(lm: LoadedModel, text: str, n_tokens: int) -> torch.Tensor:
    """Every window of n_tokens consecutive tokens of the text, stride 1: [n_windows, n_tokens]."""
    ids = torch.tensor(lm.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)  # [n]
    if ids.numel() < n_tokens:
        raise AmreproError(f"the corpus has {ids.numel()} tokens, fewer than --n-tokens {n_tokens}.")
    return ids.unfold(0, n_tokens, 1)  # [n - n_tokens + 1, n_tokens]


@torch.no_grad()
def activations(lm: LoadedModel, target: Target, ids: torch.Tensor, batch: int = BATCH) -> torch.Tensor:
    """Mean target activation [n_windows] of each window ids [n_windows, n_tokens]."""
    E, out = lm.embedding, []
    with site_reader(lm, target) as reader:
        for lo in range(0, ids.shape[0], batch):
            out.append(reader(E[ids[lo:lo + batch].to(E.device)]).mean(dim=1).cpu())  # [batch]
    return torch.cat(out)


def yardstick(lm: LoadedModel, target: Target, ids: torch.Tensor, top: int = TOP) -> dict:
    """{n_windows, max, p99, mean, top: [{rank, start, text, tokens, activation}]} of the corpus windows
    ids [W, pos] (windows())."""
    n_tokens = ids.shape[1]
    acts = activations(lm, target, ids).numpy().astype(np.float64)  # [W]
    order = np.argsort(-acts, kind="stable")[:top]
    return {"n_windows": int(acts.size), "n_tokens": n_tokens, "max": float(acts.max()),
            "p99": float(np.percentile(acts, 99)), "mean": float(acts.mean()),
            "top": [{"rank": k + 1, "start": int(w), "text": lm.tokenizer.decode(ids[w].tolist()),
                     "tokens": lm.token_strings(ids[w].tolist()), "activation": float(acts[w])}
                    for k, w in enumerate(order)]}
