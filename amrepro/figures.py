"""Figures of one experiment, as matplotlib Figures for MLflow's log_figure (nothing is shown or saved here).

Figures are built with matplotlib.figure.Figure, not pyplot: no global figure registry to leak into, no
interactive backend; savefig renders PNGs with Agg. Token strings are arbitrary (byte-level pieces, '$',
backslashes, newlines), so they are shown as repr() and every text that holds one is drawn with
parse_math=False: mathtext never sees them.
"""

from __future__ import annotations

import numpy as np

LABEL_LIMIT = 18  # characters of a token label before it is shortened with an ellipsis


def token_label(text: str) -> str:
    """repr() of a token (quotes show leading spaces, escapes show newlines), shortened to LABEL_LIMIT characters."""
    shown = repr(text)
    return shown if len(shown) <= LABEL_LIMIT else shown[: LABEL_LIMIT - 1] + "…"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def seed_colors(n: int) -> list:
    """n distinct colours: matplotlib's default cycle repeats after 10 seeds, which makes seed 0 and seed 10
    look like one run. tab10/tab20 up to 20 seeds, then evenly spaced samples of a perceptual colormap."""
    from matplotlib import colormaps

    if n <= 20:
        return [colormaps["tab10" if n <= 10 else "tab20"](i) for i in range(n)]
    return [colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, n)]


def curves(loss, activation, seeds):
    """Loss and mean target activation per epoch, one line per seed, in two panels."""
    loss, activation = np.asarray(loss, dtype=float), np.asarray(activation, dtype=float)  # [epochs, runs] each
    fig = _figure(11, 4)
    ax_loss, ax_act = fig.subplots(1, 2, sharex=True)
    epochs = np.arange(loss.shape[0])
    colors = seed_colors(len(seeds))
    for ax, values, title, label in ((ax_loss, loss, "loss", "loss"),
                                     (ax_act, activation, "mean target activation", "activation")):
        for r, seed in enumerate(seeds):
            ax.plot(epochs, values[:, r], lw=1, color=colors[r], label=f"seed {seed}")
        ax.set(title=title, xlabel="epoch", ylabel=label)
    if len(seeds) <= 12:  # beyond that the legend is longer than the plot
        fig.legend(*ax_act.get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    fig.suptitle(f"{len(seeds)} seeds")
    return fig


def token_grid(tokens, ids, seeds):
    """The runs x positions decoded tokens as a table, each cell coloured by how often its token occurs
    anywhere in the grid (1 = unique): repetition across seeds stands out."""
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm

    ids = np.asarray(ids)  # [runs, pos]
    runs, pos = ids.shape
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    counts = counts[inverse.reshape(ids.shape)]  # [runs, pos]: how often each cell's token occurs in the grid
    fig = _figure(max(4.0, 1.5 * pos + 2.0), max(2.5, 0.42 * runs + 1.4))
    ax = fig.subplots()
    # counts are whole numbers: one colour per count from a map resampled to exactly that many (BoundaryNorm
    # refuses more bins than colours, and a fixed 256 broke the figure, and all logging after it, once a token
    # occurred 256 times), and a colour bar with integer ticks only
    top = max(2, int(counts.max()))
    norm = BoundaryNorm(np.arange(0.5, top + 1.5), ncolors=top)
    image = ax.imshow(counts, cmap=colormaps["YlOrRd"].resampled(top), norm=norm, aspect="auto")
    fontsize = 9 if runs <= 20 and pos <= 10 else 6
    for (r, p), count in np.ndenumerate(counts):
        ax.text(p, r, token_label(tokens[r][p]), ha="center", va="center", fontsize=fontsize,
                color="white" if count > 0.6 * top else "black", parse_math=False)  # white on the darkest cells
    ax.set_xticks(range(pos), [f"pos {p}" for p in range(pos)])
    ax.set_yticks(range(runs), [f"seed {s}" for s in seeds])
    ax.set_title(f"decoded tokens: {np.unique(ids).size}/{ids.size} unique")
    bar = fig.colorbar(image, ax=ax, label="occurrences of the token in the grid")
    bar.set_ticks(np.unique(np.linspace(1, top, min(top, 8)).round().astype(int)))
    return fig


def token_frequency(ids, tokens, top_k: int = 20):
    """Horizontal bars of the top_k most frequent decoded tokens (ties broken by token id)."""
    ids = np.asarray(ids)  # [runs, pos]
    text = {int(i): t for row_ids, row in zip(ids, tokens) for i, t in zip(row_ids, row)}
    unique, counts = np.unique(ids, return_counts=True)
    order = sorted(range(unique.size), key=lambda k: (-counts[k], unique[k]))[:top_k]
    labels = [f"{token_label(text[int(unique[k])])} ({int(unique[k])})" for k in order]
    fig = _figure(7, max(2.5, 0.3 * len(order) + 1.2))
    ax = fig.subplots()
    ax.barh(range(len(order)), [int(counts[k]) for k in order], color="tab:blue")
    ax.set_yticks(range(len(order)), labels, parse_math=False)
    ax.invert_yaxis()  # most frequent on top
    ax.set(xlabel="occurrences", title=f"decoded-token frequency (top {len(order)} of {unique.size} unique, "
                                       f"{ids.size} tokens)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def projection_gap(final_activation, decoded_activation, seeds):
    """Per run: the activation reached by the continuous embeddings and by their decoded tokens."""
    final = np.asarray(final_activation, dtype=float)  # [runs]
    decoded = np.asarray(decoded_activation, dtype=float)  # [runs]
    x = np.arange(final.size)
    # Two panels with their own scales: the decoded tokens often keep ~1% of the continuous activation, and
    # on a shared axis their bars would be invisible.
    fig = _figure(max(8.0, 1.0 * final.size + 3.0), 4)
    ax_final, ax_decoded = fig.subplots(1, 2, sharex=True)
    for ax, values, label, color in ((ax_final, final, "continuous embeddings", "tab:orange"),
                                     (ax_decoded, decoded, "decoded tokens (fed back as real tokens)", "tab:blue")):
        ax.bar(x, values, width=0.6, color=color)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xticks(x, [str(s) for s in seeds])
        ax.set(xlabel="seed", ylabel="mean target activation", title=label)
    fig.suptitle(f"projection gap (continuous - decoded): mean {float((final - decoded).mean()):.3g}")
    return fig


def hub_tokens(hubs: list[dict], pool_size: int, vocab_size: int, pool_distinct: int):
    """The hub tokens of the decoded-starts null: how often random start vectors decode to each of the most
    frequent tokens (count on each bar), against the 1/vocab_size that uniform tokens would give. The title
    compares the distinct tokens of the pool with what uniform tokens give: the top of a small pool is noisy,
    the distinct count says whether decoding really concentrates."""
    labels = [f"{token_label(h.get('token', '?'))} ({h['id']})" for h in hubs]
    fig = _figure(7, max(2.5, 0.3 * len(hubs) + 1.6))
    ax = fig.subplots()
    bars = ax.barh(range(len(hubs)), [h["frequency"] for h in hubs], color="tab:red")
    ax.bar_label(bars, [str(h["count"]) for h in hubs], padding=2, fontsize="small")
    ax.axvline(1.0 / vocab_size, color="black", lw=1, ls="--", label=f"uniform: 1/{vocab_size}")
    ax.set_yticks(range(len(hubs)), labels, parse_math=False)
    ax.invert_yaxis()  # most frequent on top
    uniform = vocab_size * (1 - (1 - 1 / vocab_size) ** pool_size)  # expected distinct among uniform tokens
    ax.set(xlabel=f"frequency among {pool_size} decoded random starts",
           title=f"hub tokens of nearest-token decoding (top {len(hubs)}, count on each bar)\n"
                 f"{pool_distinct} distinct tokens among the starts; uniform tokens: {uniform:.0f}")
    ax.legend(fontsize="small", loc="lower right")
    return fig


def figure_makers(loss, activation, seeds, tokens, ids, final_activation, decoded_activation, hubs=None) -> dict:
    """Every figure of one experiment, keyed by its artifact path, as a function that builds it (not built yet:
    render() builds each on its own, so one that fails costs only itself). hubs: the decoded-starts null of the
    statistics (nulls.py), for figures/hub_tokens.png."""
    makers = {
        "figures/curves.png": lambda: curves(loss, activation, seeds),
        "figures/token_grid.png": lambda: token_grid(tokens, ids, seeds),
        "figures/token_frequency.png": lambda: token_frequency(ids, tokens),
        "figures/projection_gap.png": lambda: projection_gap(final_activation, decoded_activation, seeds),
    }
    if hubs is not None:
        makers["figures/hub_tokens.png"] = lambda: hub_tokens(hubs["hub_tokens"], hubs["pool_size"],
                                                              hubs["vocab_size"], hubs["pool_distinct"])
    return makers


def render(makers: dict) -> tuple[dict[str, bytes], dict[str, str]]:
    """Build each figure and render it as MLflow's log_figure would (PNG, Agg), on its own: (path -> PNG bytes, path
    -> why it failed, in one line). A figure is a view of results already computed: one that cannot be drawn must
    never cost the statistics, the tables or the seeds logged beside it."""
    import io
    import warnings

    rendered, failed = {}, {}
    for path, make in makers.items():
        try:
            figure, buffer = make(), io.BytesIO()
            with warnings.catch_warnings():  # a token in a script the font lacks is drawn as a box, not an error
                warnings.filterwarnings("ignore", message="Glyph .* missing from font")
                figure.savefig(buffer, format="png", dpi="figure")
            rendered[path] = buffer.getvalue()
        except Exception as error:  # noqa: BLE001 - any drawing failure costs only this figure
            failed[path] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    return rendered, failed


def activation_vs_agreement(rows: list[dict], corpus: dict | None = None):
    """`amrepro compare`: one point per method, the mean activation of its real tokens (bar: worst to best run)
    against its positional agreement; the corpus maximum and 99th percentile as horizontal lines."""
    fig = _figure(6.5, 4.5)
    ax = fig.subplots()
    for r in rows:
        if r.get("agreement") is None or r.get("act_mean") is None:
            continue
        ax.scatter([r["agreement"]], [r["act_mean"]], s=40, zorder=3)
        ax.annotate(r["method"], (r["agreement"], r["act_mean"]), textcoords="offset points", xytext=(6, 4),
                    parse_math=False)
        if r.get("act_best") is not None:
            ax.vlines(r["agreement"], r["act_mean"], r["act_best"], lw=1, color="grey")
    if corpus is not None:
        ax.axhline(corpus["max"], ls="--", lw=1, color="black", label=f"corpus max ({corpus['n_windows']} windows)")
        ax.axhline(corpus["p99"], ls=":", lw=1, color="black", label="corpus 99th percentile")
        ax.legend(fontsize="small")
    ax.set(xlabel="positional agreement between runs (0: no run pair shares a token at a position)",
           ylabel="target activation of the real tokens (mean; line to best run)",
           title="reproducibility vs activation, per method")
    return fig


SWEEP_MAP_ROWS = (  # (table column, label, how it is shown): statistics as they are, p-values as -log10
    ("agreement", "positional agreement", None), ("jaccard", "Jaccard of token sets", None),
    ("p_agreement", "-log10 p (agreement)", "log"), ("p_jaccard", "-log10 p (Jaccard)", "log"),
    ("p_unique", "-log10 p (unique)", "log"), ("final_activation", "final activation", None),
    ("projection_gap", "projection gap", None),
)


def sweep_map(columns: dict[str, list]):
    """The sweep as a map: targets (x) by statistics (y), each row scaled to its own range across targets (the
    colour bar is 0 = the row's smallest, 1 = its largest), a dot where the verdict claims above chance
    (agreement or Jaccard) or fewer unique tokens than chance. Grey: no statistics (not run, or all diverged)."""
    n = len(columns["target"])
    matrix = np.full((len(SWEEP_MAP_ROWS), n), np.nan)  # [stats, targets]
    for row, (key, _, how) in enumerate(SWEEP_MAP_ROWS):
        values = np.array([np.nan if v is None else v for v in columns[key]], dtype=float)  # [targets]
        if how == "log":
            values = -np.log10(np.clip(values, 1e-300, 1.0))
        low, high = (np.nanmin(values), np.nanmax(values)) if np.isfinite(values).any() else (0.0, 1.0)
        matrix[row] = (values - low) / (high - low) if high > low else np.where(np.isfinite(values), 0.5, np.nan)
    fig = _figure(min(4 + 0.18 * n, 40), 4.2)
    ax = fig.subplots()
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    for row, key in ((0, "agreement_above_chance"), (1, "jaccard_above_chance"), (4, "unique_below_chance")):
        hits = [t for t, v in enumerate(columns[key]) if v == 1.0]
        ax.scatter(hits, [row] * len(hits), marker="o", s=14, color="red",
                   label="claimed by the verdict" if row == 0 else None)
    ax.set_yticks(range(len(SWEEP_MAP_ROWS)), [label for _, label, _ in SWEEP_MAP_ROWS])
    if n <= 40:
        ax.set_xticks(range(n), columns["target"], rotation=90, fontsize="x-small", parse_math=False)
    else:
        ax.set_xlabel(f"target (0..{n - 1}, in the sweep's order; names in sweep_table.json)")
    fig.colorbar(image, ax=ax, label="scaled within each row (0 = min, 1 = max)")
    # the key in the title, not a legend box: a legend inside the map would hide a row of targets
    ax.set_title(f"{n} targets x statistics\nred dot: claimed by the verdict", fontsize="medium")
    return fig


def study(rows: list[dict], cvs: dict[str, list[float]]):
    """The study of a many-method sweep, one row per method: left, the fraction of the layer's targets above
    chance, specific to their target, and whose best seed beats the corpus max; right, each target's coefficient
    of variation of the decoded activation across seeds (cvs: method -> [targets])."""
    fig = _figure(10, 1.2 + 0.7 * len(rows))
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    methods = [r["method"] for r in rows]
    y = np.arange(len(rows))
    bars = (("frac_above_chance", "seeds agree above chance"), ("frac_specific", "specific to the target (BH 5%)"),
            ("frac_best_beats_corpus_max", "best seed beats corpus max"))
    height = 0.8 / len(bars)
    for k, (key, label) in enumerate(bars):
        values = [r.get(key) for r in rows]
        left.barh(y + (k - 1) * height, [0 if v is None else v for v in values], height, label=label)
        for yi, v in zip(y, values):
            left.text(0 if v is None else v, yi + (k - 1) * height, " n/a" if v is None else f" {v:.0%}",
                      va="center", fontsize=7)
    left.set(yticks=y, yticklabels=methods, xlim=(0, 1.15), xlabel="fraction of the layer's targets")
    left.invert_yaxis()
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3)
    # log scale: a target whose seeds' mean is near 0 has a huge CV, which would squash every other box; a CV of 0
    # (every seed alike) is drawn at 1e-3
    data = [[max(v, 1e-3) for v in cvs.get(m, []) if v is not None] or [np.nan] for m in methods]
    right.boxplot(data, vert=False, positions=y, widths=0.5)
    right.set(xscale="log", yticks=y, yticklabels=methods,
              xlabel="seed spread: CV of the decoded activation per target (log)")
    right.invert_yaxis()
    return fig
