"""The on-disk cache of compiled CUDA kernels: where it is, what is in it, how big it may grow.

One entry per program and architecture: ``<cache>/<arch>/<program>-<key>.cubin`` and its JSON
sidecar ``.json`` (written by :mod:`pagedopt.backends.cuda_compiler`; the key hashes the
pagedopt version, the kernel sources, the NVRTC version, the architecture and the options, so
an upgrade never loads a stale cubin). This module needs neither cuda-python nor NVRTC, so
``pagedopt env`` and ``pagedopt kernels --list/--clear`` work anywhere.

* **Location.** ``$PAGEDOPT_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/pagedopt/kernels``, else
  ``~/.cache/pagedopt/kernels``.
* **Bounded.** After each new entry the cache is pruned to ``$PAGEDOPT_KERNEL_CACHE_MAX``
  (default 1 GiB; sizes like ``512MiB``, ``2GB`` or plain bytes; ``0`` keeps only the entry
  just written) by removing the least recently used entries. A cache hit refreshes the
  sidecar's modification time, which is what "recently used" means here (access times are
  unreliable: many clusters mount with ``noatime``).
* **Shared safely.** Files are written atomically (:mod:`pagedopt.fileio`); a reader that
  loses a race with pruning sees a miss and compiles again, never a torn file.

Example:
    >>> import os, tempfile
    >>> from pagedopt.backends import kernel_cache
    >>> os.environ["PAGEDOPT_KERNEL_CACHE"] = tempfile.mkdtemp()
    >>> kernel_cache.entries(), kernel_cache.total_bytes()
    ([], 0)
    >>> kernel_cache.parse_size("512MiB")
    536870912
    >>> del os.environ["PAGEDOPT_KERNEL_CACHE"]
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..fileio import TEMP_PREFIX

CACHE_ENV = "PAGEDOPT_KERNEL_CACHE"
MAX_ENV = "PAGEDOPT_KERNEL_CACHE_MAX"
DEFAULT_MAX_BYTES = 1 << 30
STALE_TEMP_SECONDS = 3600.0  # a writer's temporary older than this was left by a killed process

_UNITS = {
    "": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*$")
_ENTRY_RE = re.compile(r"^(?P<program>.+)-(?P<key>[0-9a-f]{32})$")


def parse_size(text: str, *, name: str = MAX_ENV) -> int:
    """``"512MiB"`` -> 536870912, ``"2GB"`` -> 2000000000, ``"1048576"`` -> 1048576."""
    match = _SIZE_RE.match(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{name}={text!r} is not a size (examples: 1073741824, 512MiB, 2GiB, 1.5GB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def cache_dir() -> Path:
    """The cache directory (it may not exist yet)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pagedopt" / "kernels"


def max_bytes() -> int:
    """The size bound: ``$PAGEDOPT_KERNEL_CACHE_MAX`` or 1 GiB."""
    text = os.environ.get(MAX_ENV, "").strip()
    return parse_size(text) if text else DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class CacheEntry:
    """One cached program for one architecture (a cubin and its JSON sidecar)."""

    arch: str
    program: str
    key: str  # the first 32 hex digits of the cache key
    cubin: Path
    sidecar: Path
    bytes: int
    last_used: float  # seconds since the epoch (the sidecar's modification time)

    def describe(self) -> dict[str, object]:
        """What ``pagedopt kernels --list`` and ``pagedopt env`` print about the entry."""
        info: dict[str, object] = {
            "arch": self.arch, "program": self.program, "key": self.key, "bytes": self.bytes,
            "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_used)),
        }
        try:
            meta = json.loads(self.sidecar.read_text())
        except (OSError, ValueError):
            return info
        for field in ("pagedopt", "nvrtc"):
            if field in meta:
                info[field] = meta[field]
        return info


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def entries(directory: Path | None = None) -> list[CacheEntry]:
    """Every complete entry (cubin and sidecar present), least recently used first."""
    root = directory or cache_dir()
    out = []
    for sidecar in sorted(root.glob("*/*.json")):
        match = _ENTRY_RE.match(sidecar.stem)
        cubin = sidecar.with_suffix(".cubin")
        if not match or not cubin.is_file():
            continue
        try:
            last_used = sidecar.stat().st_mtime
        except OSError:
            continue  # pruned by another process a moment ago
        out.append(CacheEntry(
            arch=sidecar.parent.name, program=match["program"], key=match["key"], cubin=cubin, sidecar=sidecar,
            bytes=_size(cubin) + _size(sidecar), last_used=last_used,
        ))
    out.sort(key=lambda e: (e.last_used, e.arch, e.program))
    return out


def total_bytes(directory: Path | None = None) -> int:
    """Bytes of every file under the cache directory (entries, locks, leftovers)."""
    root = directory or cache_dir()
    if not root.is_dir():
        return 0
    return sum(_size(p) for p in root.rglob("*") if p.is_file())


def mark_used(sidecar: Path) -> None:
    """Record a cache hit for LRU pruning; a read-only cache simply keeps its old times."""
    with contextlib.suppress(OSError):
        os.utime(sidecar)


@contextlib.contextmanager
def file_lock(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Exclusive lock on ``path`` (POSIX ``flock``); yields whether it was acquired.

    Non-blocking callers get ``False`` when another process holds it. Where ``fcntl`` is
    unavailable the lock is a no-op that yields ``True``: compiling twice is only slower.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield True
        return
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove(entry: CacheEntry) -> int:
    freed = 0
    for path in (entry.sidecar, entry.cubin):  # sidecar first: a reader then sees a miss
        size = _size(path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            freed += size
    return freed


def _remove_stale_temporaries(root: Path, now: float) -> int:
    freed = 0
    for tmp in root.glob(f"*/{TEMP_PREFIX}*"):
        with contextlib.suppress(OSError):
            stat = tmp.stat()
            if now - stat.st_mtime > STALE_TEMP_SECONDS:
                tmp.unlink()
                freed += stat.st_size
    return freed


def prune(limit: int | None = None, *, keep: tuple[Path, ...] = (), directory: Path | None = None) -> list[CacheEntry]:
    """Remove least recently used entries until the cache holds at most ``limit`` bytes.

    ``limit`` defaults to :func:`max_bytes`; entries whose sidecar is in ``keep`` (the one a
    process just wrote and is about to load) stay. One process prunes at a time; a process
    that finds another pruning skips. Returns the removed entries.
    """
    root = directory or cache_dir()
    limit = max_bytes() if limit is None else int(limit)
    if not root.is_dir():
        return []
    removed: list[CacheEntry] = []
    with contextlib.suppress(OSError), file_lock(root / ".prune.lock", blocking=False) as acquired:
        if not acquired:
            return []
        _remove_stale_temporaries(root, time.time())
        total = total_bytes(root)
        kept = {Path(p) for p in keep}
        for entry in entries(root):
            if total <= limit:
                break
            if entry.sidecar in kept:
                continue
            total -= _remove(entry)
            removed.append(entry)
    return removed


def clear(directory: Path | None = None) -> tuple[int, int]:
    """Remove every entry and leftover file; returns ``(entries removed, bytes freed)``."""
    root = directory or cache_dir()
    if not root.is_dir():
        return 0, 0
    count = 0
    freed = 0
    for entry in entries(root):
        freed += _remove(entry)
        count += 1
    for path in sorted(root.rglob("*"), reverse=True):  # leftovers, then empty arch directories
        with contextlib.suppress(OSError):
            if path.is_file():
                size = _size(path)
                path.unlink()
                freed += size
            elif path.is_dir():
                path.rmdir()
    return count, freed
