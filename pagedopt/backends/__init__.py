"""Native backends behind :mod:`pagedopt.functional.dispatch`.

Each backend module registers a lazy loader for its device type when imported
(:mod:`pagedopt.backends.cuda` for ``"cuda"``); the loader runs on first use, so importing
pagedopt never needs a driver, a compiler or a GPU.

Example:
    >>> import pagedopt
    >>> from pagedopt.functional.dispatch import backend_for
    >>> import torch
    >>> backend_for(torch.device("meta")).name
    'reference'
"""
