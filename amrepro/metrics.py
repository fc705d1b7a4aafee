"""Reproducibility statistics on decoded token matrices: numpy only, no torch, no MLflow."""

from __future__ import annotations

import numpy as np


def unique_summary(ids: np.ndarray, tokens: list[list[str]]) -> dict:
    """The reference's statistic: how many of the runs x positions decoded tokens are distinct
    (numpy.unique, as the reference counts), and which tokens repeat, most frequent first."""
    ids = np.asarray(ids)
    unique, counts = np.unique(ids, return_counts=True)
    text = {int(i): t for row_ids, row in zip(ids, tokens) for i, t in zip(row_ids, row)}
    repeated = sorted(((int(c), int(i)) for i, c in zip(unique, counts) if c > 1), key=lambda p: (-p[0], p[1]))
    return {
        "n_unique_tokens": int(unique.size),
        "n_tokens_total": int(ids.size),
        "unique_fraction": float(unique.size / ids.size),
        "repeated": [{"id": i, "token": text[i], "count": c} for c, i in repeated],
        "unique": [{"id": int(i), "token": text[int(i)], "count": int(c)} for i, c in zip(unique, counts)],
    }
