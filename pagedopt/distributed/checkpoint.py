"""Resharding checkpoints of model + pagedopt optimizer through ``torch.distributed.checkpoint``.

:func:`save_checkpoint` writes a DCP directory (one file per rank plus metadata) from
``get_state_dict(model, optimizer)``; :func:`load_checkpoint` reads it back into a model and
optimizer of *any* world size and sharding (FSDP2, DDP, or a single process): DCP reads, for
each rank, the parts of every saved tensor that overlap the rank's shard. The optimizer's
``state_dict()`` provides the state as DTensors with the parameters' placements; see
:mod:`pagedopt.distributed.sharding` for what is kept exactly and what is re-quantized.

``extra`` is a small JSON-able dict (step counter, data position, config) saved alongside.

Example:
    >>> import tempfile, torch, pagedopt
    >>> from pagedopt.distributed.checkpoint import save_checkpoint, load_checkpoint
    >>> model = torch.nn.Linear(64, 64)
    >>> opt = pagedopt.AdamW8bit(model.parameters(), min_8bit_size=1024)
    >>> model(torch.randn(2, 64)).sum().backward(); opt.step()
    >>> path = tempfile.mkdtemp()
    >>> save_checkpoint(path, model, opt, extra={"step": 1})
    >>> load_checkpoint(path, model, opt)
    {'step': 1}
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Any, Iterator

import torch

_EXTRA_KEY = "extra_json"


def _single_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


@contextlib.contextmanager
def _quiet_single_process(single: bool) -> Iterator[None]:
    """DCP warns that it "assumes" a single process when there is no process group; here
    that is the intent, so the warning is noise."""
    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save ``model`` (and ``optimizer``) to the DCP directory ``path``; every rank calls this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    try:
        extra_json = json.dumps(extra or {})
    except TypeError as exc:
        raise TypeError(f"extra: checkpoint metadata must be JSON-serializable ({exc})") from None
    optimizers = () if optimizer is None else optimizer
    model_sd, optim_sd = get_state_dict(model, optimizers)
    state: dict[str, Any] = {"model": model_sd, _EXTRA_KEY: extra_json}
    if optimizer is not None:
        state["optim"] = optim_sd
    single = _single_process()
    with _quiet_single_process(single):
        dcp.save(state, checkpoint_id=os.fspath(path), no_dist=single)


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Load the DCP directory ``path`` into ``model`` (and ``optimizer``); returns ``extra``.

    The model must already be wrapped (FSDP2/DDP) and the optimizer built from its
    parameters, at whatever world size this job runs. Every rank calls this.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {os.fspath(path)!r} does not exist")
    optimizers = () if optimizer is None else optimizer
    # The targets: this job's state dicts (the optimizer's state is created by a zero step
    # if it has none yet); DCP fills them in place with the overlapping saved parts.
    model_sd, optim_sd = get_state_dict(model, optimizers)
    state: dict[str, Any] = {"model": model_sd, _EXTRA_KEY: ""}
    if optimizer is not None:
        state["optim"] = optim_sd
    single = _single_process()
    with _quiet_single_process(single):
        dcp.load(state, checkpoint_id=os.fspath(path), no_dist=single)
    if optimizer is None:
        set_state_dict(model, (), model_state_dict=state["model"], optim_state_dict={})
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads(state[_EXTRA_KEY] or "{}")
