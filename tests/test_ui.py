"""What a user sees in the MLflow UI: tokens as a column, a readable parent page, a token table, run names,
the model-training experiment, reproductions that link what they reproduce."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from amrepro.parent_metrics import HEADLINE_METRICS
from amrepro.parent_metrics import TABLE_COLUMNS
from helpers import all_runs, children_of, cli, logged_run


@pytest.fixture
def logged(tiny_gpt2, store):
    parent, children = logged_run(store, tiny_gpt2, runs=3, epochs=8)
    return store, parent, children


def test_runs_go_to_a_model_training_experiment_with_a_meaningful_name(logged):
    uri, parent, _ = logged
    experiment = MlflowClient(uri).get_experiment(parent.info.experiment_id)
    assert experiment.name == "amrepro"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.info.run_name == "tiny-gpt2 blocks.8.hook_resid_pre[3] x3"


def test_each_seed_shows_its_tokens_and_colour_in_the_runs_table(logged):
    uri, _, children = logged
    client = MlflowClient(uri)
    colours = set()
    for child in children:
        logged = json.loads(Path(client.download_artifacts(child.info.run_id, "tokens.json")).read_text())
        # a token that decodes to '\ufffd' (half a UTF-8 character) carries its id: two such tokens differ
        assert child.data.tags["tokens"] == " | ".join(repr(t) + (f" (id {i})" if "\ufffd" in t or not t else "")
                                                      for t, i in zip(logged["tokens"], logged["ids"]))
        colours.add(child.data.tags["mlflow.runColor"])
    assert len(colours) == 3 and all(c.startswith("#") and len(c) == 7 for c in colours)


def test_parent_page_has_description_token_table_and_no_duplicate_metrics(logged):
    uri, parent, children = logged
    client = MlflowClient(uri)
    note = parent.data.tags["mlflow.note.content"]
    assert parent.data.tags["verdict"][:200] in note and "| statistic | observed |" in note
    model = parent.data.params["model"]  # a local folder: the description names it, not this machine's path to it
    assert f"**{Path(model.rstrip('/')).name}**" in note and model not in note
    assert children[0].data.tags["tokens"].split(" | ")[0].replace("|", "\\|") in note
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "token_grid.json")).read_text())
    assert table["columns"][:2] == ["seed", "pos 0"] and len(table["data"]) == 3
    assert [row[0] for row in table["data"]] == [0, 1, 2]
    assert "n_unique_tokens" not in parent.data.metrics and "unique_fraction" not in parent.data.metrics
    summary = json.loads(Path(client.download_artifacts(parent.info.run_id, "summary.json")).read_text())
    repeated = {row["id"] for row in summary["repeated"]}
    assert not repeated & {row["id"] for row in summary["unique"]}  # "unique" lists no repeated token
    assert sum(row["count"] for row in summary["counts"]) == 15


def test_parent_charts_open_on_the_seeds_curves_and_a_dozen_headline_figures(logged):
    """Issue 20: the parent's metrics are the headline figures (rounded for the eye) and each seed's curves, whose
    chart sections (MLflow 3.17: the key up to its last '/', sorted by name) come first; the rest is in summary.json."""
    uri, parent, children = logged
    client = MlflowClient(uri)
    keys = set(parent.data.metrics)
    seeds = [c.data.params["seed"] for c in children]
    curves = {f"{key}/seed-{seed}" for key in ("act/target", "loss/total") for seed in seeds}
    assert keys - curves == set(HEADLINE_METRICS) - {"pvalue/specificity_jaccard", "pvalue/specificity_cosine"}
    assert curves <= keys and len(keys - curves) <= 12
    assert [m.step for m in client.get_metric_history(parent.info.run_id, f"act/target/seed-{seeds[0]}")] == list(range(8))
    sections = sorted({k.rsplit("/", 1)[0] for k in keys})
    assert sections[:2] == ["act/target", "loss/total"]
    # the exact figures are in summary.json, under the same names; the metrics are them to 4 significant digits
    exact = json.loads(Path(client.download_artifacts(parent.info.run_id, "summary.json")).read_text())
    exact = exact["statistics"]["metrics"]
    assert {"stats/positional_agreement", "pvalue/jaccard_decoded_starts", "verdict/agreement_above_chance"} <= set(exact)
    for key in keys - curves - {"runs/ok", "runs/diverged"}:
        assert parent.data.metrics[key] == float(f"{exact[key]:.4g}")
    assert parent.data.metrics["stats/n_tokens_total"] == exact["stats/n_tokens_total"] == 15  # counts: exact
    # what a sweep's table reads, exact, in one tag (a run search returns it: no download per target)
    assert json.loads(parent.data.tags["amrepro.table_row"]) == {k: exact[k] for k in TABLE_COLUMNS.values()}
    act = children[0].data.metrics["act/final"]
    assert act == float(f"{act:.4g}")  # the runs table's seed rows: 4 significant digits too


def test_a_reproduction_is_a_top_level_run_whose_page_links_the_run_it_reproduces(logged):
    """Not nested: MLflow's UI would fetch the older parent of this newest run onto its first page, showing it with
    the reproduction and without its seeds (issue 20 §3, docs/mlflow.md "Finding the seeds"). A reproduction
    logged nested, as before, still reads: it is no seed of its parent, and decode/reproduce refuse it."""
    uri, parent, _ = logged
    result = cli("reproduce", parent.info.run_id)
    assert result.exit_code == 0, result.output
    (rerun,) = [r for r in all_runs(uri) if r.data.tags.get("amrepro.reproduces") == parent.info.run_id]
    assert "mlflow.parentRunId" not in rerun.data.tags
    route = f"(#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id})"
    assert f"[{parent.info.run_name}]{route}" in rerun.data.tags["mlflow.note.content"]
    MlflowClient(uri).set_tag(rerun.info.run_id, "mlflow.parentRunId", parent.info.run_id)  # the old layout
    assert len(children_of(uri, parent.info.run_id)) == 3  # the seeds alone: the re-run is no seed
    assert cli("decode", parent.info.run_id).exit_code == 0
    for command in ("decode", "reproduce"):
        result = cli(command, rerun.info.run_id)
        assert result.exit_code == 2 and "is a reproduction of run" in result.output, result.output
