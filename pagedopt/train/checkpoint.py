"""Checkpoints of the main job: written atomically, found by step, resumed bit-exactly.

A checkpoint holds everything the next step depends on: the model, the optimizer, the LR
scheduler, every rank's data position and random generators (the batch sampler's, torch's
CPU and CUDA ones, Python's ``random`` and NumPy's when NumPy is loaded), the step and the
history the final summary is computed from (training losses, evaluations, times). A run
resumed from step *k* therefore ends with the same parameters and losses as one that was
never interrupted (bit for bit on the CPU, same thread count).

Layout of ``--checkpoint-dir DIR``:

- single process and DDP: ``DIR/step-00000040.pt``, one ``torch.save`` file written by rank
  0 through :func:`pagedopt.fileio.atomic_save` (a temporary next to it, fsync, rename): it
  exists complete or not at all.
- FSDP2: ``DIR/step-00000040/``, a ``torch.distributed.checkpoint`` directory written by every
  rank, plus ``train-state.pt`` (scheduler, every rank's generators) and, written last by rank
  0 after all ranks finished, the completion marker ``pagedopt-checkpoint.json``. A directory
  without the marker is incomplete (a kill during the save) and is ignored and replaced.

:func:`newest_checkpoint` returns the newest *complete* checkpoint; after each save all but
the newest ``keep`` are removed, as are incomplete ones. Loading uses
``torch.load(weights_only=True)`` and DCP metadata through a restricted unpickler
(:mod:`pagedopt.distributed.checkpoint`): a checkpoint file cannot run code.

Example:
    >>> import tempfile
    >>> from pagedopt.train import TrainConfig, train
    >>> from pagedopt.train.checkpoint import list_checkpoints
    >>> d = tempfile.mkdtemp()
    >>> cfg = dict(model_size="tiny", seq_len=16, batch_size=2, max_corpus_bytes=50_000, eval_batches=1,
    ...            progress="off", checkpoint_dir=d, checkpoint_every=2)
    >>> first = train(TrainConfig(steps=4, **cfg))
    >>> [c.step for c in list_checkpoints(d)]
    [2, 4]
    >>> resumed = train(TrainConfig(steps=6, resume="latest", **cfg))
    >>> resumed.resumed_from_step, resumed.steps_completed
    (4, 6)
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import RESUME_LATEST as LATEST
from ..fileio import AtomicWriteError, atomic_save, atomic_write_text, remove_stale_temporaries

FORMAT = "pagedopt-train-checkpoint"
FORMAT_VERSION = 1
MARKER = "pagedopt-checkpoint.json"  # completion marker of a sharded (DCP) checkpoint directory
TRAIN_STATE = "train-state.pt"  # scheduler + per-rank generators inside a DCP directory
_NAME = re.compile(r"^step-(\d{8,})(\.pt)?$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run; the message names the path and the reason.

    Example:
        >>> str(CheckpointError("/ckpt/step-00000002.pt", "not a pagedopt training checkpoint"))
        '/ckpt/step-00000002.pt: not a pagedopt training checkpoint'
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class CheckpointWriteError(AtomicWriteError):
    """Writing a checkpoint failed (full disk, permission, ...); earlier checkpoints are intact.

    One line naming the path and the errno, like :class:`pagedopt.fileio.AtomicWriteError`.

    Example:
        >>> import errno
        >>> print(CheckpointWriteError(Path("ckpt/step-00000002.pt"), OSError(errno.ENOSPC, "No space left on device")))
        cannot write ckpt/step-00000002.pt: [Errno 28] No space left on device (ENOSPC)
    """


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint: its step, its path and whether it is a sharded DCP directory.

    Example:
        >>> CheckpointInfo(10, Path("ckpt/step-00000010.pt"), sharded=False).step
        10
    """

    step: int
    path: Path
    sharded: bool


def checkpoint_path(directory: str | os.PathLike[str], step: int, sharded: bool) -> Path:
    """Where the checkpoint of ``step`` goes (zero-padded so names sort by step).

    Example:
        >>> checkpoint_path("ckpt", 40, sharded=False).as_posix()
        'ckpt/step-00000040.pt'
    """
    name = f"step-{step:08d}"
    return Path(directory) / (name if sharded else name + ".pt")


def is_complete(path: str | os.PathLike[str]) -> bool:
    """A checkpoint file (complete by construction: it is renamed into place) or a DCP
    directory with its completion marker."""
    path = Path(path)
    if path.is_dir():
        return (path / MARKER).is_file()
    return path.is_file()


def _entries(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        m = _NAME.match(entry.name)
        if m and (entry.is_dir() == (m.group(2) is None)):
            found.append((int(m.group(1)), entry))
    return sorted(found)


def list_checkpoints(directory: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """The complete checkpoints in ``directory``, oldest first."""
    return [CheckpointInfo(step, path, path.is_dir()) for step, path in _entries(Path(directory)) if is_complete(path)]


def newest_checkpoint(directory: str | os.PathLike[str]) -> CheckpointInfo | None:
    """The complete checkpoint with the highest step in ``directory`` (``None`` if none)."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def resolve_resume(resume: str, checkpoint_dir: str | None) -> CheckpointInfo | None:
    """The checkpoint ``--resume`` means: ``"latest"`` is the newest complete one in
    ``checkpoint_dir`` (``None`` when there is none yet: a first start of a requeued job), a
    path is that checkpoint file or directory, or the newest one in a checkpoint directory."""
    if resume == LATEST:
        return newest_checkpoint(checkpoint_dir) if checkpoint_dir else None
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(path, "does not exist")
    m = _NAME.match(path.name)
    if path.is_file():
        return CheckpointInfo(int(m.group(1)) if m else -1, path, sharded=False)
    if (path / MARKER).is_file():
        return CheckpointInfo(int(m.group(1)) if m else -1, path, sharded=True)
    if (path / ".metadata").is_file():
        raise CheckpointError(path, f"is a torch.distributed.checkpoint directory without pagedopt's completion "
                                    f"marker {MARKER}: incomplete, or not written by pagedopt train")
    found = newest_checkpoint(path)
    if found is None:
        raise CheckpointError(path, "holds no complete checkpoint (step-NNNNNNNN.pt files or directories)")
    return found


def prune(directory: str | os.PathLike[str], keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` complete checkpoints, incomplete checkpoint
    directories older than the newest complete one, and temporaries of killed writers."""
    directory = Path(directory)
    entries = _entries(directory)
    complete = [(s, p) for s, p in entries if is_complete(p)]
    newest = complete[-1][0] if complete else -1
    doomed = [p for _, p in complete[:-keep]] if keep > 0 else []
    doomed += [p for s, p in entries if not is_complete(p) and s <= newest]
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    remove_stale_temporaries(directory)
    return doomed


# -- random generators -----------------------------------------------------------------------------


def capture_rank_state(sampler_generator: torch.Generator) -> dict[str, Any]:
    """This rank's data position and random generators, as plain tensors/lists (loadable
    with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "sampler": sampler_generator.get_state(),
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    return state


def restore_rank_state(state: dict[str, Any], sampler_generator: torch.Generator) -> None:
    """Inverse of :func:`capture_rank_state`."""
    sampler_generator.set_state(state["sampler"])
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = sys.modules.get("numpy")
    if "numpy" in state and numpy is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


# -- writing ---------------------------------------------------------------------------------------


def _write_error(path: Path, err: BaseException) -> CheckpointWriteError:
    """A one-line error naming ``path`` and the errno found in ``err`` or its causes."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno is not None:
            return CheckpointWriteError(getattr(cause, "path", path), cause)
        cause = cause.__cause__ or cause.__context__
    failures = getattr(err, "failures", None)  # DCP's CheckpointException: {rank: exception}
    if isinstance(failures, dict):
        for failure in failures.values():
            found = _write_error(path, failure) if isinstance(failure, BaseException) else None
            if found is not None and found.errno is not None:
                return found
    import errno as errno_module

    return CheckpointWriteError(path, OSError(errno_module.EIO, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))


def save_single(path: Path, payload: dict[str, Any]) -> None:
    """One checkpoint file, atomically (raises :class:`CheckpointWriteError`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_save(payload, path)
    except OSError as err:
        raise _write_error(path, err) from err


def save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any],
                 train_state: dict[str, Any] | None, runtime: Any) -> None:
    """A DCP directory written by every rank, then ``train-state.pt`` and the completion
    marker by rank 0. A leftover incomplete directory of the same step is replaced."""
    from ..distributed.checkpoint import save_checkpoint

    if runtime.is_main:
        if path.exists() and not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True, exist_ok=True)
    runtime.barrier()
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException subclass

    try:
        save_checkpoint(path, model, optimizer, extra=extra)
    except (OSError, RuntimeError, CheckpointException) as err:
        raise _write_error(path, err) from err
    if runtime.is_main:
        try:
            if train_state is not None:
                atomic_save(train_state, path / TRAIN_STATE)
            atomic_write_text(path / MARKER, json.dumps({"format": FORMAT, "version": FORMAT_VERSION,
                                                         "step": extra.get("step"), "world_size": runtime.world_size}))
        except OSError as err:
            raise _write_error(path, err) from err
    runtime.barrier()


# -- reading ---------------------------------------------------------------------------------------


def load_file(path: Path) -> dict[str, Any]:
    """A checkpoint file, with ``weights_only=True`` (no code runs); checks its format."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(path, f"cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    except pickle.UnpicklingError as err:  # weights_only refused something: not a file pagedopt wrote
        raise CheckpointError(path, f"is not a weights-only torch file ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(path, f"not a pagedopt training checkpoint (expected format {FORMAT!r}; a --save "
                                    "export holds weights for inference, not a resumable run)")
    if payload.get("version") != FORMAT_VERSION:
        raise CheckpointError(path, f"checkpoint format version {payload.get('version')!r}, this pagedopt reads "
                                    f"{FORMAT_VERSION}")
    return payload


def describe_mismatch(saved: dict[str, Any], config: dict[str, Any]) -> str | None:
    """Why a checkpoint cannot continue this run (another model or optimizer), or ``None``.
    ``saved`` and ``config`` are :meth:`TrainConfig.to_dict` plus ``model_dims`` (the
    resolved ``[d_model, layers, heads]``)."""
    diffs = []
    dims_saved, dims_now = saved.get("model_dims"), config.get("model_dims")
    if dims_saved is not None and dims_now is not None and list(dims_saved) != list(dims_now):
        for name, a, b in zip(("d_model", "layers", "heads"), dims_saved, dims_now):
            if a != b:
                diffs.append(f"{name}={a!r} (this run: {b!r})")
    keys = ("optimizer", "embedding", "tie_weights", "seq_len")
    diffs += [f"{k}={saved.get(k)!r} (this run: {config.get(k)!r})" for k in keys if saved.get(k) != config.get(k)]
    return ", ".join(diffs) if diffs else None
