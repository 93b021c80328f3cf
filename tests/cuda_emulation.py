"""A CPU stand-in for the CUDA kernels, to test the CUDA backend's host code without a GPU.

:class:`EmulatedLauncher` plugs into :class:`pagedopt.backends.cuda.CudaBackend` in place of
the driver. Each "launch" is checked like the driver would (argument count and ranges for
the declared ctypes types) and then executed the way the kernel reads its inputs: the
descriptor array and chunk prefix are decoded from the raw bytes the launcher uploaded,
tensors are rebuilt from the raw pointers, and the per-element work is the pure-torch
reference applied chunk by chunk (fast-numerics kernels: its fast replay,
tests/fast_numerics.py, with exact approximations). So a wrong pointer, size, flag, scalar, prefix, argument
order or result layout in the host code shows up as a wrong result here.

Only the host code is under test; the CUDA C++ itself is checked on a GPU (tests/test_cuda.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import re

import numpy as np
import torch

import fast_numerics
from pagedopt.backends.cuda import DeviceLauncher
from pagedopt.backends.cuda_catalog import ELEM_CODES, MODE_CODES
from pagedopt.backends.cuda_layout import NORM_DESC, PREPARE_PARTIAL, TENSOR_DESC
from pagedopt.backends.cuda_plan import CHUNK_ELEMS, REDUCE_CHUNK_ELEMS, vector_ok
from pagedopt.backends.cuda_tables import build_tables
from pagedopt.functional import reference
from pagedopt.functional.items import UpdateItem
from pagedopt.functional.kinds import Algorithm, kind_for
from pagedopt.functional.quantization import num_blocks
from pagedopt.functional.scalars import StepScalars

# One update kind per algorithm: the kernels only know the algorithm (state layout and
# signedness follow from it); everything else arrives in StepScalars.
_KIND_OF_ALGORITHM = {
    Algorithm.ADAM: kind_for("adam"), Algorithm.ADEMAMIX: kind_for("ademamix"),
    Algorithm.MOMENTUM: kind_for("momentum"), Algorithm.LION: kind_for("lion"),
    Algorithm.RMSPROP: kind_for("rmsprop"), Algorithm.ADAGRAD: kind_for("adagrad"),
}
_ELEM_DTYPES = {ELEM_CODES["f32"]: torch.float32, ELEM_CODES["f16"]: torch.float16, ELEM_CODES["bf16"]: torch.bfloat16}
_NAME_RE = re.compile(r"^pagedopt::cuda::(\w+)(?:<([^>]*)>)?$")


def raw_bytes(address: int, nbytes: int) -> torch.Tensor:
    """A uint8 tensor aliasing ``nbytes`` of host memory at ``address``."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    assert address != 0, "kernel would dereference a null pointer"
    return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8)


def typed(address: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    size = torch.empty(0, dtype=dtype).element_size()
    return raw_bytes(address, count * size).view(dtype)


def structs(address: int, count: int, dtype: np.dtype) -> np.ndarray:
    """A writable numpy view of ``count`` C structs at ``address``."""
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return raw_bytes(address, count * dtype.itemsize).numpy().view(dtype)


class EmulatedLauncher(DeviceLauncher):
    """Executes the backend's launches on the CPU (see the module docstring)."""

    def __init__(self, approx: fast_numerics.Approx = fast_numerics.EXACT) -> None:
        tables = build_tables()
        self.approx = approx  # how the fast kernels' approximate sqrt/division err
        self.device = torch.device("cpu")
        self.maps = torch.from_numpy(tables.maps.copy())
        self.luts = torch.from_numpy(tables.luts.copy())
        self.launches: list[tuple[str, int, int | None]] = []
        self.numerics_launched: list[int | None] = []
        self.nonfinite_pointers: list[int] = []  # the update launches' count argument

    def kernel(self, program, spec):
        assert spec in program.kernels, f"{spec.name} is not part of program {program.slug}"
        return spec

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host.clone()

    def guard(self):
        return contextlib.nullcontext()

    # -- launch --------------------------------------------------------------------------------------

    def launch(self, kernel, work_units: int, grid: int | None, args) -> None:
        assert len(args) == len(kernel.params), f"{kernel.name}: {len(args)} args for {len(kernel.params)} params"
        for value, ctype in zip(args, kernel.params):
            assert isinstance(value, int), f"{kernel.name}: argument {value!r} is not an int"
            assert (ctype(value).value or 0) == value, f"{kernel.name}: {value} does not fit {ctype.__name__}"
        assert work_units >= 1 and (grid is None or grid >= 1)
        self.launches.append((kernel.name, work_units, grid))
        base, targs = _NAME_RE.match(kernel.name).groups()
        targs = [int(a) for a in targs.split(",")] if targs else []
        if base in ("update_kernel", "prepare_kernel") and len(targs) == 3:
            targs.append(0)  # the numerics parameter's default: strict
        self.numerics_launched.append(targs[3] if len(targs) == 4 else None)
        getattr(self, f"_{base}")(*targs, *args, work_units=work_units, grid=grid)

    # -- optimizer kernels ---------------------------------------------------------------------------

    def _items(self, algo, elem, mode, descs_ptr, prefix_ptr, n, chunk_elems):
        descs = structs(descs_ptr, n, TENSOR_DESC)
        prefix = structs(prefix_ptr, n + 1, np.dtype(np.int64))
        kind = _KIND_OF_ALGORITHM[Algorithm(algo)]
        dtype = _ELEM_DTYPES[elem]
        out = []
        for t, d in enumerate(descs):
            numel = int(d["numel"])
            assert prefix[t + 1] - prefix[t] == -(-numel // chunk_elems), f"tensor {t}: chunk prefix"
            item = self._item(kind, dtype, mode, d)
            assert bool(d["flags"] & 1) == vector_ok(kind, item), f"tensor {t}: vector flag"
            out.append((item, int(prefix[t]), int(prefix[t + 1])))
        return kind, out

    @staticmethod
    def _item(kind, dtype, mode, d) -> UpdateItem:
        numel, k1 = int(d["numel"]), kind.state1_moments
        quantized = mode != MODE_CODES["state32"]
        block_wise = mode != MODE_CODES["tensor8"]
        sdtype = torch.uint8 if quantized else torch.float32
        shape1 = (k1, numel) if k1 > 1 else (numel,)
        s1 = typed(int(d["state1"]), k1 * numel, sdtype).reshape(shape1)
        s2 = typed(int(d["state2"]), numel, sdtype) if kind.num_states == 2 else None
        a1 = a2 = n1 = n2 = None
        if quantized:
            blocks = num_blocks(numel, block_wise)
            a1 = typed(int(d["absmax1"]), k1 * blocks, torch.float32)
            a1 = a1.reshape(k1, blocks) if k1 > 1 else a1
            a2 = typed(int(d["absmax2"]), blocks, torch.float32) if kind.num_states == 2 else None
            if not block_wise and d["new_absmax1"]:
                n1 = typed(int(d["new_absmax1"]), k1, torch.float32)
                n2 = typed(int(d["new_absmax2"]), 1, torch.float32) if kind.num_states == 2 else None

        def scale(name):
            return typed(int(d[name]), 1, torch.float32).reshape(()) if d[name] else None

        return UpdateItem(
            param=typed(int(d["param"]), numel, dtype), grad=typed(int(d["grad"]), numel, dtype),
            state1=s1, state2=s2, absmax1=a1, absmax2=a2,
            scalars=StepScalars(*d["scalars"].tolist()),
            block_wise=block_wise, gnorm_scale=scale("gnorm_scale"), update_scale=scale("update_scale"),
            new_absmax1=n1, new_absmax2=n2,
        )

    def _update_kernel(self, algo, elem, mode, numerics, descs_ptr, prefix_ptr, n, maps, luts, nonfinite, *,
                       work_units, grid):
        def run(kind, items):
            if numerics == 1:
                fast_numerics.update(kind, items, self.approx)
            else:
                for item in items:  # (update_one: the kernel counts below, not the reference's report)
                    reference.update_one(kind, item)

        assert (maps, luts) == (self.maps.data_ptr(), self.luts.data_ptr())
        kind, items = self._items(algo, elem, mode, descs_ptr, prefix_ptr, n, CHUNK_ELEMS)
        assert work_units == items[-1][2] if items else work_units == 0
        if nonfinite:  # the kernel's atomicAdd into the watch's running count (an int64)
            counter = typed(nonfinite, 1, torch.int64)
            counter += sum(int(torch.isfinite(item.grad).logical_not().sum()) for item, _, _ in items)
        self.nonfinite_pointers.append(nonfinite)
        for item, _, _ in items:
            if mode == MODE_CODES["tensor8"]:
                assert item.new_absmax1 is not None, "tensor-wise update without maxima"
                saved = [a.clone() for a in (item.absmax1, item.absmax2) if a is not None]
                run(kind, [item])
                for a, s in zip([a for a in (item.absmax1, item.absmax2) if a is not None], saved):
                    a.copy_(s)  # the kernel never writes tensor-wise absmax; the host copies it after
            else:
                run(kind, [item])

    def _prepare_kernel(self, algo, elem, mode, numerics, descs_ptr, prefix_ptr, n, maps, luts, partials_ptr,
                        want_norms, *, work_units, grid):
        def prepare_one(kind, item, want_norms):
            if numerics == 1:
                return fast_numerics.prepare_one(kind, item, want_norms, self.approx)
            return reference.prepare_one(kind, item, want_norms)

        kind, items = self._items(algo, elem, mode, descs_ptr, prefix_ptr, n, REDUCE_CHUNK_ELEMS)
        total = items[-1][2] if items else 0
        assert work_units == total
        partials = structs(partials_ptr, total, PREPARE_PARTIAL)
        for item, first, last in items:
            for c in range(first, last):
                part = _chunk_of(kind, item, (c - first) * REDUCE_CHUNK_ELEMS, REDUCE_CHUNK_ELEMS)
                r = prepare_one(kind, part, bool(want_norms))
                maxima = [0.0, 0.0, 0.0]
                if mode == MODE_CODES["tensor8"]:
                    values = r.max1.tolist() + (r.max2.tolist() if r.max2 is not None else [])
                    maxima[: len(values)] = values
                partials[c] = (
                    float(r.unorm_sq) if want_norms else 0.0, float(r.pnorm_sq) if want_norms else 0.0, maxima, 0.0,
                )

    def _finalize_prepare(self, prefix_ptr, n, partials_ptr, norms_ptr, maxima_ptr, *, work_units, grid):
        assert grid == n
        prefix = structs(prefix_ptr, n + 1, np.dtype(np.int64))
        partials = structs(partials_ptr, int(prefix[-1]), PREPARE_PARTIAL)
        norms = typed(norms_ptr, 2 * n, torch.float64)
        maxima = typed(maxima_ptr, 3 * n, torch.float32)
        for t in range(n):
            chunk = partials[prefix[t] : prefix[t + 1]]
            norms[2 * t] = float(chunk["unorm_sq"].sum())
            norms[2 * t + 1] = float(chunk["pnorm_sq"].sum())
            maxima[3 * t : 3 * t + 3] = torch.from_numpy(chunk["max"].max(axis=0) if len(chunk) else np.zeros(3, np.float32))

    # -- norm kernels --------------------------------------------------------------------------------

    def _grad_norm_partials(self, elem, descs_ptr, prefix_ptr, n, partials_ptr, *, work_units, grid):
        descs = structs(descs_ptr, n, NORM_DESC)
        prefix = structs(prefix_ptr, n + 1, np.dtype(np.int64))
        assert work_units == prefix[-1]
        partials = typed(partials_ptr, int(prefix[-1]), torch.float64)
        for t, d in enumerate(descs):
            data = typed(int(d["data"]), int(d["numel"]), _ELEM_DTYPES[elem])
            assert bool(d["flags"] & 1) == (int(d["data"]) % 16 == 0)
            for c in range(int(prefix[t]), int(prefix[t + 1])):
                lo = (c - int(prefix[t])) * REDUCE_CHUNK_ELEMS
                (partials[c],) = reference.grad_norm_sq([data[lo : lo + REDUCE_CHUNK_ELEMS]])

    def _finalize_sums(self, prefix_ptr, n, partials_ptr, out_ptr, *, work_units, grid):
        assert grid == n
        prefix = structs(prefix_ptr, n + 1, np.dtype(np.int64))
        partials = typed(partials_ptr, int(prefix[-1]), torch.float64)
        out = typed(out_ptr, n, torch.float64)
        for t in range(n):
            out[t] = partials[int(prefix[t]) : int(prefix[t + 1])].sum()


def _chunk_of(kind, item: UpdateItem, lo: int, length: int) -> UpdateItem:
    """The elements [lo, lo + length) of an item (block-aligned), as the kernel sees a chunk."""
    n = item.param.numel()
    hi = min(n, lo + length)
    k1 = kind.state1_moments

    def moments(t):
        return t.reshape(k1, n)[:, lo:hi].reshape((k1, hi - lo) if k1 > 1 else (hi - lo,))

    a1, a2 = item.absmax1, item.absmax2
    if item.quantized and item.block_wise:
        b0, b1 = lo // 256, -(-hi // 256)
        a1 = a1.reshape(k1, -1)[:, b0:b1].reshape((k1, b1 - b0) if k1 > 1 else (b1 - b0,))
        a2 = a2[b0:b1] if a2 is not None else None
    return UpdateItem(
        item.param[lo:hi], item.grad[lo:hi], moments(item.state1),
        item.state2[lo:hi] if item.state2 is not None else None, a1, a2, item.scalars,
        block_wise=item.block_wise, gnorm_scale=item.gnorm_scale, update_scale=item.update_scale,
    )
