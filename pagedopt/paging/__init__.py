"""Paging of optimizer state between device and host memory.

Example:
    >>> from pagedopt.paging import PagingConfig, make_state_store
    >>> store = make_state_store(PagingConfig(backend="host"))
"""

from __future__ import annotations

from .config import PagingConfig, parse_bytes
from .store import DeviceStateStore, StateStore


def make_state_store(config: PagingConfig) -> StateStore:
    """The state store for a paged optimizer. (Until the pager lands: unpaged placement.)"""
    return DeviceStateStore()


__all__ = ["PagingConfig", "StateStore", "DeviceStateStore", "make_state_store", "parse_bytes"]
