"""Figures: the right panels and texts, PNGs that render, including tokens that would break mathtext."""

import io

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from amrepro import figures

NASTY = ["$", " $x$", "$\\frac{$", "\u0120sup", "\ufffd", "a\nb", "\\", "^_{}", "%", "$$", "\\frac{1}{2}", "\t", "",
         "#", " ok"]  # '$\frac{$' is invalid mathtext: drawn as math it raises


@pytest.fixture
def grid():
    """A 6-run x 4-position token matrix where token 0 ('$') repeats 5 times and the rest are rarer."""
    ids = np.array([[0, 1, 2, 3], [0, 4, 5, 6], [0, 7, 8, 9], [0, 10, 11, 12], [0, 13, 1, 2], [7, 8, 9, 10]])
    tokens = [[NASTY[i] for i in row] for row in ids]
    return ids, tokens, [100 + r for r in range(6)]


def png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=50)
    return buffer.getvalue()


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_token_label_is_repr_and_short():
    assert figures.token_label(" sup") == "' sup'"
    assert figures.token_label("a\nb") == "'a\\nb'"  # a newline shows as an escape, not a line break
    assert figures.token_label("x" * 40).endswith("…") and len(figures.token_label("x" * 40)) == figures.LABEL_LIMIT


def test_curves_has_a_line_per_seed_in_two_panels():
    loss = np.linspace(0, -1, 30)[:, None] * np.arange(1, 4)  # [30 epochs, 3 runs]
    fig = figures.curves(loss, -loss, [7, 8, 9])
    ax_loss, ax_act = fig.axes
    assert len(ax_loss.lines) == len(ax_act.lines) == 3
    np.testing.assert_allclose(ax_act.lines[2].get_ydata(), -loss[:, 2])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["seed 7", "seed 8", "seed 9"]
    assert png(fig).startswith(b"\x89PNG")


def test_token_grid_shows_every_token_coloured_by_repetition(grid):
    ids, tokens, seeds = grid
    fig = figures.token_grid(tokens, ids, seeds)
    ax = fig.axes[0]
    assert texts(ax) == [figures.token_label(t) for row in tokens for t in row]
    counts = ax.images[0].get_array()
    assert counts[0, 0] == 5 and counts[5, 0] == 2 and counts[1, 2] == 1  # '$' x5, token 7 x2, token 5 once
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"seed {s}" for s in seeds]
    assert "14/24 unique" in ax.get_title()
    assert len(png(fig)) > 1000


def test_token_frequency_orders_by_count(grid):
    ids, tokens, _ = grid
    fig = figures.token_frequency(ids, tokens, top_k=3)
    ax = fig.axes[0]
    heights = [bar.get_width() for bar in ax.patches]
    assert heights == [5, 2, 2]  # '$' (id 0), then ties broken by id: 1, 2
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{figures.token_label(NASTY[i])} ({i})" for i in range(3)]
    png(fig)


def test_projection_gap_has_a_panel_per_kind_with_its_own_scale(grid):
    final, decoded = np.array([300.0, 200.0, 100.0]), np.array([1.0, -1.0, 1.0])  # decoded ~1% of continuous
    fig = figures.projection_gap(final, decoded, [1, 2, 3])
    ax_final, ax_decoded = fig.axes
    assert [b.get_height() for b in ax_final.patches] == [300.0, 200.0, 100.0]
    assert [b.get_height() for b in ax_decoded.patches] == [1.0, -1.0, 1.0]
    assert ax_decoded.get_ylim()[1] < 10  # the small bars fill their own panel, not 1% of a shared one
    assert "mean 200" in fig.get_suptitle()  # gaps 299, 201, 99: 199.67 to 3 digits
    png(fig)


def test_seed_colours_never_repeat():
    for n in (3, 10, 12, 20, 37):
        colors = figures.seed_colors(n)
        assert len(set(colors)) == n
    loss = np.zeros((5, 12))
    lines = figures.curves(loss, loss, list(range(12))).axes[0].lines
    assert len({line.get_color() for line in lines}) == 12  # matplotlib's default cycle repeats after 10


def test_token_grid_colour_bar_has_whole_counts_only(grid):
    ids, tokens, seeds = grid
    fig = figures.token_grid(tokens, ids, seeds)
    ticks = fig.axes[1].get_yticks()
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)
    png(fig)


def test_all_figures_render_nasty_tokens_without_pyplot(grid):
    ids, tokens, seeds = grid
    before = plt.get_fignums()
    loss = np.random.default_rng(0).normal(size=(20, len(seeds)))
    makers = figures.figure_makers(loss, -loss, seeds, tokens, ids, np.ones(len(seeds)), np.zeros(len(seeds)))
    out = {path: make() for path, make in makers.items()}
    assert sorted(out) == ["figures/curves.png", "figures/projection_gap.png", "figures/token_frequency.png",
                           "figures/token_grid.png"]
    for fig in out.values():
        assert isinstance(fig, Figure) and png(fig).startswith(b"\x89PNG")
    assert plt.get_fignums() == before  # nothing registered with pyplot: nothing to close, nothing leaks


def test_a_dollar_would_break_mathtext_without_the_escape():
    """Guards the guard: the same label through mathtext fails, so parse_math=False is what saves it."""
    fig = Figure()
    fig.text(0.5, 0.5, figures.token_label("$\\frac{$"))
    with pytest.raises(ValueError):
        png(fig)


def test_hub_tokens_bars_with_the_uniform_line():
    hubs = [{"id": i, "count": 30 - i, "frequency": (30 - i) / 4096, "token": NASTY[i]} for i in range(len(NASTY))]
    fig = figures.hub_tokens(hubs, pool_size=4096, vocab_size=300, pool_distinct=120)
    ax = fig.axes[0]
    assert [bar.get_width() for bar in ax.patches] == [h["frequency"] for h in hubs]
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{figures.token_label(t)} ({i})" for i, t in enumerate(NASTY)]
    assert ax.lines[0].get_xdata()[0] == 1 / 300  # the uniform null's frequency, for comparison
    assert "4096 decoded random starts" in ax.get_xlabel()
    assert "120 distinct tokens among the starts; uniform tokens: 300" in ax.get_title()  # 300 * (1 - (299/300)^4096)
    assert [t.get_text() for t in ax.texts] == [str(h["count"]) for h in hubs]
    assert png(fig).startswith(b"\x89PNG")  # '$' tokens and all


def test_token_grid_draws_a_token_that_fills_256_cells_or_more():
    """`amrepro run --runs 60 --dim 3` on the tiny model: one token in 267 of 300 cells. A fixed 256-colour
    BoundaryNorm refused that many bins, and the failure took the parent's statistics with it."""
    ids = np.zeros((60, 5), dtype=int)  # [runs, pos]
    ids[:11, 2], ids[11:22, 3], ids[22:33, 4] = 1, 2, 3  # 267 zeros, three rarer tokens
    fig = figures.token_grid([["x" if i == 0 else "y" for i in row] for row in ids], ids, list(range(60)))
    bar = fig.axes[1]
    assert max(bar.get_yticks()) == 267 and all(float(t).is_integer() for t in bar.get_yticks())
    assert png(fig).startswith(b"\x89PNG")


def test_render_keeps_every_figure_but_the_one_that_fails(grid):
    """A figure that cannot be drawn costs only itself: the others come back as PNGs, the failure as a line."""
    ids, tokens, seeds = grid
    loss = np.random.default_rng(0).normal(size=(20, len(seeds)))
    makers = figures.figure_makers(loss, -loss, seeds, tokens, ids, np.ones(len(seeds)), np.zeros(len(seeds)))
    makers["figures/token_frequency.png"] = lambda: 1 / 0
    rendered, failed = figures.render(makers)
    assert sorted(rendered) == ["figures/curves.png", "figures/projection_gap.png", "figures/token_grid.png"]
    assert all(data.startswith(b"\x89PNG") for data in rendered.values())
    assert failed == {"figures/token_frequency.png": "ZeroDivisionError: division by zero"}
