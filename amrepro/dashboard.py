"""dashboard.html: one self-contained page per target parent (and an index per compare or sweep run) that MLflow's
artifact viewer shows inline: the headline verdict, each seed's tokens coloured by the activation at each
position, the seeds' curves, with --corpus the top windows, the activation histogram and its quantiles, and for a
causal LM the logits the target's direction promotes.

MLflow 3 shows an .html artifact in an iframe with sandbox="allow-scripts" from a blob: URL: no network, no
same-origin, no top-level navigation. So the page carries everything inline (CSS, SVG drawn here, no image
files, no CDN) and needs no script; the index pages' one script only turns their links into absolute ones.

render() and render_index() are pure: plain data in (the summary.json dict, arrays of curves), HTML out, through
the Jinja2 templates in templates/ (autoescaped: token strings are arbitrary text). page() gathers that data from an
Outcome, index_row() and sweep_rows() from runs' summaries or a sweep's table. Nothing here talks to MLflow.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from .headline import headline
from .printable import token_repr
from .spikes import SPIKE_RULE

CURVE_POINTS = 250  # points per curve at most: 10 seeds x 2 panels stay a few tens of kB
PANEL = {"width": 470, "height": 230, "left": 58, "right": 12, "top": 26, "bottom": 36}
HIST = {"width": 720, "height": 200, "left": 50, "right": 16, "top": 14, "bottom": 40}


@functools.lru_cache(maxsize=1)
def _environment():
    """One Jinja2 environment per process: it compiles each template once (a sweep renders one page per target)."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    return Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), undefined=StrictUndefined,
                       autoescape=select_autoescape(default=True, default_for_string=True), trim_blocks=True,
                       lstrip_blocks=True)


def heat(value: float | None, scale: float) -> str:
    """A background for an activation: orange for positive, blue for negative, opacity |value| / scale (at most
    0.85, so black text stays readable); transparent for None or a zero scale."""
    if value is None or not np.isfinite(value) or scale <= 0:
        return "transparent"
    t = min(abs(value) / scale, 1.0) * 0.85
    return f"rgba(255,140,0,{t:.2f})" if value >= 0 else f"rgba(40,110,255,{t:.2f})"


def _num(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _ticks(low: float, high: float, n: int = 5) -> list[float]:
    """About n round tick values covering [low, high]."""
    if not high > low:
        return [low]
    step = 10 ** np.floor(np.log10((high - low) / n))
    for m in (1, 2, 5, 10):
        if (high - low) / (m * step) <= n:
            step *= m
            break
    return [float(v) + 0.0 for v in np.arange(np.ceil(low / step) * step, high + step * 1e-9, step)]  # no -0


def downsample(n: int, keep=()) -> np.ndarray:
    """Indices 0..n-1 thinned to about CURVE_POINTS, always with the first, the last and those in keep (spikes)."""
    picked = np.linspace(0, n - 1, min(n, CURVE_POINTS)).round().astype(int)
    return np.unique(np.concatenate([picked, np.asarray([k for k in keep if 0 <= k < n], dtype=int)]))


def panel(curves, title: str, marks=()) -> dict:
    """Geometry of one SVG line chart: curves [(colour, ys [epochs])] over epochs 0..n-1 (non-finite points
    dropped), marks [(colour, epoch, y, label)] as circles."""
    p = PANEL
    w, h = p["width"] - p["left"] - p["right"], p["height"] - p["top"] - p["bottom"]
    curves = [(color, np.asarray(ys, dtype=float)) for color, ys in curves]
    values = np.concatenate([ys for _, ys in curves]) if curves else np.zeros(1)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    n = max(len(curves[0][1]) if curves else 1, 2)
    x = lambda e: p["left"] + w * e / (n - 1)  # noqa: E731
    y = lambda v: p["top"] + h * (high - v) / (high - low)  # noqa: E731
    keep = [epoch for _, epoch, _, _ in marks]
    lines = [{"color": color, "points": " ".join(f"{x(i):.1f},{y(ys[i]):.1f}" for i in downsample(len(ys), keep)
                                                 if np.isfinite(ys[i]))} for color, ys in curves]
    return {**p, "title": title, "lines": lines,
            "x_ticks": [{"at": x(t), "label": f"{t:g}"} for t in _ticks(0, n - 1) if t == int(t)],
            "y_ticks": [{"at": y(t), "label": f"{t:.3g}"} for t in _ticks(low, high)],
            "marks": [{"color": c, "x": x(e), "y": y(v), "label": label} for c, e, v, label in marks],
            "x0": p["left"], "x1": p["left"] + w, "y0": p["top"], "y1": p["top"] + h}


def histogram(corpus: dict, seeds: list[dict]) -> dict:
    """Geometry of the corpus histogram (bar height: log(1 + count), so the tail stays visible), the quantiles as
    dashed lines and each seed's real-token activation as a coloured line (clamped to the edge when beyond it)."""
    p = HIST
    counts = np.asarray(corpus["histogram"]["counts"], dtype=float)  # [bins]
    edges = np.asarray(corpus["histogram"]["edges"], dtype=float)  # [bins + 1]
    w, h = p["width"] - p["left"] - p["right"], p["height"] - p["top"] - p["bottom"]
    marks = [s["act_tokens"] for s in seeds if s["act_tokens"] is not None]
    low, high = min([float(edges[0]), *marks]), max([float(edges[-1]), *marks])
    if high <= low:
        low, high = low - 0.5, high + 0.5
    x = lambda v: p["left"] + w * (v - low) / (high - low)  # noqa: E731
    tall = np.log1p(counts).max() or 1.0
    bars = [{"x": x(a), "width": max(x(b) - x(a) - 0.5, 0.5), "height": h * np.log1p(c) / tall,
             "y": p["top"] + h - h * np.log1p(c) / tall, "count": int(c), "low": f"{a:.3g}", "high": f"{b:.3g}"}
            for a, b, c in zip(edges[:-1], edges[1:], counts)]
    return {**p, "bars": bars, "x0": p["left"], "x1": p["left"] + w, "y0": p["top"], "y1": p["top"] + h,
            "x_ticks": [{"at": x(t), "label": f"{t:.3g}"} for t in _ticks(low, high, 8)],
            "quantiles": [{"x": x(v), "label": f"q{float(q) * 100:g}"} for q, v in corpus["quantiles"].items()],
            "seeds": [{"x": x(s["act_tokens"]), "color": s["color"], "label": f"seed {s['seed']}"}
                      for s in seeds if s["act_tokens"] is not None]}


def _chips(tokens, ids, values, scale: float, others=None) -> list[dict]:
    """One chip per token: its text (with its id where it does not decode to printable text), its colour and a
    tooltip with both activations."""
    out = []
    for p, (text, token_id) in enumerate(zip(tokens, ids)):
        value = None if values is None else float(values[p])
        tip = f"pos {p}, id {int(token_id)}: activation {_num(value)}"
        if others is not None:
            tip += f" as a token, {_num(float(others[p]))} as the optimized vector"
        out.append({"text": token_repr(text, token_id), "color": heat(value, scale), "value": _num(value), "tip": tip})
    return out


def render(summary: dict, loss, activation, final_activation, decoded_activation, positions: dict | None = None,
           title: str = "") -> str:
    """The target page. summary: summary.json (seeds, tokens, token_ids, statistics, diverged, loss_spikes,
    promoted_logits and, from `compare --corpus`, corpus); loss, activation [epochs, runs]; final_activation,
    decoded_activation [runs]; positions {"tokens", "final"} [runs, pos] (the activation at each position)."""
    from matplotlib.colors import to_hex

    from .figures import seed_colors

    seeds, tokens, ids = summary["seeds"], summary["tokens"], summary["token_ids"]
    loss, activation = np.asarray(loss, dtype=float), np.asarray(activation, dtype=float)  # [epochs, runs]
    colors = [to_hex(c) for c in seed_colors(len(seeds))]  # the figures' and MLflow's charts' seed colours
    diverged = {d["run_index"]: d["reason"] for d in summary.get("diverged") or []}
    spikes = summary.get("loss_spikes") or [None] * len(seeds)
    positions = {k: np.asarray(v, float) for k, v in (positions or {}).items()}  # [runs, pos] each
    at_tokens, at_final = positions.get("tokens"), positions.get("final")
    corpus, logits = summary.get("corpus"), summary.get("promoted_logits")
    ok = [r for r in range(len(seeds)) if r not in diverged]

    def scale_of(*arrays) -> float:  # the largest finite |activation|, 0 for none
        values = np.abs(np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays if a is not None] or [[]]))
        return float(values[np.isfinite(values)].max(initial=0.0))

    # real tokens (the seeds' and the corpus windows') share one colour scale; the optimized vectors have theirs
    token_scale = scale_of(None if at_tokens is None else at_tokens[ok],
                           *([w["positions"] for w in corpus["top"]] if corpus else []))
    final_scale = scale_of(None if at_final is None else at_final[ok])
    rows = []
    for r, seed in enumerate(seeds):
        spike = spikes[r] if r < len(spikes) else None
        rows.append({"seed": seed, "color": colors[r], "diverged": diverged.get(r),
                     "spike": None if spike is None else f"loss spike at epoch {spike['epoch']} "
                                                         f"(+{spike['share']:.0%} of its loss range)",
                     "chips": [] if r in diverged else _chips(tokens[r], ids[r], None if at_tokens is None else
                                                              at_tokens[r], token_scale,
                                                              None if at_final is None else at_final[r]),
                     "vectors": [] if r in diverged or at_final is None else
                     [{"color": heat(float(v), final_scale), "value": _num(float(v))} for v in at_final[r]],
                     "act_final": None if r in diverged else float(final_activation[r]),
                     "act_tokens": None if r in diverged else float(decoded_activation[r])})
    marks = [(colors[r], s["epoch"], loss[s["epoch"], r], f"seed {seeds[r]}: loss spike at epoch {s['epoch']}")
             for r, s in enumerate(spikes) if s is not None]
    curves = {"loss": panel([(colors[r], loss[:, r]) for r in range(len(seeds))], "loss", marks),
              "activation": panel([(colors[r], activation[:, r]) for r in range(len(seeds))],
                                  "mean target activation")}
    stats = summary.get("statistics")
    view = {
        "title": title or f"{summary.get('target', '')}",
        "headline": headline(summary),
        "verdict": stats["verdict"] if stats else "",
        "rows": rows, "curves": curves, "epochs": loss.shape[0], "spike_rule": SPIKE_RULE,
        "token_scale": _num(token_scale), "final_scale": _num(final_scale), "has_positions": at_tokens is not None,
        "unique": None if not stats else f"{stats['n_unique_tokens']}/{stats['n_tokens_total']}",
        "corpus": None, "logits": None,
        "fmt": _num,
    }
    if corpus:
        view["corpus"] = {
            "n_windows": corpus["n_windows"], "n_tokens": corpus["n_tokens"],
            # a corpus of more than corpus.EXACT_WINDOWS windows keeps only its top: p99, no histogram
            "quantiles": [{"label": f"{float(q) * 100:g}%", "value": _num(v)}
                          for q, v in (corpus.get("quantiles") or {"0.99": corpus["p99"]}).items()],
            "max": _num(corpus["max"]), "mean": _num(corpus["mean"]),
            "histogram": histogram(corpus, rows) if "histogram" in corpus else None,
            "windows": [{"rank": w["rank"], "activation": _num(w["activation"]),
                         "chips": _chips(w["tokens"], w.get("ids") or [-1] * len(w["tokens"]), w.get("positions"),
                                         token_scale)} for w in corpus["top"]],
        }
    if logits:
        view["logits"] = {end: [{"text": token_repr(t["token"], t["id"]), "value": _num(t["logit"])}
                                for t in logits[end]] for end in ("top", "bottom")}
    return _environment().get_template("dashboard.html.j2").render(**view)


def page(outcome, title: str = "") -> bytes:
    """render() of an Outcome (experiment.py), as the bytes of dashboard.html."""
    result = outcome.result
    positions = {k: v.numpy() for k, v in result.positions.items()}
    return render(outcome.summary, result.loss.numpy(), result.activation.numpy(), result.final_activation.numpy(),
                  outcome.decoded_activation, positions, title=title).encode()


def render_index(title: str, kind: str, rows: list[dict]) -> str:
    """The index of a compare (kind 'method') or sweep (kind 'target') run: one row per method or target, each
    {name, run_id, experiment_id, headline, unique, agreement, p_agreement, act}, linking to its dashboard."""
    # a link is the MLflow UI's hash route to the row's dashboard, relative to the UI's root (any host)
    view_rows = [{**row, "link": f"#/experiments/{row['experiment_id']}/runs/{row['run_id']}/artifacts/dashboard.html"
                  if row.get("run_id") else None,
                  **{k: _num(row.get(k)) for k in ("agreement", "p_agreement", "act")},
                  "unique": row.get("unique") or "n/a"} for row in rows]
    return _environment().get_template("index.html.j2").render(title=title, kind=kind, rows=view_rows)


def index_row(name: str, run_id: str, experiment_id: str, summary: dict) -> dict:
    """A row of render_index from a target's summary.json."""
    row = {"name": name, "run_id": run_id, "experiment_id": experiment_id, "headline": headline(summary)}
    stats = summary.get("statistics")
    if not stats:
        return row
    null = stats["nulls"].get("decoded_starts") or {}
    return {**row, "unique": f"{stats['n_unique_tokens']}/{stats['n_tokens_total']}",
            "agreement": stats["positional_agreement"],
            "p_agreement": (null.get("positional_agreement") or {}).get("pvalue"),
            "act": stats["decoded_activation"]["mean"]}


def sweep_rows(columns: dict[str, list], experiment_id: str, headlines: dict[str, str]) -> list[dict]:
    """Rows of render_index from a sweep's table (sweep.table) and each target parent's amrepro.headline tag."""
    rows = []
    for k, name in enumerate(columns["target"]):
        unique, total = columns["n_unique_tokens"][k], columns["n_tokens_total"][k]
        rows.append({"name": name, "run_id": columns["parent_run_id"][k], "experiment_id": experiment_id,
                     "headline": headlines.get(name) or columns["status"][k],
                     "unique": None if unique is None else f"{unique:.0f}/{total:.0f}",
                     "agreement": columns["agreement"][k], "p_agreement": columns["p_agreement"][k],
                     "act": columns["decoded_activation"][k]})
    return rows
