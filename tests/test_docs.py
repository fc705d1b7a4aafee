"""Knowledge written once: the CLI, MLproject and the documentation (README.md and the docs/ pages it links) are
checked against Config and the code, so they cannot drift apart silently; every relative link resolves."""

import dataclasses
import re
from pathlib import Path

import typer

from amrepro import methods
from amrepro.cli import app
from amrepro.config import Config

ROOT = Path(__file__).resolve().parent.parent
PARAMETERS = (ROOT / "docs" / "parameters.md").read_text()  # the parameter table's page
MLFLOW_PAGE = (ROOT / "docs" / "mlflow.md").read_text()  # the MLflow layout's page


def _run_options() -> dict:
    command = typer.main.get_command(app).commands["run"]
    return {p.name: p for p in command.params}


def test_run_help_comes_from_config_and_the_method_registry():
    """Nothing bypasses Config (its fields are the options by construction, cli.with_config); --method's help
    lists every registered method, and an option that only some methods read says which ones."""
    options = _run_options()
    # besides Config: where a run is logged and in which layout, not what it computes
    assert set(options) - {f.name for f in dataclasses.fields(Config)} == {"experiment", "layout"}
    for spec in methods.specs().values():
        assert f"{spec.name} ({spec.summary})" in options["method"].help

    def readers(option):
        return set(options[option].help.rsplit(" Read by --method ", 1)[1].rstrip(".").split(", "))

    assert {"gcg", "pez"} <= readers("steps") and {"epo"} <= readers("population") and "adam" not in readers("steps")
    assert "Read by" not in options["n_tokens"].help  # every method reads it


def _table_after(page: str, heading: str) -> str:
    section = page.split(heading, 1)[1]
    return "\n".join(line for line in section.split("\n\n", 2)[1].splitlines() if line.startswith("|"))


def test_parameter_table_lists_every_config_field_and_nothing_else():
    table = _table_after(PARAMETERS, "## Parameters")
    names = set()
    for line in table.splitlines()[2:]:
        names |= set(re.findall(r"`([a-z_0-9]+)`", line.split("|")[1]))
    assert names == {f.name for f in dataclasses.fields(Config)}
    for field in dataclasses.fields(Config):  # the CLI spelling is shown where it differs
        if "_" in field.name:
            assert f"--{field.name.replace('_', '-')}" in PARAMETERS


def test_mlflow_page_lists_every_env_tag_the_code_records():
    import torch

    from amrepro import kernels
    from amrepro.provenance import environment

    documented = set(re.findall(r"`(env\.[a-z_]+)`", MLFLOW_PAGE))
    # the GEMM kernel's tags are logged after the science (commands/run.py), not by environment()
    assert documented == set(environment(torch.device("cpu"))) | {kernels.TAG, f"{kernels.TAG}_probe"}


# --- links: every relative link of the README and the docs/ pages resolves ----------------------------------
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def _outside_fences(text: str) -> str:
    """The text without fenced code blocks: a `# comment` in a bash block is not a heading."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _links(text: str) -> list[str]:
    return LINK.findall(re.sub(r"`[^`\n]*`", "", _outside_fences(text)))  # inline code holds no links


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to '-', repeats numbered -1, -2, ..."""
    anchors, count = set(), {}
    for line in _outside_fences(text).splitlines():
        heading = re.match(r"#{1,6} +(.+?) *$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            anchors.add(f"{slug}-{count[slug]}" if slug in count else slug)
            count[slug] = count.get(slug, 0) + 1
    return anchors


def broken_links(page: Path) -> list[str]:
    broken = []
    for link in _links(page.read_text()):
        if re.match(r"[a-z]+:", link):  # http(s), mailto: not checked here (no network in the suite)
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.is_file():
            broken.append(f"{link}: no file {target}")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target.read_text()):
            broken.append(f"{link}: no heading with anchor #{anchor} in {target.name}")
    return broken


def test_every_relative_link_and_image_resolves():
    assert len(PAGES) > 1 and sum(len(_links(p.read_text())) for p in PAGES) > 20  # the pages and their links exist
    broken = {p.name: b for p in PAGES if (b := broken_links(p))}
    assert not broken, broken


def test_the_link_check_catches_a_broken_file_and_a_broken_anchor(tmp_path):
    (tmp_path / "b.md").write_text("# Chance levels and the reference's 48/50\n\n## `--threads`: one\n\n"
                                   "## Tests\n\n## Tests\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#chance-levels-and-the-references-4850) [ok](b.md#--threads-one)\n"
                    "[ok](b.md#tests-1) ![ok](b.md)\n"  # a repeated heading's anchor is numbered
                    "`[code](nowhere.md)`\n```\n[code](nowhere.md)\n```\n"  # code is not checked
                    "[bad](c.md) [bad](b.md#no-such) ![bad](x.png)\n")
    assert [b.split(":")[0] for b in broken_links(page)] == ["c.md", "b.md#no-such", "x.png"]


def test_every_docs_page_is_one_link_away_from_the_readme():
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in _links((ROOT / "README.md").read_text())}
    assert {p.resolve() for p in PAGES[1:]} <= linked, "docs/ pages the README does not link"


def _expand_braces(name: str) -> set[str]:
    """`stats/{final,decoded}_activation_{mean,max}` -> the four names it stands for."""
    match = re.search(r"\{([^{}]+)\}", name)
    if not match:
        return {name}
    return {n for part in match.group(1).split(",")
            for n in _expand_braces(name[:match.start()] + part + name[match.end():])}


def test_mlflow_page_lists_every_stats_metric_a_parent_logs():
    import numpy as np

    from amrepro.metrics import reproducibility_stats

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(3, 2))  # [runs, pos]
    stats = reproducibility_stats(ids, rng.normal(size=(3, 2, 4)), [3.0, 2.0, 1.0], [1.0, 1.0, 0.5],
                                  np.full((3, 2), 0.5), ids, 50, n_boot=5, start_pool=rng.integers(0, 50, 64),
                                  activation=rng.normal(size=(20, 3)).cumsum(axis=0), n_null=5)
    logged = {k for k in stats["metrics"] if k.startswith("stats/")}
    documented = set().union(*(_expand_braces(n) for n in re.findall(r"`(stats/[^`]+)`", MLFLOW_PAGE)))
    assert logged - documented == set(), "stats/ metrics missing from docs/mlflow.md"
    assert documented - logged - {"stats/*"} == set(), "docs/mlflow.md names stats/ metrics that are not logged"


def test_mlflow_page_lists_the_parents_headline_metrics():
    from amrepro.parent_metrics import HEADLINE_METRICS

    section = MLFLOW_PAGE.split("## The parent's metrics and charts", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([a-z_]+/[a-z_/]+)`", section.split("| headline metric |", 1)[1].split("\n\n", 1)[0]))
    assert listed == set(HEADLINE_METRICS) and len(HEADLINE_METRICS) <= 13
