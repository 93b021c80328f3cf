"""The native CPU library built for aarch64 and run under emulation (qemu-user).

The library has only its ``baseline`` level there (the x86 intrinsics are compiled out); this
test cross-compiles ``native/cpu`` with ``aarch64-linux-gnu-g++`` together with a small C++
driver (``tests/native_smoke/smoke.cpp``), runs 8-bit block-wise AdamW steps under
``qemu-aarch64`` on an odd-sized tensor with NaN/Inf gradient elements, and compares the
parameters, codes and absmax with the pure-torch reference. Exact tier: the kernels perform
the reference's float32 operations in the same order on every architecture (no FMA
contraction, IEEE division and sqrt).

Needs the Debian/Ubuntu packages ``g++-aarch64-linux-gnu`` and ``qemu-user``; skipped without
them. Slow (the cross build takes minutes).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pagedopt.backends import cpu
from pagedopt.functional import reference
from pagedopt.functional.items import UpdateItem
from pagedopt.functional.kinds import kind_for
from pagedopt.functional.qmap import decision_thresholds, dynamic_map
from pagedopt.functional.quantization import num_blocks
from pagedopt.functional.scalars import step_scalars

ROOT = Path(__file__).resolve().parents[1]
CROSS = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CROSS is None or QEMU is None,
                       reason="needs aarch64-linux-gnu-g++ and qemu-aarch64 (apt: g++-aarch64-linux-gnu qemu-user)"),
]


def _build(tmp_path: Path) -> Path:
    exe = tmp_path / "smoke-aarch64"
    sources = sorted(str(p) for p in (ROOT / "native" / "cpu").glob("*.cpp"))
    cmd = [CROSS, "-O2", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
           "-Wall", "-Wextra", "-Werror", "-static", f"-I{ROOT / 'native' / 'include'}", f"-I{ROOT / 'native' / 'cpu'}",
           "-DPO_ISA_NS=isa_baseline", *sources, str(ROOT / "tests" / "native_smoke" / "smoke.cpp"), "-o", str(exe)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return exe


def test_aarch64_build_matches_reference(tmp_path):
    kind = kind_for("adamw")
    n, steps = 4097, 6
    gen = torch.Generator().manual_seed(42)
    param = torch.randn(n, generator=gen) * 0.1
    grads = torch.randn(steps, n, generator=gen) * 0.01
    grads[:, 3] = float("nan")
    grads[1::2, 11] = float("inf")
    grads[:, 5:9] = 0.0
    hyper = dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    scalars = [step_scalars(kind, hyper, step) for step in range(1, steps + 1)]

    header = torch.tensor([n, steps], dtype=torch.int64)
    maps = [dynamic_map(True), dynamic_map(False), decision_thresholds(True), decision_thresholds(False)]
    payload = b"".join(t.contiguous().numpy().tobytes() for t in [header, *maps, param, grads])
    payload += b"".join(bytes(cpu._c_scalars(s)) for s in scalars)
    (tmp_path / "in.bin").write_bytes(payload)

    exe = _build(tmp_path)
    run = subprocess.run([QEMU, str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "isa level 0" in run.stdout  # baseline: the only level on aarch64

    blocks = num_blocks(n, True)
    p, s1, s2 = param.clone(), torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    a1, a2 = torch.zeros(blocks), torch.zeros(blocks)
    for step in range(steps):
        reference.update(kind, [UpdateItem(p, grads[step], s1, s2, a1, a2, scalars[step])])

    out = (tmp_path / "out.bin").read_bytes()
    sizes = [4 * n, n, n, 4 * blocks, 4 * blocks]
    assert len(out) == sum(sizes)
    parts, offset = [], 0
    for size in sizes:
        parts.append(bytearray(out[offset:offset + size]))
        offset += size
    got_p = torch.frombuffer(parts[0], dtype=torch.float32)
    got_s1, got_s2 = torch.frombuffer(parts[1], dtype=torch.uint8), torch.frombuffer(parts[2], dtype=torch.uint8)
    got_a1, got_a2 = torch.frombuffer(parts[3], dtype=torch.float32), torch.frombuffer(parts[4], dtype=torch.float32)
    assert torch.equal(got_p.view(torch.int32), p.view(torch.int32)), "parameters differ"
    assert torch.equal(got_s1, s1) and torch.equal(got_s2, s2), "codes differ"
    assert torch.equal(got_a1.view(torch.int32), a1.view(torch.int32)), "absmax1 differs"
    assert torch.equal(got_a2.view(torch.int32), a2.view(torch.int32)), "absmax2 differs"
