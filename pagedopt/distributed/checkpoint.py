"""Resharding checkpoints of model + pagedopt optimizer through ``torch.distributed.checkpoint``.

:func:`save_checkpoint` writes a DCP directory (one file per rank plus metadata) from
``get_state_dict(model, optimizer)``; :func:`load_checkpoint` reads it back into a model and
optimizer of *any* world size and sharding (FSDP2, DDP, or a single process): DCP reads, for
each rank, the parts of every saved tensor that overlap the rank's shard. The optimizer's
``state_dict()`` provides the state as DTensors with the parameters' placements; see
:mod:`pagedopt.distributed.sharding` for what is kept exactly and what is re-quantized.

``extra`` is a small JSON-able dict (step counter, data position, config) saved alongside.

Loading never unpickles untrusted data. DCP keeps its metadata (``.metadata``) as a pickle
and its non-tensor items through ``torch.load(weights_only=False)``; by default
:func:`load_checkpoint` reads the metadata with a restricted unpickler that admits only DCP's
own metadata classes, torch sizes/dtypes/layouts and paths, and the non-tensor items with
``weights_only=True`` (:class:`SafeFileSystemReader`, :class:`SafeLoadPlanner`). A file that
asks for anything else raises :class:`UntrustedCheckpointError`; pass ``trusted=True`` only
for a directory you wrote yourself with another tool, to load it with DCP's plain readers.

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
import functools
import io
import json
import os
import pickle
import warnings
from typing import Any, Iterator

import torch

_EXTRA_KEY = "extra_json"

# (module, name) pairs a DCP metadata pickle may refer to: DCP's metadata records, torch
# sizes and layout helpers, paths. torch dtypes (``torch.float32``, ...) are checked by type.
_SAFE_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"), ("pathlib._local", "PosixPath"), ("pathlib._local", "WindowsPath"),
})


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint's metadata asks to load something other than DCP's own records.

    Example:
        >>> print(UntrustedCheckpointError("ckpt/.metadata", "os", "system"))  # doctest: +ELLIPSIS
        ckpt/.metadata: refers to os.system, which a DCP checkpoint never needs; ...trusted=True...
    """

    def __init__(self, where: str, module: str, name: str) -> None:
        super().__init__(
            f"{where}: refers to {module}.{name}, which a DCP checkpoint never needs; not loading it "
            "(pass trusted=True to load_checkpoint only for a directory you wrote yourself)")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, where: str) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UntrustedCheckpointError(self.where, module, name)


def read_metadata_safely(path: str | os.PathLike) -> Any:
    """The DCP ``Metadata`` of the checkpoint directory ``path``, unpickled with only DCP's
    metadata classes allowed (:class:`UntrustedCheckpointError` otherwise)."""
    return _safe_reader_classes()[0](os.fspath(path)).read_metadata()


@functools.lru_cache(maxsize=None)
def _safe_reader_classes() -> tuple[type, type]:
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """DCP's file-system reader with the metadata read by a restricted unpickler."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                metadata = _RestrictedUnpickler(f, os.fspath(path)).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's default load planner with non-tensor items read by ``weights_only=True``."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise UntrustedCheckpointError(f"item {read_item.dest_index.fqn}", "<weights_only>",
                                               str(exc).splitlines()[0]) from None
            value = io.BytesIO()
            torch.save(loaded, value)
            value.seek(0)
            super().load_bytes(read_item, value)

    return SafeFileSystemReader, SafeLoadPlanner


def __getattr__(name: str) -> Any:  # the DCP-derived classes, created on first use
    if name in ("SafeFileSystemReader", "SafeLoadPlanner"):
        reader, planner = _safe_reader_classes()
        globals().update(SafeFileSystemReader=reader, SafeLoadPlanner=planner)
        return globals()[name]
    raise AttributeError(name)


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
    *,
    trusted: bool = False,
) -> dict[str, Any]:
    """Load the DCP directory ``path`` into ``model`` (and ``optimizer``); returns ``extra``.

    The model must already be wrapped (FSDP2/DDP) and the optimizer built from its
    parameters, at whatever world size this job runs. Every rank calls this. Nothing in the
    directory is unpickled beyond DCP's metadata records unless ``trusted=True`` (see the
    module docstring).
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
    if trusted:
        reader, planner = dcp.FileSystemReader(os.fspath(path)), None
    else:
        reader_class, planner_class = _safe_reader_classes()
        reader, planner = reader_class(os.fspath(path)), planner_class()
    if optimizer is not None:
        metadata = reader.read_metadata()
        state["optim"] = _match_saved_layout(optim_sd, metadata)
    single = _single_process()
    with _quiet_single_process(single):
        dcp.load(state, checkpoint_id=os.fspath(path), storage_reader=reader, planner=planner, no_dist=single)
    if optimizer is None:
        set_state_dict(model, (), model_state_dict=state["model"], optim_state_dict={})
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads(state[_EXTRA_KEY] or "{}")


def _flat_items(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    if isinstance(tree, dict):
        out: dict[tuple, Any] = {}
        for key, value in tree.items():
            out.update(_flat_items(value, prefix + (key,)))
        return out
    return {prefix: tree}


def _same_layout(entry: dict, saved: dict[tuple, Any]) -> bool:
    """True when a target state entry has exactly the saved keys, shapes and dtypes."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    flat = _flat_items(entry)
    if flat.keys() != saved.keys():
        return False
    for path, meta in saved.items():
        value = flat[path]
        if isinstance(meta, TensorStorageMetadata) != isinstance(value, torch.Tensor):
            return False
        if isinstance(value, torch.Tensor) and (
            tuple(value.shape) != tuple(meta.size) or value.dtype != meta.properties.dtype
        ):
            return False
    return True


def _entry_from_metadata(saved: dict[tuple, Any]) -> dict:
    """A target entry shaped like the saved one: full CPU tensors (DCP fills them; the
    optimizer's ``load_state_dict`` then converts layout, precision and shards)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entry: dict = {}
    for path, meta in saved.items():
        node = entry
        for key in path[:-1]:
            node = node.setdefault(key, {})
        if isinstance(meta, TensorStorageMetadata):
            node[path[-1]] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        else:
            node[path[-1]] = 0  # a saved Python object (e.g. the step count) replaces it
    return entry


def _match_saved_layout(optim_sd: dict, metadata: Any) -> dict:
    """Make each parameter's optimizer target match the checkpoint's layout.

    Checkpoints saved under the same kind of sharding match already (the layouts do not
    depend on the world size) and load in place, each rank reading its shards. A checkpoint
    from another kind of job (FSDP2 -> DDP or one process, or back) keeps the quantization
    state in another layout (flat DTensor keys vs bitsandbytes' nested keys, rows-of-blocks
    absmax, dequantized fp32): those entries are read as full tensors and converted by the
    optimizer's ``load_state_dict``."""
    mapping = getattr(metadata, "planner_data", None)
    if not isinstance(mapping, dict):
        return optim_sd
    saved: dict[str, dict[tuple, Any]] = {}
    for key, path in mapping.items():
        if len(path) >= 4 and path[0] == "optim" and path[1] == "state":
            saved.setdefault(path[2], {})[tuple(path[3:])] = metadata.state_dict_metadata[key]
    for fqn, entry in list(optim_sd.get("state", {}).items()):
        if fqn in saved and isinstance(entry, dict) and not _same_layout(entry, saved[fqn]):
            optim_sd["state"][fqn] = _entry_from_metadata(saved[fqn])
    return optim_sd
