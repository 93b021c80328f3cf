"""The training corpus: text files read as raw bytes (vocabulary 256), split by file.

The default corpus is the running interpreter's own standard library source
(``sysconfig.get_paths()["stdlib"]``): it is on every machine, needs no download and is
real, varied code. Files are taken in a fixed pseudo-random order (a hash of each relative
path, so a size cap samples the whole tree rather than the first letters of the alphabet)
until ``max_bytes``; a second hash of the path picks the files held out for validation (about
``val_fraction`` of the bytes), so a file is never in both splits. The same interpreter always gives the same
corpus; a different Python version gives a different one.

Example:
    >>> from pagedopt.train.data import load_corpus, BatchSampler
    >>> corpus = load_corpus(max_bytes=200_000)
    >>> corpus.train.dtype, corpus.split, len(corpus.val) < len(corpus.train)
    (torch.uint8, 'by file', True)
    >>> x, y = BatchSampler(corpus.train, batch_size=2, seq_len=8, seed=0).next_batch()
    >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
    (torch.Size([2, 8]), True)
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 256
# Third-party code and caches live under the stdlib directory but are not the stdlib.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
# Files are joined with a blank line so a window may span a file boundary without gluing
# two lines of code together.
FILE_SEPARATOR = b"\n\n"


class DataError(ValueError):
    """The corpus cannot be read or is too small; the message names the path or setting.

    Example:
        >>> load_corpus("/no/such/dir")
        Traceback (most recent call last):
        ...
        pagedopt.train.data.DataError: data: '/no/such/dir' does not exist
    """


@dataclass
class Corpus:
    """Train and validation bytes (1-D ``uint8`` tensors) and where they came from.

    Example:
        >>> corpus = load_corpus(max_bytes=100_000)
        >>> corpus.describe().startswith("Python ")
        True
    """

    train: torch.Tensor
    val: torch.Tensor
    source: str
    train_files: int
    val_files: int
    split: str  # "by file", or "by bytes" for a single file

    def describe(self) -> str:
        if self.split == "by file":
            held_out = f"{self.val_files} files held out"
        else:
            held_out = "the last bytes of the file"
        return (f"{self.source}: {len(self.train):,} train bytes ({self.train_files} files), "
                f"{len(self.val):,} validation bytes ({held_out})")


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def _digest(tag: str, rel: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{tag}:{rel}".encode()).digest()[:8], "big")


def list_files(root: Path, pattern: str) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of files under ``root`` matching ``pattern``, in the
    corpus order (hash of the relative path; deterministic across runs and machines)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in filenames:
            if fnmatch.fnmatch(name, pattern):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: (_digest("order", item[0]), item[0]))
    return found


def _validation_files(chosen: list[tuple[str, bytes]], val_fraction: float) -> set[str]:
    """Relative paths held out: files in the order of a second path hash until they hold
    ``val_fraction`` of the bytes (at least one file, never all of them)."""
    if len(chosen) < 2:
        return set()
    target = val_fraction * sum(len(chunk) for _, chunk in chosen)
    held_out: set[str] = set()
    size = 0
    for rel, chunk in sorted(chosen, key=lambda item: (_digest("split", item[0]), item[0])):
        if size >= target or len(held_out) == len(chosen) - 1:
            break
        held_out.add(rel)
        size += len(chunk)
    return held_out


def load_corpus(data: str | os.PathLike | None = None, pattern: str = "*.py", max_bytes: int = 4_000_000,
                val_fraction: float = 0.05) -> Corpus:
    """Read the corpus: ``data`` (a file or a directory searched recursively for
    ``pattern``) or, when ``None``, the standard library sources.

    Raises :class:`DataError` naming ``data`` when there is nothing to read.
    """
    if data is None:
        root, source = stdlib_root(), f"Python {sysconfig.get_python_version()} standard library ({stdlib_root()})"
    else:
        root, source = Path(data), str(data)
        if not root.exists():
            raise DataError(f"data: {str(data)!r} does not exist")
    if root.is_file():
        files = [(root.name, root)]
    else:
        files = list_files(root, pattern)
        if not files:
            raise DataError(f"data: no files matching {pattern!r} under {str(root)!r}")
    chosen: list[tuple[str, bytes]] = []
    remaining = max_bytes
    for rel, path in files:
        if remaining <= 0:
            break
        try:
            chunk = path.read_bytes()[:remaining]
        except OSError as exc:
            raise DataError(f"data: cannot read {str(path)!r}: {exc.strerror or exc}") from exc
        remaining -= len(chunk)
        chosen.append((rel, chunk))
    held_out = _validation_files(chosen, val_fraction)
    train_parts = [chunk for rel, chunk in chosen if rel not in held_out]
    val_parts = [chunk for rel, chunk in chosen if rel in held_out]
    if train_parts and val_parts:
        train, val, split = FILE_SEPARATOR.join(train_parts), FILE_SEPARATOR.join(val_parts), "by file"
    else:
        # A single file: hold out the tail of its bytes instead.
        everything = FILE_SEPARATOR.join(train_parts + val_parts)
        cut = len(everything) - int(len(everything) * val_fraction)
        train, val, split = everything[:cut], everything[cut:], "by bytes"
    return Corpus(
        train=torch.frombuffer(bytearray(train), dtype=torch.uint8) if train else torch.empty(0, dtype=torch.uint8),
        val=torch.frombuffer(bytearray(val), dtype=torch.uint8) if val else torch.empty(0, dtype=torch.uint8),
        source=source,
        train_files=len(train_parts),
        val_files=len(val_parts),
        split=split,
    )


def check_split_size(name: str, data: torch.Tensor, seq_len: int) -> None:
    """A split must hold at least one window of ``seq_len + 1`` bytes."""
    if len(data) < seq_len + 1:
        raise DataError(
            f"the {name} split has {len(data):,} bytes, fewer than seq_len + 1 = {seq_len + 1}; "
            f"use a larger corpus (max_corpus_bytes, data) or a shorter seq_len"
        )


class BatchSampler:
    """Random windows of ``seq_len + 1`` bytes: inputs are the first ``seq_len`` bytes,
    targets the last ``seq_len`` (next-byte prediction).

    ``seed`` and ``rank`` select an independent stream (each data-parallel rank draws its own
    windows). Batches are built on the CPU and moved to ``device`` (pinned, non-blocking on CUDA).

    Example:
        >>> import torch
        >>> data = torch.arange(100, dtype=torch.uint8)
        >>> x, y = BatchSampler(data, batch_size=1, seq_len=4, seed=0).next_batch()
        >>> (y - x).tolist()
        [[1, 1, 1, 1]]
    """

    def __init__(self, data: torch.Tensor, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                 device: torch.device | str = "cpu") -> None:
        check_split_size("train", data, seq_len)
        self.data = data
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed * 100_003 + rank)
        self._window = torch.arange(seq_len + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.data) - self.seq_len, (self.batch_size,), generator=self.generator)
        return windows_to_batch(self.data, starts, self._window, self.device)


def eval_batches(data: torch.Tensor, batch_size: int, seq_len: int, num_batches: int,
                 device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: ``num_batches`` batches of windows spread evenly over ``data``
    (independent of the seed, so validation losses of different runs are comparable)."""
    check_split_size("validation", data, seq_len)
    count = batch_size * num_batches
    starts = torch.linspace(0, len(data) - seq_len - 1, count).long()
    window = torch.arange(seq_len + 1)
    return [windows_to_batch(data, s, window, torch.device(device)) for s in starts.split(batch_size)]


def windows_to_batch(data: torch.Tensor, starts: torch.Tensor, window: torch.Tensor,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = data[starts[:, None] + window].long()
    if device.type == "cuda":
        tokens = tokens.pin_memory().to(device, non_blocking=True)
    else:
        tokens = tokens.to(device)
    return tokens[:, :-1], tokens[:, 1:]
