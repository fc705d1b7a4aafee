"""Tiny random models written with save_pretrained, so tests load them through the same from_pretrained
path as 'gpt2'."""

from __future__ import annotations

from pathlib import Path

CORPUS = ("the quick brown fox jumps over the lazy dog. activation maximization finds inputs that excite "
          "a neuron. is it reproducible? sup TheNitromeFan hello world 0123456789 ") * 20


def tiny_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CORPUS], vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    return GPT2TokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>")


def write_tiny_gpt2(folder: Path, n_layer: int = 10, n_embd: int = 32, n_head: int = 4, seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2Model

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2Model(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


if __name__ == "__main__":  # python tests/tiny.py FOLDER: a tiny random GPT-2 to try amrepro offline
    import sys

    print(write_tiny_gpt2(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-gpt2")))
