"""Native backends behind :mod:`pagedopt.functional.dispatch`.

Importing this package registers each backend's lazy loader for its device type
(:mod:`pagedopt.backends.cpu` for ``"cpu"``, :mod:`pagedopt.backends.cuda` for ``"cuda"``);
a loader runs on first use, so importing pagedopt never needs a driver, a compiler or a GPU.

Example:
    >>> import torch, pagedopt.backends
    >>> from pagedopt.functional.dispatch import backend_for
    >>> backend_for(torch.device("cpu")).name in ("cpu", "reference")
    True
    >>> backend_for(torch.device("meta")).name
    'reference'
"""

from . import cpu  # noqa: F401  (registers the "cpu" loader)
from . import cuda  # noqa: F401  (registers the "cuda" loader)
