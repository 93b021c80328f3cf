"""``bitsandbytes.optim.optimizer``: the base classes, ``GlobalOptimManager`` and ``MockArgs``.

Example:
    >>> from pagedopt.compat.bitsandbytes.optim.optimizer import GlobalOptimManager
    >>> GlobalOptimManager.get_instance() is GlobalOptimManager.get_instance()
    True
"""

from ....optim.manager import GlobalOptimManager
from ....optim.optimizer import MockArgs, Optimizer1State, Optimizer2State, Optimizer8bit

__all__ = ["GlobalOptimManager", "MockArgs", "Optimizer8bit", "Optimizer1State", "Optimizer2State"]
