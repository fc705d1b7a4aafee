"""`amrepro decode RUN_ID`: re-derive a run's tokens from its logged final embeddings (no optimization)."""

from __future__ import annotations

import numpy as np

from .. import report
from ..config import Config
from ..context import read_seeds


def decode(run_id: str) -> bool:
    """True when the tokens of a child run (or of every child of a parent) equal the logged tokens.json."""
    parent, seeds = read_seeds(run_id)  # either layout; a bad id is answered before torch is imported
    import torch

    from ..decode import nearest_tokens
    from ..model import load_model

    config = Config.from_params(parent.params)
    finals = np.stack([s.final for s in seeds])  # [runs, pos, d_model]
    lm = load_model(config.model, torch.device("cpu"), note=report.note)  # nearest-token search needs no accelerator
    ids, _ = nearest_tokens(torch.from_numpy(finals), lm.embedding)
    rows = [(str(s.seed), lm.token_strings(row), row == s.ids) for s, row in zip(seeds, ids.tolist())]
    report.print_decoded(run_id, rows)
    return all(match for _, _, match in rows)
