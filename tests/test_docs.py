"""Knowledge written once: the CLI, MLproject and the README are checked against Config and the code, so they
cannot drift apart silently."""

import dataclasses
import re
from pathlib import Path

import typer

from amrepro.cli import app
from amrepro.config import Config, help_for

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _run_options() -> dict:
    command = typer.main.get_command(app).commands["run"]
    return {p.name: p for p in command.params}


def test_every_config_field_is_a_run_option_with_its_default_and_help():
    options = _run_options()
    for field in dataclasses.fields(Config):
        assert field.name in options, f"--{field.name.replace('_', '-')} missing from `amrepro run`"
        option = options[field.name]
        assert option.default == field.default, field.name
        assert option.help == help_for(field.name), field.name
        assert f"--{field.name.replace('_', '-')}" in option.opts
    extra = set(options) - {f.name for f in dataclasses.fields(Config)}
    assert extra <= {"experiment"}, f"options that bypass Config: {extra}"


def _table_after(heading: str) -> str:
    section = README.split(heading, 1)[1]
    return "\n".join(line for line in section.split("\n\n", 2)[1].splitlines() if line.startswith("|"))


def test_readme_parameter_table_lists_every_config_field_and_nothing_else():
    table = _table_after("### Parameters")
    names = set()
    for line in table.splitlines()[2:]:
        names |= set(re.findall(r"`([a-z_0-9]+)`", line.split("|")[1]))
    assert names == {f.name for f in dataclasses.fields(Config)}
    for field in dataclasses.fields(Config):  # the CLI spelling is shown where it differs
        if "_" in field.name:
            assert f"--{field.name.replace('_', '-')}" in README


def test_readme_lists_every_env_tag_the_code_records():
    import torch

    from amrepro.provenance import environment

    documented = set(re.findall(r"`(env\.[a-z_]+)`", README))
    assert documented == set(environment(torch.device("cpu")))
