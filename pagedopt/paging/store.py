"""Where optimizer state tensors live: the interface the optimizers use, and the unpaged store.

The optimizer never allocates state itself. It asks its :class:`StateStore` for zeroed
tensors, and runs each pass of the step through :meth:`StateStore.visit`, which hands the
work back in chunks whose state is resident (an unpaged store hands back everything at once;
a pager prefetches, waits and evicts around each chunk). Tensors may be replaced while paged,
so callers read ``state[...]`` again inside the callback instead of keeping references.

Example:
    >>> import torch
    >>> from pagedopt.paging.store import DeviceStateStore
    >>> store = DeviceStateStore()
    >>> p = torch.zeros(3)
    >>> store.zeros(p, "state1", (3,), torch.float32)
    tensor([0., 0., 0.])
    >>> store.residency(p, {})
    'cpu'
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch

# Keys of a parameter's state that hold per-element buffers worth paging.
PAGEABLE_KEYS = ("state1", "state2")


class StateStore(Protocol):
    """Allocation and residency of optimizer state (see the module docstring)."""

    def zeros(self, param: torch.Tensor, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor: ...

    def adopt(self, param: torch.Tensor, key: str, tensor: torch.Tensor) -> torch.Tensor: ...

    def visit(self, works: Sequence[Any], fn: Callable[[list[Any]], None]) -> None: ...

    def residency(self, param: torch.Tensor, state: dict[str, Any]) -> str: ...

    def forget(self, param: torch.Tensor) -> None: ...

    def moves(self, param: torch.Tensor) -> bool:
        """Whether the store may move or replace ``param``'s state tensors between steps.
        State that never moves can join the step plan's prepared launches (and CUDA graphs),
        which hold pointers to it; state that moves is updated in the store's visits."""
        ...


class DeviceStateStore:
    """Unpaged: every state tensor lives on its parameter's device for its whole life."""

    def zeros(self, param: torch.Tensor, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=param.device)

    def adopt(self, param: torch.Tensor, key: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(param.device)

    def visit(self, works: Sequence[Any], fn: Callable[[list[Any]], None]) -> None:
        if works:
            fn(list(works))

    def residency(self, param: torch.Tensor, state: dict[str, Any]) -> str:
        return param.device.type

    def forget(self, param: torch.Tensor) -> None:
        return None

    def moves(self, param: torch.Tensor) -> bool:
        return False
