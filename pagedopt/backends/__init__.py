"""Native backends. Importing this package registers each backend's loader with
:mod:`pagedopt.functional.dispatch`; a backend's library is loaded on first use.

Example:
    >>> import torch, pagedopt.backends
    >>> from pagedopt.functional.dispatch import backend_for
    >>> backend_for(torch.device("cpu")).name in ("cpu", "reference")
    True
"""

from . import cpu  # noqa: F401  (registers the "cpu" loader)
