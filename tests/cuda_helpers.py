"""Shared builders and comparisons for the CUDA backend tests (GPU and emulated).

Example:
    >>> from cuda_helpers import make_item
    >>> kind, item = make_item("adamw", 300, torch.float32, "block8", seed=0)
    >>> item.state1.dtype, tuple(item.absmax1.shape)
    (torch.uint8, (2,))
"""

from __future__ import annotations

import dataclasses

import torch

from pagedopt.functional import reference
from pagedopt.functional.items import UpdateItem
from pagedopt.functional.kinds import kind_for
from pagedopt.functional.quantization import quantize
from pagedopt.functional.scalars import step_scalars

KINDS = ("adam", "adamw", "lamb", "ademamix", "momentum", "lars", "lion", "rmsprop", "adagrad")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("state32", "block8", "tensor8")
SIZES = (1, 3, 255, 256, 257, 4097, 2048 * 3 + 100, 70_001)

HP = {
    "adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
    "adamw": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
    "lamb": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
    "ademamix": dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), eps=1e-8, weight_decay=0.01, alpha=5.0, t_alpha=10, t_beta3=10),
    "momentum": dict(lr=1e-2, betas=(0.9, 0.1), weight_decay=0.01, nesterov=True),
    "lars": dict(lr=1e-2, betas=(0.9, 0.0), weight_decay=0.01),
    "lion": dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01),
    "rmsprop": dict(lr=1e-2, betas=(0.99, 0.0), eps=1e-8, weight_decay=0.01),
    "adagrad": dict(lr=1e-2, betas=(0.0, 0.0), eps=1e-10, weight_decay=0.01, lr_decay=0.01),
}


# --- building items ------------------------------------------------------------------------------


def _states(kind, n, mode, gen):
    """Realistic states: first moments ~1e-3 (signed), second moments ~1e-5 (non-negative)."""
    out = []
    for index in range(kind.num_states):
        moments = kind.state1_moments if index == 0 else 1
        signed = kind.state_signed[index]
        values = torch.randn((moments, n), generator=gen) * 1e-3 if signed else torch.rand((moments, n), generator=gen) * 1e-5
        shape = (moments, n) if moments > 1 else (n,)
        if mode == "state32":
            out.append((values.reshape(shape).contiguous(), None))
            continue
        block_wise = mode == "block8"
        pairs = [quantize(values[k], signed, block_wise) for k in range(moments)]
        codes = torch.stack([c for c, _ in pairs]).reshape(shape)
        absmax = torch.stack([a for _, a in pairs])  # [moments, blocks]
        out.append((codes, absmax if moments > 1 else absmax[0]))
    return out


def make_item(kind_name, n, dtype, mode, seed, *, step=3, scales=False, specials=True, skip_zeros=False,
              numerics="strict"):
    """A CPU item with random data (gradients with NaN/+-Inf/0 at fixed spots); ``numerics``
    picks the CUDA kernel variant (strict: bit-exact against the reference)."""
    kind = kind_for(kind_name)
    gen = torch.Generator().manual_seed(seed)
    param = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    grad = (torch.randn(n, generator=gen) * 0.01).to(dtype)
    if specials and n >= 4:
        grad[0], grad[1], grad[2], grad[n // 2] = float("nan"), float("inf"), float("-inf"), 0.0
    (s1, a1), *rest = _states(kind, n, mode, gen)
    s2, a2 = rest[0] if rest else (None, None)
    item = UpdateItem(
        param, grad, s1, s2, a1, a2, step_scalars(kind, HP[kind_name], step, skip_zeros=skip_zeros),
        block_wise=mode != "tensor8", numerics=numerics,
    )
    if scales:
        item.gnorm_scale = torch.tensor(0.75)
        item.update_scale = torch.tensor(0.625)
    return kind, item


_TENSOR_FIELDS = ("param", "grad", "state1", "state2", "absmax1", "absmax2", "gnorm_scale", "update_scale",
                  "new_absmax1", "new_absmax2")


def to_device(item: UpdateItem, device) -> UpdateItem:
    return dataclasses.replace(
        item, **{f: getattr(item, f).to(device, copy=True) for f in _TENSOR_FIELDS if getattr(item, f) is not None}
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    if t.dtype == torch.float64:
        return t.view(torch.int64)
    return t


def assert_bit_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    g, w = _bits(got), _bits(want)
    assert g.shape == w.shape, f"{what}: shape {tuple(g.shape)} != {tuple(w.shape)}"
    bad = (g != w).reshape(-1).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise AssertionError(
            f"{what}: {bad.numel()} of {g.numel()} elements differ; first at {i}: "
            f"{got.detach().cpu().reshape(-1)[i].item()!r} != {want.detach().cpu().reshape(-1)[i].item()!r}"
        )


def assert_items_equal(got: UpdateItem, want: UpdateItem, label: str) -> None:
    for name in ("param", "state1", "state2", "absmax1", "absmax2"):
        if getattr(want, name) is not None:
            assert_bit_equal(getattr(got, name), getattr(want, name), f"{label} {name}")


def run_prepare_and_update(backend, kind, cpu_items, gpu_items, want_norms=True, oracle=reference, exact=True):
    """Prepare (norms; tensor-wise maxima) and update on both sides; compare the prepare.
    ``oracle``: a module with ``prepare``/``update`` run on the CPU items (the reference, or
    the fast-kernel replay ``fast_numerics``). ``exact=False`` (fast kernels against strict
    CPU items): maxima within 1e-5 relative instead of bit for bit."""
    ref = oracle.prepare(kind, cpu_items, want_norms)
    got = backend.prepare(kind, gpu_items, want_norms)
    for i, (r, g) in enumerate(zip(ref, got)):
        for name in ("max1", "max2"):
            if getattr(r, name) is not None and exact:
                assert_bit_equal(getattr(g, name), getattr(r, name), f"item {i} prepare {name}")  # exact: max
            elif getattr(r, name) is not None:
                torch.testing.assert_close(getattr(g, name).cpu(), getattr(r, name), rtol=1e-5, atol=0.0)
            else:
                assert getattr(g, name) is None
        if want_norms and exact:
            for name in ("unorm_sq", "pnorm_sq"):
                # tier float64 order
                torch.testing.assert_close(getattr(g, name).cpu(), getattr(r, name), rtol=1e-10, atol=0.0)
    cpu_items = [dataclasses.replace(it, new_absmax1=r.max1, new_absmax2=r.max2) for it, r in zip(cpu_items, ref)]
    gpu_items = [dataclasses.replace(it, new_absmax1=g.max1, new_absmax2=g.max2) for it, g in zip(gpu_items, got)]
    oracle.update(kind, cpu_items)
    backend.update(kind, gpu_items)
    return cpu_items, gpu_items


def _skip_reason() -> str | None:
    """Why the GPU tests cannot run here (None: they can)."""
    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU (torch.cuda.is_available() is False)"
    from pagedopt.backends.cuda import _missing_piece

    missing = _missing_piece()
    return f"CUDA backend unavailable: {missing}" if missing else None


SKIP_REASON = _skip_reason()
