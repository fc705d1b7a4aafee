"""Load a Hugging Face transformer by name or path (the real `from_pretrained` path), frozen, in eval mode,
and describe it generically: its block list, its token-embedding matrix, its sizes."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

import torch

from .config import AmreproError


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module  # the HF base model (e.g. GPT2Model), eval(), no weight gradients
    tokenizer: object
    blocks: torch.nn.ModuleList  # the transformer blocks, in order
    device: torch.device

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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise AmreproError("--device cuda was asked for, but torch sees no CUDA device here.")
    return torch.device(device)


def _looks_like_path(name: str) -> bool:
    """A Hub id is 'name' or 'owner/name'; anything else (./x, /x, ~/x, a/b/c) can only be a local path."""
    return not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or name.startswith((".", "~"))


def load_model(name: str, device: torch.device) -> LoadedModel:
    """AutoModel.from_pretrained(name): for 'gpt2' this is GPT2Model.from_pretrained('gpt2')."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise AmreproError(f"'{name}' is a folder but not a saved model (it has no config.json).")
    elif _looks_like_path(name) or os.path.exists(path):
        raise AmreproError(f"no model folder at '{name}': the local path does not exist.")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    # An unreachable Hub would cost ~25 s of retries per file; probe it once, then use only the cache.
    reachable = os.path.isdir(path) or offline or _hub_reachable()
    try:
        # eager attention: plain matmul + softmax, deterministic on every device.
        model = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                          local_files_only=not reachable)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=not reachable)
    except Exception as error:  # noqa: BLE001 - HF raises OSError, ValueError, HTTP errors...
        if os.path.isdir(path):
            raise AmreproError(f"could not load the model saved in '{name}': {_first_line(error)}") from None
        if offline:
            why = "HF_HUB_OFFLINE is set, so only the local cache was searched, and it is not there"
        elif not reachable:
            why = "the Hugging Face Hub is unreachable and the model is not in the local cache"
        else:
            why = f"the Hugging Face Hub has no such model or refused it ({_first_line(error)})"
        raise AmreproError(f"could not load model '{name}': {why}; pass a local folder with --model PATH "
                           "(HF_HUB_OFFLINE=1 skips the Hub).") from None
    model.eval().to(device)
    model.requires_grad_(False)  # no weight gradients: only the input embeddings are optimized
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, blocks=find_blocks(model), device=device)


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
