"""A planned CUDA launch: descriptors packed once per plan, reused every step.

The CUDA backend (:class:`~pagedopt.backends.cuda.CudaBackend`) packs a ``TensorDesc`` per
parameter on every call. A step plan (:mod:`pagedopt.optim.plan`) instead packs them once
per launch group (one kernel launch per element type and state mode, as the backend does)
and each step only rewrites, with whole-array numpy assignments, the step scalars (the same
for every descriptor of the group) and - when the gradient tensors were replaced - the
gradient pointers and the 16-byte-alignment flags; then one host-to-device copy per launch
and the launch itself, on the current stream. The kernels, arguments and results are the
backend's.

Only items the kernels take directly are planned (:func:`plannable`): fp32/fp16/bf16
parameters with gradients of the same dtype, contiguous, and a gradient scale (percentile
clipping), update scale (trust ratio) or new tensor-wise scales only in buffers the plan keeps
and rewrites before each launch (:mod:`pagedopt.optim.launch_clipping`,
:mod:`pagedopt.optim.launch_prepare`, whose prepare pass runs as a :class:`CudaPrepareLaunch`
- eagerly, before the update's launch or graph replay).

**CUDA graphs** (``cuda_graph=True``, the default): the descriptor bytes live in a persistent
pinned host buffer and a persistent device buffer, so after :data:`WARMUP_RUNS` runs of a
launch the copy + kernel launches are captured once as a CUDA graph and every later step is
one ``replay()``: the graph re-reads the pinned buffer, which the step has just rewritten
with this step's scalars and gradient pointers - no kernel ABI change is needed. Before
rewriting it, the host waits for the previous step's copy out of it (an event; that copy is
the first thing of the previous step's launches). A new plan (anything that re-plans) builds
a new launch and captures again. No graph is captured while the current stream is already
capturing (inside a user's ``torch.cuda.graph``: the launches are recorded into the user's
graph instead), and if a capture fails the launch warns once and stays eager. Percentile
clipping's scales and the prepare pass (trust ratios, tensor-wise scales) are computed outside
the graph, eagerly, into the buffers it reads; paged state runs in the per-item passes
(paging policies that move state never enter a graph). The kernels add their count
of NaN/Inf gradient elements to the non-finite watch's running count on the device (its
address is fixed when the launch is built), so counting needs no launch of its own, in a
graph or not.

Example:
    >>> import torch  # doctest: +SKIP
    >>> from pagedopt.backends.cuda_prepared import CudaLaunch  # doctest: +SKIP
    >>> launch = CudaLaunch(backend, kind, items); launch.run(None, scalars)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch

import warnings

from ..functional import nonfinite_tally
from ..functional.items import UpdateItem
from ..functional.kinds import UpdateKind
from ..functional.scalars import StepScalars
from . import cuda_catalog, cuda_plan
from .cuda_layout import FLAG_VECTOR_OK, PREPARE_PARTIAL, STEP_SCALARS, TENSOR_DESC


def plannable(item: UpdateItem) -> bool:
    """Whether ``item`` can join a prepared CUDA launch (see the module docstring)."""
    tensors = [item.param, item.grad, item.state1, item.state2, item.absmax1, item.absmax2]
    return (
        cuda_plan.kernel_handles(item)
        and item.fixed_gnorm_scale
        and item.fixed_update_scale
        and (item.block_wise or not item.quantized or item.fixed_new_absmax)
        and all(t is None or t.is_contiguous() for t in tensors)
    )


class _Group:
    """One kernel launch: the packed descriptor + prefix bytes and where the items sit."""

    CHUNK_ELEMS = cuda_plan.CHUNK_ELEMS
    COPIES_ABSMAX = True  # tensor-wise state: copy the new scales into the state after the kernel

    def __init__(self, launcher: Any, kind: UpdateKind, elem: str, mode: str, items: list[UpdateItem],
                 positions: list[int]) -> None:
        self.launcher = launcher
        # The non-finite watch's running count on this device when the plan is built inside a
        # step (the optimizer rebuilds its plan when the watch's mode changes), else 0. Stable:
        # a captured graph keeps adding to the same tensor.
        counter = nonfinite_tally.device_counter(launcher.device)
        self.counter = counter  # (kept alive with the launch)
        self.counter_ptr = counter.data_ptr() if counter is not None else 0
        self.positions = np.asarray(positions, dtype=np.int64)  # index of each item in the launch's list
        prefix = cuda_plan.chunk_prefix([it.param.numel() for it in items], self.CHUNK_ELEMS)
        descs = cuda_plan.pack_update_descs(kind, items)
        self.host, self.offset = cuda_plan.launch_buffer(descs, prefix)
        self.descs = self.host[: descs.nbytes].view(TENSOR_DESC)  # writable view into the bytes
        # Vector access allowed by every pointer but the gradient's (the parameter stands in
        # for it: same dtype and size); each step ANDs in the gradient's own alignment.
        self.vector_ok = np.array([cuda_plan.vector_ok(kind, dataclasses.replace(it, grad=it.param)) for it in items],
                                  dtype=bool)
        grads = np.array([it.grad.data_ptr() for it in items], dtype=np.uint64)
        self.descs["flags"] = np.where(self.vector_ok & (grads % cuda_plan.VECTOR_BYTES == 0), FLAG_VECTOR_OK, 0)
        self.count = len(items)
        self.work_units = int(prefix[-1])
        numerics = getattr(items[0], "numerics", cuda_catalog.DEFAULT_NUMERICS)
        self.program = cuda_catalog.optimizer_program(kind.algorithm, elem, numerics)
        self.spec = self._kernel_spec(kind, elem, mode, numerics)
        # Tensor-wise 8-bit state: every CTA reads the old scale during the launch, the new one
        # (new_absmax*) is copied into the state after it (as CudaBackend.update does).
        self.absmax_targets: list[torch.Tensor] = []
        self.absmax_values: list[torch.Tensor] = []
        if mode == "tensor8" and self.COPIES_ABSMAX:
            for it in items:
                self.absmax_targets.append(it.absmax1)
                self.absmax_values.append(it.new_absmax1.reshape(it.absmax1.shape))
                if kind.num_states == 2:
                    self.absmax_targets.append(it.absmax2)
                    self.absmax_values.append(it.new_absmax2.reshape(it.absmax2.shape))
        # Persistent buffers: the host bytes in pinned memory (the numpy views alias it), and
        # their device copy, reused every step (and read by a captured graph).
        with launcher.guard():
            self.pinned = _pinned_like(self.host, launcher.device)
            self.device_buffer = torch.empty(self.host.size, dtype=torch.uint8, device=launcher.device)
        self.pinned.numpy()[:] = self.host
        self.host = self.pinned.numpy()
        self.descs = self.host[: descs.nbytes].view(TENSOR_DESC)

    @staticmethod
    def _kernel_spec(kind: UpdateKind, elem: str, mode: str, numerics: str) -> Any:
        return cuda_catalog.update_kernel(kind.algorithm, elem, mode, numerics)

    def write(self, grad_ptrs: np.ndarray | None, record: np.ndarray) -> None:
        """This step's gradient pointers (when they changed) and scalars, into the pinned bytes."""
        descs = self.descs
        if grad_ptrs is not None:
            ptrs = grad_ptrs[self.positions]
            descs["grad"] = ptrs
            aligned = (ptrs % cuda_plan.VECTOR_BYTES) == 0
            descs["flags"] = np.where(self.vector_ok & aligned, FLAG_VECTOR_OK, 0)
        descs["scalars"] = record

    def launch(self) -> None:
        """The device work of one step: copy the descriptors in, launch the kernel."""
        launcher = self.launcher
        with launcher.guard():
            self.device_buffer.copy_(self.pinned, non_blocking=True)
            base = self.device_buffer.data_ptr()
            kernel = launcher.kernel(self.program, self.spec)
            launcher.launch(kernel, self.work_units, None,
                            (base, base + self.offset, self.count, launcher.maps.data_ptr(), launcher.luts.data_ptr(),
                             self.counter_ptr))
            if self.absmax_targets:
                torch._foreach_copy_(self.absmax_targets, self.absmax_values)


class _PrepareGroup(_Group):
    """One prepare-kernel launch (trust-ratio norms, tensor-wise maxima) and its finalize
    launch, into persistent per-group outputs: float64 ``norms [n, 2]``, float32 ``maxima``
    in the kernels' layout (state1's moments, then state2)."""

    CHUNK_ELEMS = cuda_plan.REDUCE_CHUNK_ELEMS
    COPIES_ABSMAX = False  # (the update's business)

    def __init__(self, launcher: Any, kind: UpdateKind, elem: str, mode: str, items: list[UpdateItem],
                 positions: list[int], want_norms: bool) -> None:
        super().__init__(launcher, kind, elem, mode, items, positions)
        self.want_norms = int(want_norms)
        with launcher.guard():
            self.partials = torch.empty(self.work_units * PREPARE_PARTIAL.itemsize, dtype=torch.uint8,
                                        device=launcher.device)
            self.norms = torch.zeros((self.count, 2), dtype=torch.float64, device=launcher.device)
            self.maxima = torch.zeros((self.count, 3), dtype=torch.float32, device=launcher.device)

    @staticmethod
    def _kernel_spec(kind: UpdateKind, elem: str, mode: str, numerics: str) -> Any:
        return cuda_catalog.prepare_kernel(kind.algorithm, elem, mode, numerics)

    def launch(self) -> None:
        launcher = self.launcher
        with launcher.guard():
            self.device_buffer.copy_(self.pinned, non_blocking=True)
            base = self.device_buffer.data_ptr()
            if self.work_units:
                launcher.launch(launcher.kernel(self.program, self.spec), self.work_units, None,
                                (base, base + self.offset, self.count, launcher.maps.data_ptr(),
                                 launcher.luts.data_ptr(), self.partials.data_ptr(), self.want_norms))
            finalize = launcher.kernel(self.program, cuda_catalog.FINALIZE_PREPARE)
            launcher.launch(finalize, self.count, self.count, (base + self.offset, self.count, self.partials.data_ptr(),
                                                               self.norms.data_ptr(), self.maxima.data_ptr()))


WARMUP_RUNS = 2  # eager runs before a capture (kernels loaded, allocator warm)


def _pinned_like(host: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.empty(host.size, dtype=torch.uint8, pin_memory=device.type == "cuda")


class TorchGraphs:
    """CUDA graph operations through torch (tests substitute a recorder)."""

    @staticmethod
    def available(device: torch.device) -> bool:
        return device.type == "cuda"

    @staticmethod
    def capturing(device: torch.device) -> bool:
        return device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    @staticmethod
    def capture(device: torch.device, fn) -> Any:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph):
            fn()
        return graph

    @staticmethod
    def event(device: torch.device) -> Any:
        if device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event


GRAPHS: Any = TorchGraphs()


class CudaLaunch:
    """Prepared update launches over a fixed list of items (see the module docstring).

    ``backend`` is a :class:`~pagedopt.backends.cuda.CudaBackend` (its per-device launchers
    run the kernels). ``run(grad_ptrs, scalars)`` as :class:`~pagedopt.backends.cpu_plan.CpuLaunch`.
    ``use_graph``: capture and replay a CUDA graph once warm (see the module docstring).
    """

    def __init__(self, backend: Any, kind: UpdateKind, items: Sequence[UpdateItem], use_graph: bool = False):
        self.groups: list[_Group] = []
        for (device, elem, mode), positions in cuda_plan.group_items(items).items():
            live = [p for p in positions if items[p].param.numel() > 0]
            if not live:
                continue
            for p in live:
                cuda_plan.check_item(kind, items[p], p, need_new_absmax=self._need_new_absmax(items[p]))
            # one launch per numerics mode (fast/strict kernels are separate programs)
            for in_mode in cuda_catalog.split_by_numerics([items[p] for p in live]).values():
                chosen = [live[i] for i in in_mode]
                self.groups.append(self._group(backend._device(device), kind, elem, mode, [items[p] for p in chosen],
                                               chosen))
        self.devices = sorted({g.launcher.device for g in self.groups}, key=str)
        self.use_graph = use_graph and len(self.devices) == 1
        self.graph: Any = None
        self.graph_failed: str | None = None
        self.runs = 0
        self.replays = 0
        self._copied: list[Any] = []
        self._last_scalars: StepScalars | None = None
        self._record: np.ndarray | None = None

    @staticmethod
    def _need_new_absmax(item: UpdateItem) -> bool:
        return item.quantized and not item.block_wise

    def _group(self, launcher: Any, kind: UpdateKind, elem: str, mode: str, items: list[UpdateItem],
               positions: list[int]) -> _Group:
        return _Group(launcher, kind, elem, mode, items, positions)

    def run(self, grad_ptrs: Sequence[int] | None, scalars: StepScalars) -> None:
        if scalars is not self._last_scalars:
            self._record = np.array(cuda_plan._scalar_fields(scalars), dtype=STEP_SCALARS)
            self._last_scalars = scalars
        ptrs = np.asarray(grad_ptrs, dtype=np.uint64) if grad_ptrs is not None else None
        for event in self._copied:  # the previous step's copies out of the pinned bytes
            event.synchronize()
        for group in self.groups:
            group.write(ptrs, self._record)
        self.runs += 1
        if self.graph is None and self._should_capture():
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
        else:
            self._launch_all()
        self._copied = [e for e in (GRAPHS.event(d) for d in self.devices) if e is not None]

    def _launch_all(self) -> None:
        for group in self.groups:
            group.launch()

    def _should_capture(self) -> bool:
        return (self.use_graph and self.graph_failed is None and self.runs > WARMUP_RUNS and bool(self.groups)
                and GRAPHS.available(self.devices[0]) and not GRAPHS.capturing(self.devices[0]))

    def _capture(self) -> None:
        try:
            self.graph = GRAPHS.capture(self.devices[0], self._launch_all)
        except RuntimeError as exc:  # e.g. an operation the driver cannot capture
            self.graph, self.graph_failed = None, str(exc)
            warnings.warn(
                f"pagedopt: capturing the optimizer step as a CUDA graph failed ({exc}); the step runs "
                "without a graph (pass cuda_graph=False to skip the attempt)",
                RuntimeWarning,
                stacklevel=4,
            )


class CudaPrepareLaunch(CudaLaunch):
    """Prepared prepare-pass launches over a fixed list of items, eager (never a graph): the
    pass before the update that trust ratios and tensor-wise 8-bit state need
    (:mod:`pagedopt.optim.launch_prepare`). ``run(grad_ptrs, scalars)`` returns float32
    maxima ``[n, 3]`` (state1's moments in columns 0-1, state2 in column 2: the layout of
    :class:`~pagedopt.backends.cpu_plan.CpuPrepareLaunch`) and float64 squared norms ``[n, 2]``
    (update, parameter) on the items' device, in item order; zero rows for empty items.
    """

    def __init__(self, backend: Any, kind: UpdateKind, items: Sequence[UpdateItem], want_norms: bool):
        self.want_norms = want_norms
        self.kind = kind
        super().__init__(backend, kind, items, use_graph=False)
        self.count = len(items)
        device = items[0].param.device if items else torch.device("cpu")
        self.maxima = torch.zeros((self.count, 3), dtype=torch.float32, device=device)
        self.norms = torch.zeros((self.count, 2), dtype=torch.float64, device=device)
        # The kernels put state2's maximum right after state1's moments: column 1 for the
        # one-moment two-state kinds (Adam, LAMB), where ours has it in column 2.
        self._swap = kind.state1_moments == 1 and kind.num_states == 2
        self._rows = [torch.as_tensor(g.positions, device=device) for g in self.groups]

    @staticmethod
    def _need_new_absmax(item: UpdateItem) -> bool:
        return False

    def _group(self, launcher: Any, kind: UpdateKind, elem: str, mode: str, items: list[UpdateItem],
               positions: list[int]) -> _Group:
        return _PrepareGroup(launcher, kind, elem, mode, items, positions, self.want_norms)

    def run(self, grad_ptrs: Sequence[int] | None, scalars: StepScalars) -> tuple[torch.Tensor, torch.Tensor]:
        super().run(grad_ptrs, scalars)
        for group, rows in zip(self.groups, self._rows):
            maxima = group.maxima[:, [0, 2, 1]] if self._swap else group.maxima
            self.maxima.index_copy_(0, rows, maxima)
            self.norms.index_copy_(0, rows, group.norms)
        return self.maxima, self.norms
