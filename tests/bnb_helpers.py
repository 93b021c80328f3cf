"""The installed bitsandbytes, for side-by-side tests (skipped with a reason when it does not
import on this machine)."""

from __future__ import annotations

import functools

import pytest


@functools.lru_cache(maxsize=1)
def _load():
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
        import bitsandbytes.optim  # noqa: F401
    except (ImportError, RuntimeError, AttributeError, OSError) as exc:  # its native library or extras
        return None, f"bitsandbytes does not import here: {type(exc).__name__}: {exc}"
    return bitsandbytes, None


def bnb_or_skip():
    """The ``bitsandbytes`` module, or skip the test naming why."""
    module, reason = _load()
    if module is None:
        pytest.skip(reason)
    return module


def bnb_version() -> tuple[int, int]:
    module = bnb_or_skip()
    major, minor = module.__version__.split(".")[:2]
    return int(major), int(minor)
