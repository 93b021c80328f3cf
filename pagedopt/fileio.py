"""Atomic file writes: the one way pagedopt writes a file.

Every file pagedopt writes (checkpoints, JSON summaries, kernel-cache entries, written
configs) goes through :func:`atomic_write`: the bytes go to a temporary file in the target's
directory, are flushed and fsynced, then renamed over the target, and the directory is
fsynced so the rename itself survives a power cut. A reader therefore sees the old file or
the new one, never a torn one, and a failure (full disk, permission, a kill) leaves the
previous file intact and removes the temporary.

Example:
    >>> import json, tempfile, pathlib
    >>> from pagedopt.fileio import atomic_write, atomic_write_text
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write_text(d / "run.json", json.dumps({"step": 7}))
    >>> with atomic_write(d / "blob.bin") as f:
    ...     _ = f.write(b"\\x00\\x01")
    >>> sorted(p.name for p in d.iterdir())
    ['blob.bin', 'run.json']
"""

from __future__ import annotations

import contextlib
import errno as errno_module
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

TEMP_PREFIX = ".pagedopt-tmp-"


class AtomicWriteError(OSError):
    """Writing ``path`` failed; the previous file (if any) is intact.

    ``str(err)`` is one line naming the path and the errno, e.g.
    ``cannot write /ckpt/step-10.pt: [Errno 28] No space left on device``.
    """

    def __init__(self, path: Path, cause: OSError):
        code = cause.errno if cause.errno is not None else errno_module.EIO
        super().__init__(code, cause.strerror or str(cause), str(path))
        self.path = Path(path)
        self.cause = cause

    def __str__(self) -> str:
        name = errno_module.errorcode.get(self.errno, "EIO")
        return f"cannot write {self.path}: [Errno {self.errno}] {self.strerror} ({name})"


def fsync_directory(directory: Path) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # e.g. Windows: directories cannot be opened; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (tmpfs on old kernels) refuse fsync on directories
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on a clean exit, make it ``path`` atomically.

    ``mode`` is ``"wb"`` or ``"w"`` (text, UTF-8). If the body raises, the temporary is
    removed and the exception propagates; ``OSError`` from writing, syncing or renaming is
    raised as :class:`AtomicWriteError` naming ``path``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX + target.name + ".", dir=directory)
    except OSError as err:
        raise AtomicWriteError(target, err) from err
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints are shared like any file
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and not isinstance(err, AtomicWriteError):
            raise AtomicWriteError(target, err) from err
        raise
    fsync_directory(directory)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_save(obj: Any, path: str | os.PathLike[str], save: Callable[[Any, IO[bytes]], None] | None = None) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write` (or ``save(obj, file)`` if given).

    torch wraps some ``OSError``\\ s (a full disk) in ``RuntimeError``; those are reported as
    :class:`AtomicWriteError` too when the file system is the cause.
    """
    if save is None:
        import torch

        save = torch.save
    with atomic_write(path, "wb") as f:
        try:
            save(obj, f)
        except RuntimeError as err:
            # torch's zip writer reports write failures as RuntimeError; recover the errno.
            if "write" in str(err).lower() or "enforce fail" in str(err):
                code = _errno_after_failed_write(f)
                raise OSError(code, os.strerror(code)) from err
            raise


def _errno_after_failed_write(f: IO[bytes]) -> int:
    """Probe the file once more to learn why torch's writer failed (ENOSPC, EFBIG, ...)."""
    try:
        f.write(b"\0")
        f.flush()
        os.fsync(f.fileno())
    except OSError as err:
        return err.errno or errno_module.EIO
    return errno_module.EIO


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> int:
    """Delete temporaries a killed writer left in ``directory``; returns how many."""
    removed = 0
    for entry in Path(directory).glob(TEMP_PREFIX + "*"):
        with contextlib.suppress(OSError):
            entry.unlink()
            removed += 1
    return removed
