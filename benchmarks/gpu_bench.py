"""GPU benchmark: pagedopt AdamW (8-bit and 32-bit state) against torch's fused AdamW.

Two workloads, each optimizer timed side by side in one run:

* ``1B``: one flat fp32 parameter of 1e9 elements (scaled down, with a message, when the GPU
  has less free memory than the largest optimizer needs);
* ``gpt2-small``: the 148 parameter tensors of GPT-2 small (124M parameters; biases and
  LayerNorms stay 32-bit under the default ``min_8bit_size``), the multi-tensor case.

Optimizers: ``pagedopt.AdamW8bit``, ``pagedopt.AdamW32bit``, ``torch.optim.AdamW(fused=True)``,
and bitsandbytes' ``AdamW8bit``/``AdamW32bit`` when it imports with CUDA support.

Timing uses CUDA events around ``steps`` optimizer steps after ``warmup`` steps (the first
compiles or loads kernels). Bandwidth is reported at *counted* bytes - what a perfect fused
kernel must move per parameter (8-bit AdamW, fp32 parameters: 4+4 parameter, 4 gradient,
1+1 per state, plus the absmax per 256 elements: ~16.06 B; 32-bit: 28 B) - against a measured
device-to-device copy (``dst.copy_(src)``, read + write).

Usage::

    python benchmarks/gpu_bench.py                 # table on stdout
    OUT=/tmp/out python benchmarks/gpu_bench.py    # also writes $OUT/gpu_bench.json
    python benchmarks/gpu_bench.py --params 2e8 --steps 10 --json results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 2**30

# Bytes each optimizer must move per parameter per step with fp32 parameters and gradients.
COUNTED_BYTES = {
    "8bit": 4 + 4 + 4 + 2 * (1 + 1) + 2 * (4 + 4) / 256,
    "32bit": 4 + 4 + 4 + 2 * (4 + 4),
}
# Bytes each optimizer holds per parameter (parameter + gradient + state), for the memory plan.
RESIDENT_BYTES = {"8bit": 4 + 4 + 2 + 2 * 4 / 256, "32bit": 4 + 4 + 8}


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


@dataclass
class Result:
    workload: str
    optimizer: str
    params: int
    tensors: int
    ms_per_step: float | None = None
    host_ms_per_step: float | None = None
    counted_gbps: float | None = None
    copy_fraction: float | None = None
    vs_torch_fused: float | None = None
    note: str = ""


@dataclass
class Report:
    device: str
    torch_version: str
    copy_gbps: float
    free_gib: float
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: dict[str, bool | None] = field(default_factory=dict)
    kernel_stats: dict[str, float] = field(default_factory=dict)


def measure_copy_gbps(nbytes: int, device: torch.device, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), best of ``repeats``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * (nbytes // 4) * 4 / best / 1e9


def _optimizers(include_bnb: bool):
    import pagedopt

    out = {
        "pagedopt AdamW8bit": ("8bit", lambda ps: pagedopt.AdamW8bit(ps, lr=1e-3)),
        "pagedopt AdamW32bit": ("32bit", lambda ps: pagedopt.AdamW32bit(ps, lr=1e-3)),
        "torch AdamW fused": ("32bit", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
    }
    notes = []
    if include_bnb:
        try:
            import bitsandbytes as bnb

            probe = torch.nn.Parameter(torch.zeros(4096, device="cuda"))
            probe.grad = torch.zeros_like(probe)
            bnb.optim.AdamW8bit([probe]).step()
            out["bitsandbytes AdamW8bit"] = ("8bit", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3))
            out["bitsandbytes AdamW32bit"] = ("32bit", lambda ps: bnb.optim.AdamW32bit(ps, lr=1e-3))
        except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
            notes.append(f"bitsandbytes skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    return out, notes


def time_optimizer(make, shapes, device, warmup: int, steps: int) -> tuple[float, float]:
    """(GPU ms per step from CUDA events, host ms per step) for ``steps`` steps."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.empty(s, device=device).normal_(0.0, 0.02, generator=gen)) for s in shapes]
    for p in params:  # filled in place: no full-size temporaries
        p.grad = torch.empty(p.shape, device=device).normal_(0.0, 1e-3, generator=gen)
    opt = make(params)
    for _ in range(warmup):
        opt.step()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host_start = time.perf_counter()
    start.record()
    for _ in range(steps):
        opt.step()
    end.record()
    host = (time.perf_counter() - host_start) / steps * 1e3
    end.synchronize()
    gpu = start.elapsed_time(end) / steps
    del opt, params
    gc.collect()
    torch.cuda.empty_cache()
    return gpu, host


def plan_flat_params(requested: int, free_bytes: int, kinds: set[str]) -> tuple[int, str]:
    """Parameters for the flat workload that fit in 80% of free memory (multiple of 256)."""
    per_param = max(RESIDENT_BYTES[k] for k in kinds) + 0.5  # + the 8-bit kernels' temporaries
    fit = int(free_bytes * 0.8 / per_param) // 256 * 256
    if fit >= requested:
        return requested, ""
    return fit, (
        f"scaled the {requested / 1e9:g}B workload down to {fit / 1e9:.3f}B parameters: "
        f"{free_bytes / GIB:.1f} GiB free, {per_param:.1f} B/param needed"
    )


def run(args: argparse.Namespace) -> Report:
    from pagedopt.backends.cuda_compiler import kernel_stats

    device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    copy_bytes = int(min(4 * GIB, free // 8)) // 4 * 4
    report = Report(
        device=torch.cuda.get_device_name(device), torch_version=torch.__version__,
        copy_gbps=measure_copy_gbps(copy_bytes, device), free_gib=free / GIB,
    )
    optimizers, notes = _optimizers(not args.no_bnb)
    report.notes += notes
    n, note = plan_flat_params(int(float(args.params)) // 256 * 256, free, {k for k, _ in optimizers.values()})
    if note:
        report.notes.append(note)
        print(f"gpu_bench: {note}", file=sys.stderr)
    workloads = {f"{n / 1e9:.3g}B flat": [(n,)], "gpt2-small": gpt2_small_shapes()}
    for workload, shapes in workloads.items():
        numel = sum(torch.Size(s).numel() for s in shapes)
        torch_ms = None
        rows = []
        for name, (kind, make) in optimizers.items():
            row = Result(workload, name, numel, len(shapes))
            try:
                row.ms_per_step, row.host_ms_per_step = time_optimizer(make, shapes, device, args.warmup, args.steps)
            except Exception as exc:  # noqa: BLE001 - report and keep benchmarking the others
                row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                gc.collect()
                torch.cuda.empty_cache()
                rows.append(row)
                continue
            row.counted_gbps = COUNTED_BYTES[kind] * numel / (row.ms_per_step / 1e3) / 1e9
            row.copy_fraction = row.counted_gbps / report.copy_gbps
            if name == "torch AdamW fused":
                torch_ms = row.ms_per_step
            rows.append(row)
        for row in rows:
            if torch_ms and row.ms_per_step:
                row.vs_torch_fused = torch_ms / row.ms_per_step
        report.results += rows
    flat = [r for r in report.results if r.workload.endswith("flat")]
    eight = next((r for r in flat if r.optimizer == "pagedopt AdamW8bit" and r.ms_per_step), None)
    fused = next((r for r in flat if r.optimizer == "torch AdamW fused" and r.ms_per_step), None)
    report.targets = {
        "adamw8bit_at_85pct_of_copy_bandwidth": None if eight is None else eight.copy_fraction >= 0.85,
        "adamw8bit_faster_than_torch_fused": None if eight is None or fused is None else eight.ms_per_step < fused.ms_per_step,
    }
    report.kernel_stats = kernel_stats()
    return report


def format_table(report: Report) -> str:
    lines = [
        f"device: {report.device}  torch {report.torch_version}  copy bandwidth {report.copy_gbps:.0f} GB/s "
        f"(read+write)  free {report.free_gib:.1f} GiB",
        f"{'workload':16} {'optimizer':24} {'params':>11} {'ms/step':>8} {'host ms':>8} {'GB/s':>7} {'% copy':>7} {'vs fused':>8}",
    ]
    for r in report.results:
        if r.ms_per_step is None:
            lines.append(f"{r.workload:16} {r.optimizer:24} {r.params:11d}  failed: {r.note}")
            continue
        vs = f"{r.vs_torch_fused:.2f}x" if r.vs_torch_fused else "-"
        lines.append(
            f"{r.workload:16} {r.optimizer:24} {r.params:11d} {r.ms_per_step:8.3f} {r.host_ms_per_step:8.3f} "
            f"{r.counted_gbps:7.0f} {100 * r.copy_fraction:6.1f}% {vs:>8}"
        )
    for key, ok in report.targets.items():
        lines.append(f"target {key}: {'n/a' if ok is None else ('PASS' if ok else 'FAIL')}")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="1e9", help="parameters of the flat workload (default 1e9)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes even if it imports")
    parser.add_argument("--json", default=None, help="write results here (default: $OUT/gpu_bench.json when OUT is set)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    report = run(args)
    print(format_table(report))
    path = args.json or (os.path.join(os.environ["OUT"], "gpu_bench.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        payload = asdict(report) | {"python": platform.python_version()}
        Path(path).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
