"""This rank's part of a sharded (DTensor, FSDP2) tensor, for code that works on local data.

Optimizer code runs under ``torch.no_grad()`` and needs the local shard's storage, not an
autograd view of it: :func:`local_tensor` returns the DTensor's own local tensor (no autograd
node; ``DTensor.to_local()`` costs ~11 us a call through an autograd function, which the step
would pay several times per parameter), and plain tensors unchanged. Writes to the result
update the DTensor's data, like writes through ``to_local()``.

Example:
    >>> import torch
    >>> from pagedopt.shards import local_tensor
    >>> t = torch.zeros(3)
    >>> local_tensor(t) is t
    True
"""

from __future__ import annotations

import torch


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The shard-local tensor of a DTensor; the tensor itself otherwise."""
    local = getattr(t, "_local_tensor", None)
    if isinstance(local, torch.Tensor):
        return local
    to_local = getattr(t, "to_local", None)  # (a DTensor-like subclass without the attribute)
    return to_local() if callable(to_local) else t

