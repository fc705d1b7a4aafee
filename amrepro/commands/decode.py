"""`amrepro decode RUN_ID`: re-derive a run's tokens from its logged final embeddings (no optimization)."""

from __future__ import annotations

import numpy as np

from .. import report
from ..config import Config
from ..context import read_family
from ..layout import FINAL, SEED, TOKENS


def decode(run_id: str) -> bool:
    """The tokens of a child run (or every child of a parent) from its final embeddings; True when they equal
    the logged tokens.json."""
    reader, parent, selected = read_family(run_id)  # a bad id is answered before torch is imported
    import torch

    from ..decode import nearest_tokens
    from ..model import load_model

    config = Config.from_params(parent.params)
    finals = np.stack([reader.npy(c, FINAL) for c in selected])  # [runs, pos, d_model]
    logged = [reader.json(c, TOKENS)["ids"] for c in selected]
    lm = load_model(config.model, torch.device("cpu"), note=report.note)  # nearest-token search needs no accelerator
    ids, _ = nearest_tokens(torch.from_numpy(finals), lm.embedding)
    rows = [(c.params[SEED], lm.token_strings(row), row == want) for c, row, want in zip(selected, ids.tolist(), logged)]
    report.print_decoded(run_id, rows)
    return all(match for _, _, match in rows)
