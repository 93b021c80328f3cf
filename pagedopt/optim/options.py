"""Options every optimizer class takes besides bitsandbytes' arguments: ``numerics``,
``cuda_graph`` and ``update_in_backward`` (see :class:`~pagedopt.optim.Optimizer8bit`).

The per-algorithm classes keep bitsandbytes 0.49's signatures; :func:`accept_runtime_options`
(applied by ``Optimizer8bit.__init_subclass__``) lets their constructors take these options
as keyword arguments anyway and sets them as attributes once the optimizer is built.

Example:
    >>> import torch, pagedopt
    >>> opt = pagedopt.Lion8bit([torch.nn.Parameter(torch.zeros(4))], numerics="strict")
    >>> opt.numerics, opt.cuda_graph, opt.update_in_backward
    ('strict', True, False)
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

NUMERICS = ("fast", "strict")


def check_numerics(value: Any) -> str:
    """``numerics`` must be ``"fast"`` or ``"strict"`` (see :class:`Optimizer8bit`)."""
    if value not in NUMERICS:
        raise ValueError(f"numerics must be 'fast' or 'strict', got {value!r}")
    return value


# Keyword arguments every optimizer class accepts, whether or not its own signature lists
# them: they set attributes after construction (see Optimizer8bit's Args).
RUNTIME_OPTIONS = ("numerics", "cuda_graph", "update_in_backward")


def accept_runtime_options(init: Any) -> Any:
    """Wrap a subclass ``__init__`` whose signature lacks some of :data:`RUNTIME_OPTIONS`
    (the per-algorithm classes keep bitsandbytes' signatures) so that it accepts them as
    keyword arguments and applies them once the optimizer is built."""
    try:
        accepted = set(inspect.signature(init).parameters)
    except (TypeError, ValueError):
        return init
    missing = [name for name in RUNTIME_OPTIONS if name not in accepted]
    if not missing or getattr(init, "_pagedopt_runtime_options", False):
        return init

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        options = {name: kwargs.pop(name) for name in missing if name in kwargs}
        if "numerics" in options:
            check_numerics(options["numerics"])
        init(self, *args, **kwargs)
        for name, value in options.items():
            setattr(self, name, value)

    __init__._pagedopt_runtime_options = True  # type: ignore[attr-defined]
    return __init__
