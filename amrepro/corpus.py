"""Real text as the yardstick: the target's activation over every n_tokens window of a corpus (any UTF-8 text),
forward-only through the stop-at-block reader, in batches. Its maximum and 99th percentile say how far the
optimized tokens go beyond what text reaches; its top windows are the max-activating examples interpretability
users know from Neuronpedia.

A window is scored exactly as an optimized sequence is: its n_tokens tokens alone, from position 0 (no BOS,
no preceding context), mean activation over its positions.

The file is streamed: read and tokenized CHUNK_CHARS characters at a time (cut at a line end, so that no token
straddles two pieces), windows scored as they come, and only the running top windows, the activations (all of
them up to EXACT_WINDOWS, then the top 1% that the 99th percentile needs) and running sums kept. Memory does not
grow with the file (a 50 MB file once took 11.5 GB); --corpus-max-tokens bounds the time.
"""

from __future__ import annotations

import math
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .config import AmreproError
from .model import LoadedModel
from .readers import HookedReader, site_reader
from .targets import Target

BATCH = 512  # windows per forward
TOP = 20  # top windows kept for the artifact
CHUNK_CHARS = 1 << 20  # characters read and tokenized at a time
# Up to this many windows every activation is kept (32 MB of float64) and the statistics are numpy's over all
# of them; beyond it only the top 1% of the most windows the file can hold (exact 99th percentile) and sums.
EXACT_WINDOWS = 1 << 22
BINS = 40  # bins of the activation histogram (the dashboard draws it)
QUANTILES = (0.5, 0.9, 0.99, 0.999)  # with every activation kept (up to EXACT_WINDOWS windows)


def check(path: str) -> Path:
    """The corpus file, refused in one sentence before any run exists when it is missing, unreadable or not a
    regular file (a FIFO, /dev/zero or another device would be read forever or block)."""
    file = Path(path).expanduser()
    try:
        mode = os.stat(file).st_mode
        if stat.S_ISREG(mode):
            with open(file, "rb"):
                return file
    except FileNotFoundError:
        raise AmreproError(f"--corpus {path}: no such file.") from None
    except OSError as error:
        raise AmreproError(f"--corpus {path} cannot be read: {error.strerror}.") from None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
    raise AmreproError(f"--corpus {path} is {kind}, not a regular file: give a UTF-8 text file.")


def pieces(file: Path):
    """(text, bytes read so far) of the file, CHUNK_CHARS characters at a time, each cut after its last line end
    (the rest starts the next piece): tokenizers split words at line ends, so the pieces' tokens are the whole
    text's. A piece without a line end is cut where it stops."""
    rest = ""
    with open(file, encoding="utf-8") as f:
        while True:
            try:
                block = f.read(CHUNK_CHARS)
            except UnicodeDecodeError as error:
                raise AmreproError(f"--corpus {file} is not UTF-8 text ({error.reason} near byte "
                                   f"{f.buffer.tell()}).") from None
            text = rest + block
            if not block:
                if text:
                    yield text, f.buffer.tell()
                return
            cut = text.rfind("\n") + 1 or len(text)
            rest = text[cut:]
            yield text[:cut], f.buffer.tell()


def percentile99(top_ascending: np.ndarray, n: int) -> float:
    """numpy's percentile(values, 99) (linear method) from the largest values alone (ascending, at least the top
    1% + 2 of n): the two values it interpolates between are among them."""
    h = (n - 1) * 0.99
    lo = math.floor(h)
    offset = n - top_ascending.size  # full-array position of top_ascending[0]
    a, b, g = top_ascending[lo - offset], top_ascending[min(lo + 1, n - 1) - offset], h - lo
    return float(a + (b - a) * g if g < 0.5 else b - (b - a) * (1 - g))  # numpy's _lerp


class _Tally:
    """The running statistics of the windows' activations: max, mean, 99th percentile, top windows."""

    def __init__(self, top: int, most_windows: int):
        self.top, self.n, self.total = top, 0, 0.0
        self.exact = True  # every activation is held, until there are more than EXACT_WINDOWS
        self.keep = math.ceil(0.01 * most_windows) + 2  # then the largest ones the 99th percentile can need
        self.values: list[np.ndarray] = []  # then pruned to `keep` whenever it holds more than 2 x keep
        self.held = 0
        self.best_acts, self.best_starts = np.empty(0), np.empty(0, dtype=np.int64)
        self.best_ids: np.ndarray | None = None
        self.kept = 0  # most activation values held at once (the memory test reads it)

    def add(self, acts: np.ndarray, starts: np.ndarray, ids: np.ndarray) -> None:
        """acts [w] float64 of the windows ids [w, pos] that start at token starts [w]."""
        self.n += acts.size
        self.total += float(acts.sum())
        acts_all = np.concatenate([self.best_acts, acts])
        starts_all = np.concatenate([self.best_starts, starts])
        ids_all = ids if self.best_ids is None else np.concatenate([self.best_ids, ids])
        order = np.lexsort((starts_all, -acts_all))[:self.top]  # highest first, ties: the earlier window
        self.best_acts, self.best_starts, self.best_ids = acts_all[order], starts_all[order], ids_all[order]
        self.values.append(acts)
        self.held += acts.size
        self.kept = max(self.kept, self.held)
        if self.held > (EXACT_WINDOWS if self.exact else 2 * self.keep):  # from here on, only the largest values
            self.exact = False
            self._prune()

    def _prune(self) -> None:
        values = np.concatenate(self.values)
        if values.size > self.keep:
            values = np.partition(values, values.size - self.keep)[-self.keep:]
        self.values, self.held = [values], values.size

    def statistics(self) -> dict:
        if self.exact:  # numpy's statistics over every value, as before streaming
            acts = np.concatenate(self.values)
            counts, edges = np.histogram(acts, bins=BINS)  # for the dashboard, with the quantiles
            return {"max": float(acts.max()), "p99": float(np.percentile(acts, 99)), "mean": float(acts.mean()),
                    "quantiles": {f"{q:g}": float(np.quantile(acts, q)) for q in QUANTILES},
                    "histogram": {"counts": counts.tolist(), "edges": edges.tolist()}}
        self._prune()
        largest = np.sort(self.values[0])
        return {"max": float(largest[-1]), "p99": percentile99(largest, self.n), "mean": self.total / self.n}


def _yardsticks(lm: LoadedModel, read: Callable[[torch.Tensor], torch.Tensor], n: int, file: Path, n_tokens: int,
                max_tokens: int, top: int, on_progress: Callable[[float, int], None] | None) -> list[dict]:
    """yardstick() of the n targets whose activations read(x) gives: [b, n_tokens] (n = 1) or [b, n_tokens, n]."""
    size = max(file.stat().st_size, 1)
    budget = max_tokens or math.inf
    tallies = [_Tally(top, int(min(budget, size))) for _ in range(n)]  # a token is at least 1 byte
    E = lm.embedding
    carry = np.empty(0, dtype=np.int64)  # the last n_tokens - 1 tokens: windows run across pieces
    tokens = 0
    for text, offset in pieces(file):
        ids = np.asarray(lm.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)  # [n]
        ids = ids[: int(min(ids.size, budget - tokens))]
        start = tokens - carry.size  # the first window of this piece starts at this token
        tokens += ids.size
        sequence = np.concatenate([carry, ids])  # [carry + n]
        if sequence.size >= n_tokens:
            piece = torch.from_numpy(sequence).unfold(0, n_tokens, 1)  # [w, n_tokens]
            for lo in range(0, piece.shape[0], BATCH):
                batch = piece[lo:lo + BATCH]  # [b, n_tokens]
                acts = read(E[batch.to(E.device)]).mean(dim=1).cpu().numpy().astype(np.float64)  # [b] or [b, n]
                starts, windows = start + lo + np.arange(batch.shape[0]), batch.numpy()  # [b], [b, n_tokens]
                for t, tally in enumerate(tallies):
                    tally.add(acts.reshape(len(batch), n)[:, t], starts, windows)
        carry = sequence[-(n_tokens - 1):] if n_tokens > 1 else sequence[:0]
        if on_progress:
            on_progress(1.0 if tokens >= budget else min(offset / size, 1.0), tallies[0].n)
        if tokens >= budget:
            break
    if tallies[0].n == 0:
        raise AmreproError(f"the corpus has {tokens} tokens, fewer than --n-tokens {n_tokens}.")
    out = []
    for t, tally in enumerate(tallies):
        # the activation at each token of the top windows, for the dashboard's colours
        at = read(E[torch.from_numpy(tally.best_ids).to(E.device)]).reshape(len(tally.best_ids), n_tokens, n)
        at = at[..., t].cpu().numpy()  # [top, n_tokens]
        out.append({"n_windows": tally.n, "n_tokens": n_tokens, **tally.statistics(), "tokens_read": tokens,
                    "truncated": bool(max_tokens) and tokens >= max_tokens, "kept": tally.kept,
                    "top": [{"rank": k + 1, "start": int(s), "text": lm.tokenizer.decode(w.tolist()),
                             "tokens": lm.token_strings(w.tolist()), "ids": w.tolist(), "activation": float(a),
                             "positions": at[k].tolist()}
                            for k, (a, s, w) in enumerate(zip(tally.best_acts, tally.best_starts, tally.best_ids))]})
    return out


@torch.no_grad()
def yardstick(lm: LoadedModel, target: Target, file: Path, n_tokens: int, max_tokens: int = 0, top: int = TOP,
              on_progress: Callable[[float, int], None] | None = None) -> dict:
    """{n_windows, n_tokens, max, p99, mean, tokens_read, truncated, kept, top: [{rank, start, text, tokens, ids,
    activation, positions}]} of the windows of the corpus file (check()), streamed; at most max_tokens tokens are
    read (0: all). Up to EXACT_WINDOWS windows also quantiles and histogram {counts, edges}. positions: the
    activation at each token of a top window. on_progress(fraction done, windows so far) after each piece."""
    with site_reader(lm, target) as reader:
        return _yardsticks(lm, reader, 1, file, n_tokens, max_tokens, top, on_progress)[0]


@torch.no_grad()
def yardsticks(lm: LoadedModel, targets: list[Target], file: Path, n_tokens: int, max_tokens: int = 0,
               top: int = TOP, on_progress: Callable[[float, int], None] | None = None) -> list[dict]:
    """yardstick() of every target of one site at once: one forward per batch of windows, the targets'
    dimensions read off the whole site vector. Feature targets (an SAE latent, a direction) are refused: their
    readout needs its own reader (use yardstick)."""
    if not targets:
        return []
    if any(t.source for t in targets) or len({(t.block, t.site) for t in targets}) > 1:
        raise ValueError("yardsticks scores plain dimensions of one site; use yardstick for each other target")
    index = torch.tensor([t.index for t in targets], dtype=torch.long, device=lm.device)  # [T]
    with HookedReader(lm, targets[0]) as reader:
        def read(x: torch.Tensor) -> torch.Tensor:
            return reader.read_site(x)[..., index]  # [b, pos, width] -> [b, pos, T]

        return _yardsticks(lm, read, len(targets), file, n_tokens, max_tokens, top, on_progress)


def progress_printer(note: Callable[[str], None], every: float = 30.0) -> Callable[[float, int], None]:
    """on_progress for yardstick: a line at each 10% and at least every `every` seconds, with an ETA."""
    started, shown = time.monotonic(), {"step": 0, "at": time.monotonic()}

    def on_progress(fraction: float, n_windows: int) -> None:
        now = time.monotonic()
        if int(fraction * 10) > shown["step"] or now - shown["at"] >= every:
            shown.update(step=int(fraction * 10), at=now)
            left = (now - started) / fraction * (1 - fraction) if fraction > 0 else float("nan")
            note(f"corpus: {fraction:.0%} read, {n_windows} windows scored, {now - started:.0f} s elapsed, "
                 f"~{left:.0f} s left")

    return on_progress
