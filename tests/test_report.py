"""The terminal: a redirected stdout still shows progress while a long run works, and tokens stay whole."""

import numpy as np
import torch
from rich.console import Console

from amrepro import report


def test_plain_progress_lines_without_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(report, "console", Console(file=open("/dev/null", "w"), force_terminal=False))
    with report.epoch_progress(100, 3) as on_epoch:
        for epoch in range(100):
            on_epoch(epoch)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10  # every 10%, printed as it happens, not at the end
    assert lines[0].startswith("optimizing 3 runs: epoch 10/100 (10%)") and "left" in lines[0]
    assert lines[-1].startswith("optimizing 3 runs: epoch 100/100 (100%)")


class _Outcome:
    """Just what token_table reads."""

    def __init__(self, tokens):
        from types import SimpleNamespace

        runs, pos = len(tokens), len(tokens[0])
        self.tokens = tokens
        self.ids = np.arange(runs * pos).reshape(runs, pos)
        self.ids[1, 0] = self.ids[0, 0]  # one repeated token
        self.diverged = {}
        self.target = SimpleNamespace(name="blocks.8.hook_resid_pre[91]")
        self.result = SimpleNamespace(seeds=list(range(runs)), final_activation=torch.ones(runs))
        self.decoded_activation = np.zeros(runs)
        unique, counts = np.unique(self.ids, return_counts=True)
        self.summary = {"counts": [{"id": int(i), "count": int(c)} for i, c in zip(unique, counts)]}


def _render(outcome, width: int) -> str:
    out = Console(width=width, record=True, file=open("/dev/null", "w"))
    out.print(report.token_table(outcome))
    return out.export_text()


def test_tokens_are_never_cut_at_80_columns(monkeypatch):
    long = [[" valuable", " TheNitromeFan", " externalToEVA", " sup", " RandomRedditor"] for _ in range(3)]
    monkeypatch.setattr(report, "console", Console(width=80, file=open("/dev/null", "w")))
    text = _render(_Outcome(long), 80)
    for token in long[0]:
        assert repr(token) in text  # whole, on one line, not 'valuab…'
    assert "…" not in text
    short = [["a", "b", "c", "d", "e"] for _ in range(3)]
    assert "┃" in _render(_Outcome(short), 80)  # short tokens keep the table


def test_the_null_is_named_after_the_methods_starts():
    """pez/gcg/epo start from random tokens: the table's chance column and its caption say so, as the verdict does
    (issue 19), not "decoded starts" / "random start vectors decoded to their nearest tokens"."""
    from test_metrics import stats_for

    ids = np.arange(20).reshape(4, 5)
    s = stats_for(ids, initial_ids=ids + 100, start_name="random start tokens")
    out = Console(width=250, record=True, file=open("/dev/null", "w"))
    out.print(report.stats_table(s))
    text = out.export_text()
    assert "chance: random start tokens" in text and "draws of random start tokens" in text
    assert "decoded starts" not in text and "nearest tokens" not in text
    for stat in ("unique tokens", "repeats across runs", "repeats within runs", "positional agreement"):
        assert stat in text


def test_run_description_names_the_null_and_reads_an_older_summary():
    """The parent's markdown description: every registry row under the method's own null; a summary saved before
    the registry (no "observed": `amrepro log FILE` after an upgrade) still renders its three statistics."""
    from types import SimpleNamespace

    from test_metrics import stats_for

    ids = np.arange(20).reshape(4, 5)
    s = stats_for(ids, initial_ids=ids + 100, start_name="random start tokens")
    outcome = SimpleNamespace(config=SimpleNamespace(model="tiny", n_steps=3, method="gcg", step_unit="gcg steps"),
                              target=SimpleNamespace(name="blocks.1.hook_resid_pre[0]"), diverged={},
                              result=SimpleNamespace(seeds=[0, 1, 2, 3], final_activation=torch.ones(4)),
                              tokens=[["a"] * 5] * 4, ids=ids, summary={"statistics": s})
    text = report.markdown_summary(outcome)
    assert "| statistic | observed | chance: random start tokens |" in text and "| repeats across runs | 0 |" in text
    outcome.summary = {"statistics": {k: v for k, v in s.items() if k != "observed"}}
    text = report.markdown_summary(outcome)
    assert "| unique tokens | 20/20 |" in text and "repeats across runs" not in text


def test_compare_prints_each_methods_headline_and_tokens_with_the_ids_of_unprintable_ones(monkeypatch):
    """`amrepro compare`, after each method (issue 20 §3): its one-line verdict, then its seeds' tokens as `run`
    prints them, two half-character tokens told apart by their ids."""
    from amrepro.headline import headline
    from test_metrics import stats_for

    outcome = _Outcome([["\ufffd", " a", "b"], ["\ufffd", "\ufffd", "d"]])  # ids [[0, 1, 2], [0, 4, 5]]
    outcome.summary.update(statistics=stats_for(outcome.ids), seeds=[0, 1])
    out = Console(width=120, record=True, file=open("/dev/null", "w"))
    monkeypatch.setattr(report, "console", out)
    report.print_method("gcg", outcome)
    lines = out.export_text().splitlines()
    assert lines[0] == f"gcg: {headline(outcome.summary)}" and headline(outcome.summary)
    rows = [line for line in lines if "'\\ufffd'" in line or "'�'" in line]
    assert len(rows) == 2 and "(id 0)" in rows[0] and "' a'" in rows[0] and "(id 4)" in rows[1]
