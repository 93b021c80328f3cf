"""Paging policies as data: what each policy changes in the pager's one scheduling loop.

The pager visits the step's parameters in order and runs the update on maximal runs of
parameters whose state is already on the device. A parameter that is not gets paged in on
demand (the step waits), then ``lookahead`` parameters after the current run are prefetched
while it updates. ``evict_after_use`` sends state back to the host right after its update.
``home`` is where new (and loaded) state is placed when it is created.

Every policy honours ``device_budget_bytes`` (when given) and the ``reserve_free_bytes``
watermark; ``budgeted`` requires a budget.

Example:
    >>> from pagedopt.paging.config import PagingConfig
    >>> from pagedopt.paging.policies import policy_for
    >>> policy_for(PagingConfig(policy="offload", prefetch_depth=3))
    Policy(name='offload', lookahead=3, evict_after_use=True, home='host')
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import PagingConfig


@dataclass(frozen=True)
class Policy:
    """How one named policy drives the scheduler (see the module docstring).

    Example:
        >>> from pagedopt.paging.policies import Policy
        >>> Policy("on_demand", lookahead=0, evict_after_use=False, home="device").lookahead
        0
    """

    name: str
    lookahead: int
    evict_after_use: bool
    home: str  # "device" or "host"


def policy_for(config: PagingConfig) -> Policy:
    """The :class:`Policy` a :class:`~pagedopt.PagingConfig` asks for."""
    depth = config.prefetch_depth
    table = {
        # Prefetch exactly when needed: no lookahead; state stays until something evicts it.
        "on_demand": Policy("on_demand", lookahead=0, evict_after_use=False, home="device"),
        "pipelined": Policy("pipelined", lookahead=depth, evict_after_use=False, home="device"),
        # State lives on the host between steps: the device only holds what is in flight.
        "offload": Policy("offload", lookahead=depth, evict_after_use=True, home="host"),
        # A persistent resident set under the budget, least recently used evicted first.
        "budgeted": Policy("budgeted", lookahead=depth, evict_after_use=False, home="device"),
    }
    return table[config.policy]
