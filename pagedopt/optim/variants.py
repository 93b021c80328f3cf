"""The five fixed variants of every optimizer: ``X8bit``, ``X32bit``, ``PagedX``, ``PagedX8bit``,
``PagedX32bit``.

Each variant is a subclass that pins ``optim_bits`` and/or ``is_paged``. Its signature is the
base class's (so bitsandbytes code that passes those arguments keeps working), but passing a
*conflicting* value raises instead of being silently ignored as in bitsandbytes.

Example:
    >>> import torch, pagedopt
    >>> p = torch.nn.Parameter(torch.zeros(4))
    >>> pagedopt.Adam8bit([p], optim_bits=32)
    Traceback (most recent call last):
    ...
    ValueError: Adam8bit always uses optim_bits=8; got optim_bits=32 (use Adam(optim_bits=32) instead)
"""

from __future__ import annotations

import inspect
from typing import Any

VARIANTS = (
    ("{}8bit", {"optim_bits": 8}, "8-bit state"),
    ("{}32bit", {"optim_bits": 32}, "32-bit state"),
    ("Paged{}", {"is_paged": True}, "paged state (``optim_bits`` selects 8 or 32 bits)"),
    ("Paged{}8bit", {"optim_bits": 8, "is_paged": True}, "paged 8-bit state"),
    ("Paged{}32bit", {"optim_bits": 32, "is_paged": True}, "paged 32-bit state"),
)


def _pinned(base: type, name: str, fixed: dict[str, Any], what: str, example_args: str) -> type:
    signature = inspect.signature(base.__init__)
    params = [
        p.replace(default=fixed[p.name]) if p.name in fixed else p for p in signature.parameters.values()
    ]
    pinned_signature = signature.replace(parameters=params)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        for key, value in fixed.items():
            given = bound.arguments.get(key, value)
            if given != value:
                alt = f"{base.__name__}({key}={given!r})"
                raise ValueError(f"{name} always uses {key}={value!r}; got {key}={given!r} (use {alt} instead)")
            bound.arguments[key] = value
        base.__init__(*bound.args, **bound.kwargs)

    __init__.__signature__ = pinned_signature  # type: ignore[attr-defined]
    doc = (
        f"{base.__name__} with {what} (bitsandbytes' ``{name}``).\n\n"
        f"Takes the same arguments as :class:`{base.__name__}`.\n\n"
        f"Example:\n"
        f"    >>> import torch, pagedopt\n"
        f"    >>> p = torch.nn.Parameter(torch.randn(8192))\n"
        f"    >>> opt = pagedopt.{name}([p]{example_args})\n"
        f"    >>> p.grad = torch.randn(8192); opt.step()\n"
    )
    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": base.__module__, "__qualname__": name})


def variants(base: type, example_args: str = "") -> tuple[type, ...]:
    """``(X8bit, X32bit, PagedX, PagedX8bit, PagedX32bit)`` for optimizer class ``base``."""
    return tuple(_pinned(base, fmt.format(base.__name__), fixed, what, example_args) for fmt, fixed, what in VARIANTS)


def reject_amsgrad(amsgrad: bool) -> None:
    """bitsandbytes accepts ``amsgrad`` and ignores it; pagedopt says so instead."""
    if amsgrad:
        raise ValueError("amsgrad=True is not supported by pagedopt's Adam-family optimizers (amsgrad must be False)")
