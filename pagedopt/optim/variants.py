"""The five fixed variants of every optimizer: ``X8bit``, ``X32bit``, ``PagedX``, ``PagedX8bit``,
``PagedX32bit``.

Each variant is a subclass that pins ``optim_bits`` and/or ``is_paged``. Its positional
parameters are exactly bitsandbytes 0.49's for that class (``tests/data`` keeps the table):
where 0.49 keeps a pinned argument in the signature (``Adam8bit(..., optim_bits=32, ...)``,
``Adagrad8bit(..., optim_bits=8, ...)``, ``PagedAdam(..., is_paged=False)``) pagedopt keeps
it at the same place with the same default and accepts that default as a placeholder; where
0.49 leaves it out (``Lion8bit``, ``PagedAdamW``) it becomes keyword-only, so later positional
arguments bind as in bitsandbytes. Any other value raises instead of being silently ignored.

Example:
    >>> import torch, pagedopt
    >>> p = torch.nn.Parameter(torch.zeros(4))
    >>> pagedopt.Adam8bit([p], optim_bits=32).optim_bits  # 0.49's placeholder default
    8
    >>> pagedopt.Adam8bit([p], optim_bits=4)
    Traceback (most recent call last):
    ...
    ValueError: Adam8bit always uses optim_bits=8; got optim_bits=4 (optim_bits must be 8 or 32; leave it out)
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

KEYWORD_ONLY = inspect.Parameter.KEYWORD_ONLY


def _variant_name(base: str, optim_bits: Any, is_paged: bool) -> str:
    bits = f"{optim_bits}bit" if optim_bits in (8, 32) else ""
    return f"{'Paged' if is_paged else ''}{base}{bits}"


def _conflict_message(name: str, base: str, fixed: dict[str, Any], key: str, given: Any) -> str:
    """The error for ``name(key=given)``; the fix it suggests is a class that exists and
    does what the caller asked."""
    if key == "optim_bits" and given not in (8, 32):
        hint = "optim_bits must be 8 or 32; leave it out"
    else:
        wanted = {"optim_bits": fixed.get("optim_bits"), "is_paged": fixed.get("is_paged", False), key: given}
        hint = f"use {_variant_name(base, wanted['optim_bits'], bool(wanted['is_paged']))} instead"
    return f"{name} always uses {key}={fixed[key]!r}; got {key}={given!r} ({hint})"


def _variant_signature(
    base_signature: inspect.Signature, fixed: dict[str, Any], positional: dict[str, Any]
) -> inspect.Signature:
    """``base_signature`` with each pinned argument either kept in place with default
    ``positional[name]`` (bitsandbytes keeps it there) or moved to the keyword-only tail
    with the pinned value as default."""
    kept, moved = [], []
    for p in base_signature.parameters.values():
        if p.name not in fixed:
            kept.append(p)
        elif p.name in positional:
            kept.append(p.replace(default=positional[p.name]))
        else:
            moved.append(p.replace(kind=KEYWORD_ONLY, default=fixed[p.name]))
    first_kw = next((i for i, p in enumerate(kept) if p.kind in (KEYWORD_ONLY, p.VAR_KEYWORD)), len(kept))
    return base_signature.replace(parameters=kept[:first_kw] + moved + kept[first_kw:])


def _pinned(
    base: type, name: str, fixed: dict[str, Any], what: str, example_args: str, positional: dict[str, Any]
) -> type:
    signature = _variant_signature(inspect.signature(base.__init__), fixed, positional)
    accepted = {k: (v, positional[k]) if k in positional else (v,) for k, v in fixed.items()}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        for key, value in fixed.items():
            given = bound.arguments.get(key, value)
            if not any(given is a or (isinstance(given, (bool, int)) and given == a) for a in accepted[key]):
                raise ValueError(_conflict_message(name, base.__name__, fixed, key, given))
            bound.arguments[key] = value
        # by name: the variant's positional order is not the base class's
        base.__init__(self, **{k: v for k, v in bound.arguments.items() if k != "self"})

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    doc = (
        f"{base.__name__} with {what} (bitsandbytes' ``{name}``).\n\n"
        f"Takes the arguments of :class:`{base.__name__}` in bitsandbytes 0.49's order for\n"
        f"``{name}``; {', '.join(f'``{k}``' for k in fixed)} fixed.\n\n"
        f"Example:\n"
        f"    >>> import torch, pagedopt\n"
        f"    >>> p = torch.nn.Parameter(torch.randn(8192))\n"
        f"    >>> opt = pagedopt.{name}([p]{example_args})\n"
        f"    >>> p.grad = torch.randn(8192); opt.step()\n"
    )
    namespace = {
        "__init__": __init__, "__doc__": doc, "__module__": base.__module__, "__qualname__": name,
        "pinned_arguments": dict(fixed),
    }
    return type(name, (base,), namespace)


def variants(
    base: type,
    example_args: str = "",
    *,
    bits_placeholder: str | None = None,
    paged_placeholder: bool = False,
) -> tuple[type, ...]:
    """``(X8bit, X32bit, PagedX, PagedX8bit, PagedX32bit)`` for optimizer class ``base``.

    ``bits_placeholder`` says whether the 8/32-bit variants keep ``optim_bits`` in place, as
    bitsandbytes 0.49 does for some classes: ``"base"`` with the base class's default
    (``Adam8bit(..., optim_bits=32)``), ``"pinned"`` with the pinned value
    (``Adagrad8bit(..., optim_bits=8)``), ``None`` moves it to the keyword-only tail.
    ``paged_placeholder`` keeps ``is_paged`` in place (default ``False``) in the paged variants.
    """
    params = inspect.signature(base.__init__).parameters
    out = []
    for fmt, fixed, what in VARIANTS:
        positional: dict[str, Any] = {}
        if "optim_bits" in fixed and bits_placeholder is not None:
            positional["optim_bits"] = params["optim_bits"].default if bits_placeholder == "base" else fixed["optim_bits"]
        if "is_paged" in fixed and paged_placeholder:
            positional["is_paged"] = params["is_paged"].default
        out.append(_pinned(base, fmt.format(base.__name__), fixed, what, example_args, positional))
    return tuple(out)


def reject_amsgrad(amsgrad: bool) -> None:
    """bitsandbytes accepts ``amsgrad`` and ignores it; pagedopt says so instead."""
    if amsgrad:
        raise ValueError("amsgrad=True is not supported by pagedopt's Adam-family optimizers (amsgrad must be False)")
