"""What a target parent logs as metrics (issue 20): a dozen headline figures, rounded for the eye, and how its
statistics are read back. Every statistic stays in summary.json (statistics.metrics, exact, under the same names);
the ones the sweep table reads are also one exact JSON tag, which comes back with every run search. Each seed's
per-epoch curves go on the parent too (chart_curves), the charts MLflow's chart view shows first.
"""

from __future__ import annotations

import json

import numpy as np

from . import report
from .stats import CLAIMS, PRIMARY, REGISTRY

TABLE_ROW_TAG = "amrepro.table_row"  # on target parents: the statistics the sweep table reads, exact, as JSON

# A target parent's metrics: these headline figures only, so that MLflow's chart view opens on a dozen charts and the
# seeds' curves, not on 80 one-bar charts (issue 20). Why each (docs/mlflow.md#the-parents-metrics-and-charts):
HEADLINE_METRICS = (
    "stats/n_unique_tokens", "stats/n_tokens_total",  # the reference's result, "48/50 unique"
    "null/decoded_starts/unique_mean", "pvalue/unique_decoded_starts",  # ... with its chance level and p-value
    # the repeats across runs (seeds agreeing on a token) decide "below chance": the count, its chance, its p
    "stats/cross_run_repeats", "null/decoded_starts/cross_run_repeats_mean", "pvalue/cross_run_repeats_decoded_starts",
    "stats/decoded_activation_max", "stats/decoded_activation_mean",  # how high the real tokens drive the target
    "runs/ok", "runs/diverged",  # how many seeds the statistics rest on
    "pvalue/specificity_jaccard", "pvalue/specificity_cosine",  # --controls only: is the result the target's own
)
MAX_POINTS = 50  # epochs kept per chart curve: a chart of 50 points reads like one of 500
ROW_BUDGET = 1000  # metric rows per target parent (either layout)
SHOWN_DIGITS = 4  # significant digits of a logged metric that is not a whole number (exact: summary.json)


def _table_columns() -> dict[str, str]:
    """sweep_table.json's columns -> the parent metric each reads: every statistic of the registry with its
    p-value under the primary null, the activations, and every verdict flag."""
    columns = {"n_tokens_total": "stats/n_tokens_total"}
    for stat in REGISTRY:
        columns[stat.sweep_column or stat.column] = stat.metric
        columns[stat.p_column] = stat.pvalue_metric(PRIMARY)
    return {**columns, "final_activation": "stats/final_activation_mean",
            "decoded_activation": "stats/decoded_activation_mean", "projection_gap": "stats/projection_gap_mean",
            **{stat.claim: f"verdict/{stat.claim}" for stat in CLAIMS}}


TABLE_COLUMNS = _table_columns()  # a test checks that a parent's amrepro.table_row tag has every metric named here


def shown(value: float) -> float:
    """A metric as MLflow shows it: whole numbers (counts) exact, others to SHOWN_DIGITS significant digits, so
    that the UI shows 0.0004998, not 0.000499750124937531 (the exact value stays in summary.json)."""
    value = float(value)
    return value if not np.isfinite(value) or value.is_integer() else float(f"{value:.{SHOWN_DIGITS}g}")


def metric_rows(outcome, room: int) -> list[tuple[str, float, int]]:
    """A parent's metrics, within `room` rows: the HEADLINE_METRICS the outcome has (a single run has no pairwise
    statistic; an all-diverged outcome has only runs/*) at step 0, rounded by shown(), then chart_curves."""
    s = outcome.summary
    every = {"runs/diverged": len(outcome.diverged), "runs/ok": s["n_runs_ok"]}
    if s["statistics"] is not None:
        every.update(s["statistics"]["metrics"])
        every.update((outcome.specificity or {}).get("metrics", {}))
    headline = [(k, shown(every[k]), 0) for k in HEADLINE_METRICS if k in every]
    return headline + chart_curves(outcome.result, room - len(headline))


def table_row(outcome) -> dict[str, str]:
    """The TABLE_ROW_TAG of a parent: the statistics the sweep table reads (TABLE_COLUMNS), exact, as JSON (about
    900 characters, within MLflow's 5000 per tag). A tag comes back with every run search, so the sweep's table
    costs no download per target; {} without statistics."""
    stats = outcome.summary["statistics"]
    if stats is None:
        return {}
    row = {key: stats["metrics"][key] for key in TABLE_COLUMNS.values() if key in stats["metrics"]}
    return {TABLE_ROW_TAG: json.dumps(row)}


def read(run) -> dict[str, float]:
    """The statistics of a target parent by metric name: its metrics, and the exact values of its TABLE_ROW_TAG.
    A parent logged before HEADLINE_METRICS has no such tag and every statistic as a metric: read as before."""
    figures = dict(run.metrics)
    try:
        figures.update(json.loads(run.tags.get(TABLE_ROW_TAG, "{}")))
    except ValueError:  # edited by hand: the headline metrics are still the run's own
        report.errors.print(f"warning: the tag {TABLE_ROW_TAG} of run {run.id} is not JSON; its sweep table row "
                            "shows its metrics only.", soft_wrap=True, markup=False)
    return figures


def curve_steps(epochs: int, points: int) -> np.ndarray:
    """At most `points` epochs, evenly spread, the first and the last always kept (the final value is exact)."""
    return np.unique(np.round(np.linspace(0, epochs - 1, min(points, epochs))).astype(int))


def chart_curves(result, room: int) -> list[tuple[str, float, int]]:
    """(key, value, epoch) rows of the per-epoch histories, within `room` rows: per seed `<key>/seed-<seed>` with
    up to MAX_POINTS epochs each; when even 2 points per seed do not fit (hundreds of seeds), one mean curve per key
    instead. A diverged seed's curve stops before its divergence. Values rounded by shown(): a chart, not a record."""
    histories = {"loss/total": result.loss.numpy(), "act/target": result.activation.numpy(),
                 **{k: v.numpy() for k, v in result.history.items()}}  # each [epochs, runs]
    points = min(MAX_POINTS, room // max(1, len(result.seeds) * len(histories)))
    rows: list[tuple[str, float, int]] = []
    if points >= 2:
        for key, values in histories.items():
            steps = curve_steps(values.shape[0], points)
            for r, seed in enumerate(result.seeds):
                stop = int(result.diverged_at[r])
                kept = steps[steps < stop] if stop >= 0 else steps
                rows += [(f"{key}/seed-{seed}", shown(values[e, r]), int(e)) for e in kept
                         if np.isfinite(values[e, r])]
        return rows
    points = min(MAX_POINTS, room // max(1, len(histories)))
    ok = (result.diverged_at < 0).numpy()
    for key, values in histories.items():
        if points >= 2 and ok.any():
            mean = values[:, ok].mean(axis=1)  # [epochs]
            rows += [(f"{key}/mean", shown(mean[e]), int(e)) for e in curve_steps(len(mean), points)]
    return rows
