"""Prepared CUDA launches of the step plan (pagedopt/backends/cuda_prepared.py), run on the CPU
through the kernel emulation (tests/cuda_emulation.py): the CUDA backend serves CPU tensors
with an emulated launcher, so the host code - descriptor packing once per plan, per-step
scalar and gradient-pointer rewrites, launch arguments - is checked without a GPU.

Tolerance tier: ``EXACT`` - the emulator runs the reference per chunk on the descriptors the
host code uploaded, so the planned and per-item paths must agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import pagedopt
from cuda_emulation import EmulatedLauncher
from pagedopt.backends import cuda_plan
from pagedopt.backends.cuda import CudaBackend
from pagedopt.functional import dispatch


@pytest.fixture
def emulated(monkeypatch):
    launchers = []

    def factory(device):
        launchers.append(EmulatedLauncher())
        return launchers[-1]

    backend = CudaBackend(launcher_factory=factory)
    monkeypatch.setitem(dispatch._resolved, "cpu", backend)
    yield launchers
    dispatch.reset_backends()


def params():
    g = torch.Generator().manual_seed(0)
    specs = [((300, 20), torch.float32), ((4097,), torch.bfloat16), ((1,), torch.float32), ((0,), torch.float32),
             ((513,), torch.float16), ((2048,), torch.float32)]
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(d)) for s, d in specs]


def run(name: str, prepared: bool, steps: int = 3):
    ps = params()
    opt = pagedopt.optim.get_optimizer_class(name)(ps, min_8bit_size=0) if name.endswith("8bit") else \
        pagedopt.optim.get_optimizer_class(name)(ps)
    opt.prepared_launches = prepared
    for t in range(steps):
        g = torch.Generator().manual_seed(100 + t)
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=g) * 0.01).to(p.dtype)
        opt.param_groups[0]["lr"] = 1e-3 / (t + 1)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("name", ["AdamW8bit", "AdamW32bit", "Lion8bit", "AdEMAMix8bit"])
def test_prepared_cuda_launches_match_the_per_item_path(emulated, name):
    planned_params, planned = run(name, True)
    per_item_params, per_item = run(name, False)
    for a, b in zip(planned_params, per_item_params):
        assert torch.equal(a, b)
        for key in ("state1", "state2", "absmax1", "absmax2"):
            if key in planned.state[a]:
                assert torch.equal(planned.state[a][key], per_item.state[b][key]), key
    assert planned.plan_builds == 1 and not planned._plan.per_item


def test_descriptors_are_packed_once_per_plan(emulated, monkeypatch):
    packed = []
    real = cuda_plan.pack_update_descs

    def counting(kind, items):
        packed.append(len(items))
        return real(kind, items)

    monkeypatch.setattr(cuda_plan, "pack_update_descs", counting)
    ps, opt = run("AdamW8bit", True, steps=4)
    # three element types (f32, bf16, f16), one state mode: three launches, packed at plan time only
    assert len(packed) == 3 and sum(packed) == 5  # the empty parameter is never launched
    updates = [name for launcher in emulated for name, _, _ in launcher.launches if "update" in name]
    assert len(updates) == 3 * 4


def test_misaligned_new_gradient_clears_the_vector_flag(emulated):
    # a gradient that is a view at an odd offset: not 16-byte aligned, so vector loads must be off
    def go(prepared):
        p = torch.nn.Parameter(torch.randn(1000, generator=torch.Generator().manual_seed(9)) * 0.1)
        opt = pagedopt.AdamW32bit([p])
        opt.prepared_launches = prepared
        for t in range(4):
            base = torch.randn(1001, generator=torch.Generator().manual_seed(t)) * 0.01
            p.grad = base[1:] if t in (0, 2) else base[:1000].clone()  # plan built with a misaligned one
            opt.step()
        return p
    assert torch.equal(go(True), go(False))
