"""Load a Hugging Face transformer by name, folder or GGUF file (the real `from_pretrained` path), frozen, in
eval mode, and describe it generically: its block list, its token-embedding matrix, its sizes, and a fingerprint
of its weights."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch

from .config import AmreproError

Note = Callable[[str], None]  # how the loader tells the user something (the CLI prints it; tests collect it)


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module  # the HF base model (e.g. GPT2Model), eval(), no weight gradients
    tokenizer: object
    blocks: torch.nn.ModuleList  # the transformer blocks, in order
    device: torch.device
    source: str = "hub"  # hub | folder | gguf
    file_sha256: str = ""  # of the .gguf file, for source gguf
    revision: str = ""  # the Hub commit the weights came from, for source hub
    _weights_sha256: str | None = field(default=None, repr=False, compare=False)

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def embedding(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight  # [vocab, d_model]

    @property
    def d_model(self) -> int:
        return self.embedding.shape[1]

    def embedding_std(self) -> float:
        """std(wte) as the reference computes it (unbiased, float32), always on the CPU so that the initial
        embeddings are bit-identical whatever device the run uses."""
        return float(self.embedding.detach().float().cpu().std())

    def token_strings(self, ids) -> list[str]:
        """Each id decoded alone, as the reference prints them (' sup', not 'Ġsup')."""
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def fingerprint(self) -> dict[str, str]:
        """Tags that name the weights a run used. weights_sha256 hashes the loaded tensors themselves (names,
        dtypes, shapes, bytes), so it changes with any weight, whatever file format or source they came from."""
        if self._weights_sha256 is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items(), key=lambda item: item[0]):
                t = tensor.detach().to("cpu").contiguous().reshape(-1)
                digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
                digest.update(t.view(torch.uint8).numpy())  # the raw bytes, without a copy
            self._weights_sha256 = digest.hexdigest()
        return {"model.weights_sha256": self._weights_sha256, "model.source": self.source,
                "model.file_sha256": self.file_sha256, "model.revision": self.revision}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise AmreproError("--device cuda was asked for, but torch sees no CUDA device here.")
    return torch.device(device)


def _looks_like_path(name: str) -> bool:
    """A Hub id is 'name' or 'owner/name'; anything else (./x, /x, ~/x, a/b/c) can only be a local path."""
    return not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or name.startswith((".", "~"))


def load_model(name: str, device: torch.device, note: Note | None = None) -> LoadedModel:
    """AutoModel.from_pretrained(name): for 'gpt2' this is GPT2Model.from_pretrained('gpt2'). A path ending in
    .gguf is de-quantized to float32 once and cached (see load_gguf); note(text) hears about that."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = os.path.expanduser(name)
    if path.lower().endswith(".gguf"):
        model, tokenizer, file_sha256 = load_gguf(name, note or (lambda text: None))
        return _ready(name, model, tokenizer, device, source="gguf", file_sha256=file_sha256)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise AmreproError(f"'{name}' is a folder but not a saved model (it has no config.json).")
        return _ready(name, *_from_pretrained(name, path), device, source="folder")
    if os.path.exists(path):
        raise AmreproError(f"'{name}' is a file, not a model: --model takes a Hugging Face model id, a folder "
                           "written by save_pretrained, or a .gguf file.")
    if _looks_like_path(name):
        raise AmreproError(f"no model folder at '{name}': the local path does not exist.")
    # An unreachable Hub would cost ~25 s of retries per file; probe it once, then use only the cache.
    hub = "offline" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else (
        "online" if _hub_reachable() else "unreachable")
    model, tokenizer = _from_pretrained(name, path, hub)
    return _ready(name, model, tokenizer, device, source="hub", revision=_hub_revision(name, model))


def _from_pretrained(name: str, path: str, hub: str = "offline"):
    """hub: 'online', 'offline' (HF_HUB_OFFLINE, or a local folder) or 'unreachable'."""
    from transformers import AutoModel, AutoTokenizer

    local_files_only = hub != "online"
    try:
        # eager attention: plain matmul + softmax, deterministic on every device.
        model = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                          local_files_only=local_files_only)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
    except Exception as error:  # noqa: BLE001 - HF raises OSError, ValueError, HTTP errors...
        if os.path.isdir(path):
            raise AmreproError(f"could not load the model saved in '{name}': {_first_line(error)}") from None
        why = {"offline": "HF_HUB_OFFLINE is set, so only the local cache was searched, and it is not there",
               "unreachable": "the Hugging Face Hub is unreachable and the model is not in the local cache",
               "online": f"the Hugging Face Hub has no such model or refused it ({_first_line(error)})"}[hub]
        # under `mlflow run` the user types -P model=PATH, not --model PATH
        option = "-P model=PATH" if os.environ.get("MLFLOW_RUN_ID") else "--model PATH"
        hint = "" if hub == "offline" else " (HF_HUB_OFFLINE=1 skips the Hub)"
        raise AmreproError(f"could not load model '{name}': {why}; pass a local folder or .gguf file with "
                           f"{option}{hint}.") from None
    return model, tokenizer


def _ready(name, model, tokenizer, device, **provenance) -> LoadedModel:
    model.eval().to(device)
    model.requires_grad_(False)  # no weight gradients: only the input embeddings are optimized
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, blocks=find_blocks(model), device=device,
                       **provenance)


def _hub_revision(name: str, model) -> str:
    """The commit the Hub cache holds for this model (its snapshot folder is named by it), or ''."""
    if getattr(model.config, "_commit_hash", None):  # transformers 4.x records it on the config
        return str(model.config._commit_hash)
    try:
        from huggingface_hub import try_to_load_from_cache

        config_file = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - provenance is best effort; the load itself succeeded
        return ""
    if isinstance(config_file, str) and Path(config_file).parent.parent.name == "snapshots":
        return Path(config_file).parent.name
    return ""


# --- GGUF: de-quantized to float32 once, then read back from a cache ----------------------------------------

def gguf_cache_root() -> Path:
    return Path(os.environ.get("AMREPRO_CACHE") or "~/.cache/amrepro").expanduser() / "gguf"


def load_gguf(name: str, note: Note):
    """(model, tokenizer, sha256 of the file). De-quantizing a GGUF file takes ~15 s, so the float32 model and
    its tokenizer are saved once into <cache>/<sha256> (keyed by content: a renamed or moved file still hits
    the cache, a changed one misses it). The cache folder is written under a temporary name and renamed, so a
    half-written cache is never visible, even to a concurrent process."""
    from transformers import AutoModel, AutoTokenizer

    path = os.path.expanduser(name)
    if not os.path.isfile(path):
        raise AmreproError(f"no GGUF file at '{name}': the local path does not exist or is not a file.")
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        if file.read(4) != b"GGUF":
            raise AmreproError(f"'{name}' is not a GGUF file (it does not start with the GGUF magic bytes).")
        file.seek(0)
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    file_sha256 = digest.hexdigest()
    cached = gguf_cache_root() / file_sha256
    if cached.is_dir():
        try:
            model, tokenizer = _from_pretrained(str(cached), str(cached))
        except AmreproError as error:
            raise AmreproError(f"the GGUF cache {cached} of '{name}' is unreadable ({error}); delete that folder "
                               "to convert the file again.") from None
        note(f"loaded {os.path.basename(path)} from the GGUF cache {cached}")
        return model, tokenizer, file_sha256

    note(f"converting {os.path.basename(path)} to float32 (once, ~15 s); cached in {cached}")
    folder, filename = os.path.split(os.path.abspath(path))
    try:  # plain float32 Linear layers, even where transformers 5 would keep GGUF blocks packed for its own kernel
        from transformers import GgufConfig

        dequantized = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older transformers always de-quantize and know no GgufConfig
        dequantized = {}
    try:
        with _gguf_parsed_once():
            model = AutoModel.from_pretrained(folder, gguf_file=filename, dtype=torch.float32,
                                              attn_implementation="eager", local_files_only=True, **dequantized)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - gguf and transformers raise many kinds on a bad file
        raise AmreproError(f"could not read the GGUF file '{name}' (corrupt, truncated, or an architecture "
                           f"transformers cannot convert): {_first_line(error)}") from None
    try:
        write_atomically(cached, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    except Exception as error:  # noqa: BLE001 - a cache that cannot be written costs time next load, not this run
        note(f"could not write the GGUF cache {cached} ({_first_line(error)}); the next load converts again")
    return model, tokenizer, file_sha256


@contextlib.contextmanager
def _gguf_parsed_once():
    """While converting: every `gguf.GGUFReader(path)` of the same file is one reader, and every
    `gguf.get_tensor_name_map(arch, n_blocks)` one map. transformers reads the file three times (config, weights,
    tokenizer; each read builds Python objects for the 49k-entry vocabulary) and builds the name map once per
    submodule: half of a SmolLM2 conversion (31 s -> 14 s here). The one reader also parses over a plain ndarray
    view of its memory map (_plain_array_reader: 2.0 -> 0.6 s of CPU, AMD EPYC). Both read the same bytes
    read-only, so the converted model is byte-identical; the originals are put back afterwards, even on an error."""
    import functools

    import gguf

    # transformers imports both by name from gguf inside its functions, so replacing the module's attributes is
    # enough; a gguf release without one of them keeps the rest
    originals = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map") if hasattr(gguf, name)}
    try:
        for name, original in originals.items():
            setattr(gguf, name, functools.cache(_plain_array_reader(original) if name == "GGUFReader" else original))
        yield
    finally:
        for name, original in originals.items():
            setattr(gguf, name, original)


def _plain_array_reader(reader: type) -> type:
    """gguf's reader class, storing the np.memmap it opens as a plain ndarray view of the same mapping (the
    view keeps the map open). gguf slices it once per field part (~1.3 M slices for the vocabulary), and a
    memmap's slices run numpy's Python-level subclass hooks; a plain ndarray's do not."""
    import numpy as np

    class PlainArrayReader(reader):
        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, value):
            self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return PlainArrayReader


def write_atomically(folder: Path, write: Callable[[Path], object]) -> None:
    """write(tmp) fills a temporary folder next to `folder`, which is then renamed into place: a reader sees the
    whole folder or none. If another process renamed its copy there first, theirs is kept and ours dropped."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(partial)
        os.rename(partial, folder)  # atomic on one file system; fails when `folder` already exists
    except OSError:
        if not folder.is_dir():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def find_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList holding num_hidden_layers blocks (GPT-2 `h`, BERT `encoder.layer`, GPT-NeoX `layers`)."""
    n_layers = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise AmreproError(f"could not find the {n_layers} transformer blocks of {type(model).__name__}.")


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
