"""A ``bitsandbytes``-shaped module over pagedopt: ``optim``, ``functional``, ``nn``, ``utils``.

Code written for the bitsandbytes 0.49 optimizer API runs unchanged after changing its import::

    import pagedopt.compat.bitsandbytes as bnb   # instead of: import bitsandbytes as bnb

or, without touching the code, after :func:`install_alias` (``import bitsandbytes`` and
``from bitsandbytes.optim import AdamW8bit`` then load these modules). ``__version__`` is the
bitsandbytes API level implemented; ``pagedopt_version`` is pagedopt's. Only the 8-bit
optimizer surface is provided (no ``Linear8bitLt``/4-bit layers, no matmul functions).

Example:
    >>> import torch
    >>> import pagedopt.compat.bitsandbytes as bnb
    >>> emb = bnb.nn.StableEmbedding(100, 16)
    >>> opt = bnb.optim.Adam8bit(emb.parameters(), lr=1e-3, betas=(0.9, 0.995))
    >>> emb(torch.tensor([[1, 2]])).sum().backward(); opt.step()
    >>> codes, state = bnb.functional.quantize_blockwise(torch.randn(512))
    >>> bnb.__version__
    '0.49.0'
"""

from __future__ import annotations

import sys
from types import ModuleType

from ... import __version__ as pagedopt_version
from . import functional, nn, optim, utils
from .optim import ademamix, optimizer  # noqa: F401  (submodules bitsandbytes code imports)

__version__ = "0.49.0"

__all__ = ["functional", "nn", "optim", "utils", "install_alias", "uninstall_alias", "pagedopt_version"]

_ALIAS = "bitsandbytes"


def _own_modules() -> dict[str, ModuleType]:
    prefix = __name__
    return {name: module for name, module in list(sys.modules.items())
            if module is not None and (name == prefix or name.startswith(prefix + "."))}


def install_alias(replace: bool = False) -> ModuleType:
    """Make ``import bitsandbytes`` (and its submodules ``optim``, ``functional``, ``nn``,
    ``utils``, ``optim.optimizer``, ...) load this module. Opt-in, process-wide, reversible
    with :func:`uninstall_alias`. If a real ``bitsandbytes`` is already imported, raises
    unless ``replace=True`` (objects created from it keep using it).

    Example:
        >>> import pagedopt.compat.bitsandbytes as compat
        >>> had = "bitsandbytes" in __import__("sys").modules
        >>> _ = compat.install_alias(replace=True)
        >>> import bitsandbytes as bnb
        >>> bnb.optim.AdamW8bit is compat.optim.AdamW8bit
        True
        >>> compat.uninstall_alias()
    """
    existing = sys.modules.get(_ALIAS)
    this = sys.modules[__name__]
    if existing is this:
        return this  # already installed
    if existing is not None and existing is not this and not replace:
        raise RuntimeError(
            "bitsandbytes is already imported in this process (from "
            f"{getattr(existing, '__file__', '?')}); call install_alias() before anything imports it, "
            "or pass replace=True"
        )
    global _saved
    _saved = {k: v for k, v in sys.modules.items() if k == _ALIAS or k.startswith(_ALIAS + ".")}
    for name in list(_saved):
        del sys.modules[name]
    for name, module in _own_modules().items():
        alias = _ALIAS + name[len(__name__):]
        sys.modules[alias] = module
        _installed.append(alias)
    return this


_saved: dict[str, ModuleType] = {}
_installed: list[str] = []


def uninstall_alias() -> None:
    """Undo :func:`install_alias`: restore whatever ``bitsandbytes`` modules were loaded before."""
    for name in _installed:
        sys.modules.pop(name, None)
    _installed.clear()
    sys.modules.update(_saved)
    _saved.clear()
