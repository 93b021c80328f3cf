"""Process-group setup for a training loop: torchrun environment, FSDP2/DDP wrapping, rank-0
output, teardown.

A training loop asks :func:`init_distributed` for a :class:`DistributedRun` and uses it for
the few places where distributed training differs from a single process: which device this
rank uses, wrapping the model (before the optimizer is built, because FSDP2 replaces the
parameters with DTensors), a per-rank data seed, printing on rank 0 only, averaging a
logged loss, and leaving cleanly.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` in
the environment) the process group uses NCCL on GPUs and gloo on CPUs. Without torchrun,
``"ddp"``/``"fsdp"`` run as a world of one process (handy for trying a config), ``"none"``
creates no process group at all.

Example:
    >>> import torch
    >>> from pagedopt.distributed import init_distributed
    >>> with init_distributed("none", device="cpu") as run:
    ...     model = run.wrap(torch.nn.Linear(4, 4))
    ...     (run.rank, run.world_size, run.is_main, run.metrics_port(9460))
    (0, 1, True, 9460)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterable

import torch

from .exit_guard import settle_collective_threads

MODES = ("none", "ddp", "fsdp")
# torchrun sets these for every worker.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def launched_by_torchrun() -> bool:
    """True when the torchrun worker variables (RANK, WORLD_SIZE, LOCAL_RANK) are set."""
    return all(os.environ.get(k) for k in _TORCHRUN_ENV)


def _resolve_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}: CUDA is not available on this machine")
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} needs GPU {index}, but only {torch.cuda.device_count()} are "
                "visible; start at most one process per GPU (torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", index)
    return device


def _default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass
class DistributedRun:
    """This process's place in the job; see the module docstring.

    Attributes:
        mode: ``"none"``, ``"ddp"`` or ``"fsdp"``.
        rank, world_size: global rank and number of processes.
        local_rank, local_world_size: rank and process count on this node.
        device: the device this rank computes on (``cuda:LOCAL_RANK`` on GPUs).
        backend: the process group's backend (``None`` for ``mode="none"``).

    Example:
        >>> from pagedopt.distributed import DistributedRun
        >>> DistributedRun("none").is_main
        True
    """

    mode: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_process_group: bool = False
    store_dir: str | None = field(default=None, repr=False)  # the world-of-one file store

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, logs and writes single-writer files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.mode != "none"

    # -- model -----------------------------------------------------------------------------------

    def wrap(
        self,
        model: torch.nn.Module,
        *,
        shard: Iterable[type] | Callable[[torch.nn.Module], bool] | None = None,
        param_dtype: torch.dtype | None = None,
        reduce_dtype: torch.dtype | None = None,
    ) -> torch.nn.Module:
        """Move ``model`` to this rank's device and wrap it for the run's mode.

        ``"fsdp"``: ``fully_shard`` each sub-module chosen by ``shard`` (module classes, or a
        predicate), then the root; by default the items of every ``nn.ModuleList`` (the
        transformer blocks of most models). ``param_dtype``/``reduce_dtype`` give FSDP2's
        mixed precision (parameters and optimizer state stay in their own dtype).
        ``"ddp"``: ``DistributedDataParallel``. ``"none"``: only the move.

        Build the optimizer *after* wrapping, from the returned module's parameters.
        """
        model = model.to(self.device)
        if self.mode == "none":
            return model
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        for module in _modules_to_shard(model, shard):
            fully_shard(module, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    # -- helpers for the loop -------------------------------------------------------------------

    def data_seed(self, seed: int) -> int:
        """A seed for this rank's data stream: different on every rank, reproducible."""
        return int(seed) * 1_000_003 + self.rank

    def metrics_port(self, base: int) -> int:
        """Per-rank metrics port (``base + LOCAL_RANK``), one endpoint per process on a node."""
        return int(base) + self.local_rank

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on rank 0 only (flushed, so interleaved logs stay readable)."""
        if self.is_main:
            kwargs.setdefault("flush", True)
            print(*args, **kwargs)

    def mean(self, value: float | torch.Tensor) -> float:
        """``value`` averaged over all ranks, as a Python float (for logging a loss: this waits
        for the device, so call it at the logging interval, not every step)."""
        return self._all_reduce_scalar(value) / self.world_size

    def sum(self, value: float | torch.Tensor) -> float:
        """``value`` summed over all ranks (e.g. each rank's optimizer-state bytes)."""
        return self._all_reduce_scalar(value)

    def average(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of tensor ``value`` over all ranks, as a tensor on its device: nothing is
        read on the host, so a loop can average every step's loss and print it later. Every
        rank must call it (it is a collective).

        Example:
            >>> DistributedRun("none").average(torch.tensor(2.5))
            tensor(2.5000)
        """
        if self.mode == "none" or self.world_size == 1:
            return value
        import torch.distributed as dist

        total = value.detach().clone()
        dist.all_reduce(total)  # SUM: gloo has no AVG
        return total / self.world_size

    def gather_object(self, obj: Any) -> list[Any]:
        """``obj`` from every rank (picklable), in rank order, on every rank.

        Example:
            >>> DistributedRun("none").gather_object({"bytes": 10})
            [{'bytes': 10}]
        """
        if self.mode == "none" or self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def synchronize(self) -> None:
        """Wait for this rank's queued device work (for honest wall-clock times)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _all_reduce_scalar(self, value: float | torch.Tensor) -> float:
        t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(()).to(self.device)
        if self.mode != "none":
            import torch.distributed as dist

            t = t.clone()
            dist.all_reduce(t)
        return float(t)

    def barrier(self) -> None:
        if self.mode != "none":
            import torch.distributed as dist

            dist.barrier()

    # -- teardown -------------------------------------------------------------------------------

    def close(self, wait_for_peers: bool = True) -> None:
        """Destroy the process group if this run created it (idempotent).

        ``wait_for_peers=False`` skips the final barrier (used when leaving on an exception,
        where a peer may never arrive).
        """
        if self.owns_process_group:
            import torch.distributed as dist

            if dist.is_initialized() and wait_for_peers:
                # Every rank waits here until all ranks are done with their last collective:
                # a rank that destroys its gloo pairs while a peer is still finishing the
                # final all-reduce can abort that peer's process at exit.
                dist.barrier()
            if dist.is_initialized():
                dist.destroy_process_group()
            settle_collective_threads()
            self.owns_process_group = False
        if self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)
            self.store_dir = None

    def __enter__(self) -> "DistributedRun":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(wait_for_peers=exc_type is None)


def _modules_to_shard(
    model: torch.nn.Module, shard: Iterable[type] | Callable[[torch.nn.Module], bool] | None
) -> list[torch.nn.Module]:
    """Sub-modules to ``fully_shard`` before the root (each becomes one all-gather unit)."""
    if shard is None:
        return [m for parent in model.modules() if isinstance(parent, torch.nn.ModuleList) for m in parent]
    if callable(shard) and not isinstance(shard, type):
        predicate = shard
    else:
        classes = (shard,) if isinstance(shard, type) else tuple(shard)
        for c in classes:
            if not (isinstance(c, type) and issubclass(c, torch.nn.Module)):
                raise TypeError(f"shard: expected nn.Module classes or a predicate, got {c!r}")
        predicate = lambda m: isinstance(m, classes)  # noqa: E731
    return [m for m in model.modules() if m is not model and predicate(m)]


def init_distributed(
    mode: str = "none",
    *,
    device: str | torch.device | None = None,
    backend: str | None = None,
    timeout_seconds: float = 1800.0,
) -> DistributedRun:
    """Join (or create) the process group for ``mode`` and pick this rank's device.

    Args:
        mode: ``"none"``, ``"ddp"`` or ``"fsdp"``.
        device: ``"cpu"``, ``"cuda"`` (this rank's GPU, ``cuda:LOCAL_RANK``) or ``None``/``"auto"``
            (a GPU when there is one).
        backend: process-group backend; default NCCL for CUDA, gloo for CPU.
        timeout_seconds: collective timeout.

    An already initialized default process group (the caller made one) is reused and left
    open on :meth:`DistributedRun.close`.
    """
    if mode not in MODES:
        raise ValueError(f"distributed mode {mode!r}: expected one of {', '.join(MODES)}")
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = _resolve_device(device, local_rank)
    if mode == "none":
        if launched_by_torchrun() and _env_int("WORLD_SIZE", 1) > 1:
            raise ValueError(
                f"started by torchrun with WORLD_SIZE={os.environ['WORLD_SIZE']} but --distributed is 'none': "
                "every process would train its own copy; pass --distributed ddp or fsdp"
            )
        return DistributedRun("none", device=dev)
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; use --distributed none")
    backend = backend or _default_backend(dev)
    owns, store_dir = False, None
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        timeout = timedelta(seconds=timeout_seconds)
        if launched_by_torchrun():
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend, timeout=timeout, **kwargs)
        else:
            # Not under torchrun: a world of one, through a private file store (no port).
            store_dir = tempfile.mkdtemp(prefix="pagedopt-pg-")
            store = dist.FileStore(os.path.join(store_dir, "store"), 1)
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
            print(
                f"pagedopt: --distributed {mode} without torchrun: running as a world of 1 process",
                file=sys.stderr,
            )
        owns = True
    return DistributedRun(
        mode,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=_env_int("LOCAL_WORLD_SIZE", 1),
        device=dev,
        backend=dist.get_backend(),
        owns_process_group=owns,
        store_dir=store_dir,
    )
