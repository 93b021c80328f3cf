"""The CUDA backend: pagedopt's NVRTC-compiled kernels behind the functional dispatch.

Importing this module registers a *lazy* loader for ``"cuda"`` tensors with
:func:`pagedopt.functional.dispatch.register_backend`; nothing CUDA-related is imported until
the first CUDA tensor reaches an update. The loader then checks, in order, that torch sees a
GPU, that cuda-python and the NVRTC library import, that the driver initialises and that the
kernel sources exist. When something is missing, CUDA updates raise :class:`CudaUnavailableError`
naming it and ``pip install pagedopt[cuda]`` - unless ``PAGEDOPT_CUDA_FALLBACK=reference``, which
runs the (much slower, pure-torch) reference on CUDA tensors instead, with one warning.

Per step and per (device, dtype, state mode) group there is one launch for all tensors: a
descriptor array (pointers, sizes, float32 step scalars - :mod:`~pagedopt.backends.cuda_plan`)
is copied from pinned memory asynchronously, and the kernel walks every tensor's chunks in a
grid-stride loop. Everything runs on ``torch.cuda.current_stream()``; nothing waits for the
device (no ``synchronize``, no ``.item()``). Kernels are compiled for the device's
architecture on first use and cached on disk (:mod:`~pagedopt.backends.cuda_compiler`;
``pagedopt kernels`` fills the cache ahead of time).

Example:
    >>> import torch, pagedopt  # doctest: +SKIP
    >>> p = torch.nn.Parameter(torch.randn(4096, device="cuda"))  # doctest: +SKIP
    >>> opt = pagedopt.AdamW8bit([p]); p.grad = torch.randn_like(p); opt.step()  # doctest: +SKIP
    >>> from pagedopt.functional.dispatch import backend_for  # doctest: +SKIP
    >>> backend_for(p.device).name  # doctest: +SKIP
    'cuda'
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from typing import Any, Callable, Sequence

import torch

from ..functional import dispatch, nonfinite_tally, reference
from ..functional.items import PrepareResult, UpdateItem
from ..functional.kinds import UpdateKind

FALLBACK_ENV = "PAGEDOPT_CUDA_FALLBACK"
INSTALL_HINT = "pip install pagedopt[cuda]"


class CudaUnavailableError(RuntimeError):
    """pagedopt's CUDA kernels cannot run here (the message says what is missing)."""


class UnavailableCudaBackend:
    """Stands in for the CUDA backend when it cannot load: every operation raises."""

    name = "cuda-unavailable"

    def __init__(self, reason: str):
        self.reason = reason

    def _raise(self, *args: Any, **kwargs: Any):
        raise CudaUnavailableError(
            f"pagedopt cannot run its CUDA kernels: {self.reason}. Install the CUDA extras with "
            f"`{INSTALL_HINT}`, or set {FALLBACK_ENV}=reference to run the slower pure-torch "
            "reference on CUDA tensors."
        )

    grad_norm_sq = prepare = update = _raise


class CudaBackend:
    """The NVRTC kernels (see the module docstring); one instance serves every device.

    ``launcher_factory`` builds the per-device launcher (default: :class:`CudaLauncher`); the
    test suite passes an emulator to run the host code on the CPU.

    Example:
        >>> import torch  # doctest: +SKIP
        >>> from pagedopt.backends.cuda import CudaBackend  # doctest: +SKIP
        >>> g = torch.randn(10_000, device="cuda")  # doctest: +SKIP
        >>> CudaBackend().grad_norm_sq([g])[0].dtype  # doctest: +SKIP
        torch.float64
    """

    name = "cuda"

    def __init__(self, launcher_factory: Callable[[torch.device], DeviceLauncher] | None = None) -> None:
        self._launchers: dict[torch.device, DeviceLauncher] = {}
        self._factory = launcher_factory or _cuda_launcher
        self._lock = threading.Lock()

    # -- per-device state ------------------------------------------------------------------------

    def _device(self, device: torch.device) -> DeviceLauncher:
        launcher = self._launchers.get(device)
        if launcher is None:
            with self._lock:
                launcher = self._launchers.get(device)
                if launcher is None:
                    launcher = self._factory(device)
                    self._launchers[device] = launcher
        return launcher

    # -- Backend protocol ------------------------------------------------------------------------

    def grad_norm_sq(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        from . import cuda_plan

        out: list[torch.Tensor | None] = [None] * len(grads)
        groups: dict[tuple[torch.device, str], list[int]] = {}
        fallback = []
        for i, g in enumerate(grads):
            elem = cuda_plan.elem_of(g.dtype)
            if elem is None:
                fallback.append(i)
            else:
                groups.setdefault((g.device, elem), []).append(i)
        if fallback:
            for i, r in zip(fallback, reference.grad_norm_sq([grads[i] for i in fallback])):
                out[i] = r
        for (device, elem), idx in groups.items():
            tensors = [grads[i].detach() for i in idx]
            tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
            sums = self._device(device).grad_norm_sq(elem, tensors)
            for j, i in enumerate(idx):
                out[i] = sums[j]
        return out  # type: ignore[return-value]

    def prepare(self, kind: UpdateKind, items: Sequence[UpdateItem], want_norms: bool) -> list[PrepareResult]:
        from . import cuda_plan

        results = [PrepareResult() for _ in items]
        todo = [i for i, it in enumerate(items) if want_norms or (it.quantized and not it.block_wise)]
        native = [i for i in todo if cuda_plan.kernel_handles(items[i])]
        for i in sorted(set(todo) - set(native)):
            results[i] = reference.prepare_one(kind, items[i], want_norms)
        for i in native:
            cuda_plan.check_item(kind, items[i], i)
        staged = cuda_plan.stage([items[i] for i in native], writes=False)
        for (device, elem, mode), positions in cuda_plan.group_items(staged.items).items():
            group = [staged.items[p] for p in positions]
            out = self._device(device).prepare(kind, elem, mode, group, want_norms)
            for p, r in zip(positions, out):
                results[native[p]] = r
        return results

    def update(self, kind: UpdateKind, items: Sequence[UpdateItem]) -> None:
        from . import cuda_plan

        native = [i for i, it in enumerate(items) if cuda_plan.kernel_handles(it)]
        native_set = set(native)
        fallback = [it for i, it in enumerate(items) if i not in native_set]
        if fallback:
            reference.update(kind, fallback)
        work = [items[i] for i in native]
        for i, item in enumerate(work):
            cuda_plan.check_item(kind, item, native[i])
        work = self._fill_tensorwise_maxima(kind, work)
        for i, item in enumerate(work):  # only tensor-wise items changed or need more checks
            if item.quantized and not item.block_wise:
                cuda_plan.check_item(kind, item, native[i], need_new_absmax=True)
        staged = cuda_plan.stage(work, writes=True)
        for (device, elem, mode), positions in cuda_plan.group_items(staged.items).items():
            self._device(device).update(kind, elem, mode, [staged.items[p] for p in positions])
        staged.finish()

    def _fill_tensorwise_maxima(self, kind: UpdateKind, items: list[UpdateItem]) -> list[UpdateItem]:
        """Tensor-wise 8-bit items need the maxima of their updated states before the update;
        the optimizer passes them from its prepare pass, direct callers may not."""
        missing = [i for i, it in enumerate(items) if it.quantized and not it.block_wise and it.new_absmax1 is None]
        if not missing:
            return items
        prepared = self.prepare(kind, [items[i] for i in missing], want_norms=False)
        items = list(items)
        for i, r in zip(missing, prepared):
            items[i] = dataclasses.replace(items[i], new_absmax1=r.max1, new_absmax2=r.max2)
        return items


def _counter_ptr(device: torch.device) -> int:
    """Where the update kernel adds its count of NaN/Inf gradient elements: the non-finite
    watch's running count on ``device`` during an optimizer step, else 0 (not counted)."""
    counter = nonfinite_tally.device_counter(device)
    return counter.data_ptr() if counter is not None else 0


class DeviceLauncher:
    """The launch logic for one device, independent of how kernels are loaded and launched.

    Subclasses provide ``device``, ``maps``/``luts`` (the quantization tables on the device),
    :meth:`kernel`, :meth:`launch`, :meth:`to_device` and :meth:`guard`. :class:`CudaLauncher`
    does it with the driver; the CPU test suite plugs in an emulator to check this code
    (descriptor packing, chunk prefixes, argument order, result layout) without a GPU.
    """

    device: torch.device
    maps: torch.Tensor
    luts: torch.Tensor

    def kernel(self, program, spec) -> Any:
        raise NotImplementedError

    def launch(self, kernel, work_units: int, grid: int | None, args: Sequence[int]) -> None:
        """Launch on the current stream; ``grid=None``: one wave, grid-stride over the units."""
        raise NotImplementedError

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def guard(self):
        raise NotImplementedError

    def _descriptors(self, descs, prefix) -> tuple[torch.Tensor, int, int]:
        """Upload descriptors + chunk prefix; returns (device buffer, descs ptr, prefix ptr)."""
        from . import cuda_plan

        host, offset = cuda_plan.launch_buffer(descs, prefix)
        buffer = self.to_device(torch.from_numpy(host))
        base = buffer.data_ptr()
        return buffer, base, base + offset

    # -- operations --------------------------------------------------------------------------------

    def grad_norm_sq(self, elem: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        from . import cuda_catalog, cuda_plan

        program = cuda_catalog.norm_program()
        prefix = cuda_plan.chunk_prefix([t.numel() for t in tensors], cuda_plan.REDUCE_CHUNK_ELEMS)
        total, n = int(prefix[-1]), len(tensors)
        with self.guard():
            out = torch.empty(n, dtype=torch.float64, device=self.device)
            partials = torch.empty(total, dtype=torch.float64, device=self.device)
            buffer, descs_ptr, prefix_ptr = self._descriptors(cuda_plan.pack_norm_descs(tensors), prefix)
            if total:
                kernel = self.kernel(program, cuda_catalog.grad_norm_kernel(elem))
                self.launch(kernel, total, None, (descs_ptr, prefix_ptr, n, partials.data_ptr()))
            finalize = self.kernel(program, cuda_catalog.FINALIZE_SUMS)
            self.launch(finalize, n, n, (prefix_ptr, n, partials.data_ptr(), out.data_ptr()))
            del buffer  # the caching allocator reuses it only for later work on this stream
        return list(out.unbind(0))

    def prepare(self, kind: UpdateKind, elem: str, mode: str, items: list[UpdateItem], want_norms: bool) -> list[PrepareResult]:
        from . import cuda_catalog, cuda_plan
        from .cuda_layout import PREPARE_PARTIAL

        by_numerics = cuda_catalog.split_by_numerics(items)  # one launch per numerics mode
        if len(by_numerics) > 1:
            results: list[PrepareResult] = [PrepareResult()] * len(items)
            for positions in by_numerics.values():
                for p, r in zip(positions, self.prepare(kind, elem, mode, [items[p] for p in positions], want_norms)):
                    results[p] = r
            return results
        numerics = next(iter(by_numerics), cuda_catalog.DEFAULT_NUMERICS)
        program = cuda_catalog.optimizer_program(kind.algorithm, elem, numerics)
        prefix = cuda_plan.chunk_prefix([it.param.numel() for it in items], cuda_plan.REDUCE_CHUNK_ELEMS)
        total, n = int(prefix[-1]), len(items)
        with self.guard():
            partials = torch.empty(total * PREPARE_PARTIAL.itemsize, dtype=torch.uint8, device=self.device)
            norms = torch.empty((n, 2), dtype=torch.float64, device=self.device)
            maxima = torch.empty((n, 3), dtype=torch.float32, device=self.device)
            buffer, descs_ptr, prefix_ptr = self._descriptors(cuda_plan.pack_update_descs(kind, items), prefix)
            if total:
                kernel = self.kernel(program, cuda_catalog.prepare_kernel(kind.algorithm, elem, mode, numerics))
                args = (descs_ptr, prefix_ptr, n, self.maps.data_ptr(), self.luts.data_ptr(), partials.data_ptr(), int(want_norms))
                self.launch(kernel, total, None, args)
            finalize = self.kernel(program, cuda_catalog.FINALIZE_PREPARE)
            self.launch(finalize, n, n, (prefix_ptr, n, partials.data_ptr(), norms.data_ptr(), maxima.data_ptr()))
            del buffer
        k1 = kind.state1_moments
        results = []
        for j in range(n):
            r = PrepareResult()
            if mode == "tensor8":
                r.max1 = maxima[j, :k1]
                if kind.num_states == 2:
                    r.max2 = maxima[j, k1 : k1 + 1]
            if want_norms:
                r.unorm_sq, r.pnorm_sq = norms[j, 0], norms[j, 1]
            results.append(r)
        return results

    def update(self, kind: UpdateKind, elem: str, mode: str, items: list[UpdateItem]) -> None:
        from . import cuda_catalog, cuda_plan

        by_numerics = cuda_catalog.split_by_numerics(items)  # one launch per numerics mode
        if len(by_numerics) > 1:
            for positions in by_numerics.values():
                self.update(kind, elem, mode, [items[p] for p in positions])
            return
        numerics = next(iter(by_numerics), cuda_catalog.DEFAULT_NUMERICS)
        program = cuda_catalog.optimizer_program(kind.algorithm, elem, numerics)
        live = [it for it in items if it.param.numel() > 0]
        with self.guard():
            if live:
                prefix = cuda_plan.chunk_prefix([it.param.numel() for it in live], cuda_plan.CHUNK_ELEMS)
                buffer, descs_ptr, prefix_ptr = self._descriptors(cuda_plan.pack_update_descs(kind, live), prefix)
                kernel = self.kernel(program, cuda_catalog.update_kernel(kind.algorithm, elem, mode, numerics))
                args = (descs_ptr, prefix_ptr, len(live), self.maps.data_ptr(), self.luts.data_ptr(),
                        _counter_ptr(self.device))
                self.launch(kernel, int(prefix[-1]), None, args)
                del buffer
            if mode == "tensor8":
                # every CTA read the old absmax during the launch; the new one lands after it
                targets, values = [], []
                for it in items:
                    targets.append(it.absmax1)
                    values.append(it.new_absmax1.reshape(it.absmax1.shape))
                    if kind.num_states == 2:
                        targets.append(it.absmax2)
                        values.append(it.new_absmax2.reshape(it.absmax2.shape))
                torch._foreach_copy_(targets, values)


class CudaLauncher(DeviceLauncher):
    """:class:`DeviceLauncher` on a real GPU: NVRTC cubins in torch's primary context."""

    def __init__(self, index: int):
        from . import cuda_driver, cuda_tables

        self.index = index
        self.device = torch.device("cuda", index)
        with torch.cuda.device(index):
            self.ctx = cuda_driver.DeviceContext(index)
            tables = cuda_tables.build_tables()
            # A blocking copy, once per device: the tables must be in place for kernels on
            # any stream, not only the current one.
            self.maps = torch.from_numpy(tables.maps).to(self.device)
            self.luts = torch.from_numpy(tables.luts).to(self.device)
        self._kernels: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def kernel(self, program, spec) -> Any:
        from . import cuda_compiler

        loaded = self._kernels.get(program.slug)
        if loaded is None:
            with self._lock:
                loaded = self._kernels.get(program.slug)
                if loaded is None:
                    compiled = cuda_compiler.compile_program(program, self.ctx.arch)
                    loaded = self.ctx.load(compiled)
                    self._kernels[program.slug] = loaded
        return loaded[spec.name]

    def launch(self, kernel, work_units: int, grid: int | None, args: Sequence[int]) -> None:
        stream = torch.cuda.current_stream(self.index).cuda_stream
        self.ctx.make_current()
        self.ctx.launch(kernel, grid if grid is not None else self.ctx.grid_for(kernel, work_units), args, stream)

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        return _upload(host, self.index)

    def guard(self):
        return torch.cuda.device(self.index)


def _cuda_launcher(device: torch.device) -> CudaLauncher:
    return CudaLauncher(device.index if device.index is not None else torch.cuda.current_device())


def _upload(host: torch.Tensor, index: int) -> torch.Tensor:
    """Host tensor -> device, asynchronously through pinned memory on the current stream
    (the kernels that read it run on that stream, after the copy).

    torch's pinned-memory allocator records the copy's stream, so the pinned block is not
    reused before the copy ran."""
    pinned = host.pin_memory()
    return pinned.to(torch.device("cuda", index), non_blocking=True)


# --- loading and registration ---------------------------------------------------------------------


def kernel_stats() -> dict[str, float]:
    """Kernel compile/cache/load counters for telemetry (see ``cuda_compiler.KernelStats``)."""
    from .cuda_compiler import kernel_stats as stats

    return stats()


_warned_fallback = False


def _missing_piece() -> str | None:
    """What stops the kernels from running here, or None when everything is in place."""
    if not torch.cuda.is_available():
        return "torch reports no usable CUDA device (torch.cuda.is_available() is False)"
    try:
        from .cuda_compiler import NvrtcUnavailableError, native_dir, nvrtc_version
        from .cuda_driver import DriverUnavailableError, init_driver
    except ImportError as exc:  # pragma: no cover - our own modules
        return f"pagedopt's CUDA backend failed to import ({exc})"
    try:
        nvrtc_version()
    except NvrtcUnavailableError as exc:
        return str(exc)
    try:
        init_driver()
    except DriverUnavailableError as exc:
        return str(exc)
    try:
        native_dir()
    except FileNotFoundError as exc:
        return str(exc)
    return None


def load_backend() -> CudaBackend | UnavailableCudaBackend | None:
    """The loader registered for ``"cuda"``: the backend, a raising stand-in, or None (the
    dispatch then uses the reference) when ``PAGEDOPT_CUDA_FALLBACK=reference``."""
    global _warned_fallback
    missing = _missing_piece()
    if missing is None:
        return CudaBackend()
    if os.environ.get(FALLBACK_ENV, "").strip().lower() == "reference":
        if not _warned_fallback:
            warnings.warn(
                f"pagedopt: CUDA kernels unavailable ({missing}); {FALLBACK_ENV}=reference, so CUDA "
                "tensors use the pure-torch reference (correct but several times slower)",
                RuntimeWarning,
                stacklevel=2,
            )
            _warned_fallback = True
        return None
    return UnavailableCudaBackend(missing)


dispatch.register_backend("cuda", load_backend)
