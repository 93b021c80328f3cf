"""Drop-in compatibility layers for code written against other libraries.

* :mod:`pagedopt.compat.bitsandbytes` - shaped like the ``bitsandbytes`` package (``optim``,
  ``functional``, ``nn``, ``utils``) for its 8-bit optimizer API;
  :func:`~pagedopt.compat.bitsandbytes.install_alias` makes ``import bitsandbytes`` resolve to
  it (opt-in).

Example:
    >>> import torch
    >>> import pagedopt.compat.bitsandbytes as bnb
    >>> model = torch.nn.Linear(64, 64)
    >>> opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
"""
