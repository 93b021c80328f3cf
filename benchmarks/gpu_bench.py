"""GPU benchmark of pagedopt's optimizer step (issue 13), every optimizer timed side by side in
one run (about a minute on an H200):

* ``1B``: one flat fp32 parameter of 1e9 elements (scaled down, with a note, when the GPU has
  less free memory), every 8-bit optimizer in both numerics modes (``fast``, the CUDA
  default, and ``strict``), plus AdamW32bit, torch's fused AdamW and bitsandbytes'
  AdamW8bit when it imports: ms/step and % of the measured copy bandwidth at counted bytes
  (benchmarks/gpu_bench_report.py);
* ``gpt2-small``: the 148 tensors of GPT-2 small, pagedopt AdamW8bit (fast, strict; with and
  without CUDA-graph replay when the optimizer takes ``cuda_graph``) against torch fused
  AdamW and bitsandbytes;
* ``curve``: step time and host time at 10, 100, 1,000 and 10,000 tensors of 4,096
  elements, pagedopt AdamW8bit (graph off/on when available) against torch fused AdamW.

Optimizer options that only some versions have (``numerics``, ``cuda_graph``) are passed only
when the constructor accepts them; a configuration that cannot run is reported, not faked.
No allocation exceeds 80% of the free device memory (checked before each workload).

Usage::

    python benchmarks/gpu_bench.py                     # table on stdout, JSON to $OUT if set
    python benchmarks/gpu_bench.py --out results.json --quick
    python benchmarks/gpu_bench.py --dry-run           # no GPU: synthetic timings, same bookkeeping
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from gpu_bench_report import (  # noqa: E402
    CURVE_NUMEL, CURVE_TENSORS, EIGHT_BIT, GIB, Report, Result, counted_bytes, curve_fits, format_table,
    plan_flat_params,
)

Timer = Callable[[Callable, list, int, int], "tuple[float, float]"]


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


# --- optimizers ------------------------------------------------------------------------------------


def pagedopt_factory(class_name: str, kwargs: dict, numerics: str | None, cuda_graph: bool | None):
    """A factory ``params -> optimizer`` and a note; (None, why) when the installed pagedopt
    does not take an option this configuration needs (checked on a 1-element CPU tensor).

    Options with a known meaning when absent are dropped instead: ``numerics="fast"`` (the
    CUDA default) and ``cuda_graph=False`` (a pagedopt without the option has no graphs)."""
    import pagedopt

    cls = getattr(pagedopt, class_name)
    extra = {"numerics": numerics, "cuda_graph": cuda_graph}
    extra = {k: v for k, v in extra.items() if v is not None}
    droppable = {k for k, v in extra.items() if (k, v) in (("numerics", "fast"), ("cuda_graph", False))}
    notes = []
    while True:
        options = {**kwargs, **extra}
        try:
            cls([torch.nn.Parameter(torch.zeros(1))], **options)
            return (lambda params: cls(params, **options)), "; ".join(notes)
        except TypeError as exc:
            missing = [k for k in extra if f"'{k}'" in str(exc)]
            if not missing or not set(missing) <= droppable:
                return None, f"{class_name} does not take {sorted(missing or extra)}: {exc}"
            for k in missing:
                extra.pop(k)
                notes.append("no numerics option: the default (fast on CUDA)" if k == "numerics"
                             else "no cuda_graph option: plain step")


def bnb_factory():
    """bitsandbytes AdamW8bit on CUDA, or (None, why)."""
    try:
        import bitsandbytes as bnb

        probe = torch.nn.Parameter(torch.zeros(4096, device="cuda"))
        probe.grad = torch.zeros_like(probe)
        bnb.optim.AdamW8bit([probe]).step()
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
        return None, f"bitsandbytes skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return (lambda params: bnb.optim.AdamW8bit(params, lr=1e-3)), ""


def torch_fused(params):
    return torch.optim.AdamW(params, lr=1e-3, fused=True)


# --- timing ------------------------------------------------------------------------------------------


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


def cuda_timer(make, params: list, warmup: int, steps: int) -> tuple[float, float]:
    """(GPU ms per step from CUDA events, host ms per step) of ``make(params)``."""
    opt = make(params)
    for _ in range(warmup):
        opt.step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host_start = time.perf_counter()
    start.record()
    for _ in range(steps):
        opt.step()
    end.record()
    host = (time.perf_counter() - host_start) / steps * 1e3
    end.synchronize()
    gpu = start.elapsed_time(end) / steps
    del opt
    gc.collect()
    torch.cuda.empty_cache()
    return gpu, host


def synthetic_timer(make, params: list, warmup: int, steps: int) -> tuple[float, float]:
    """--dry-run: a deterministic made-up time (2 TB/s at 16 B/param, 5 us per tensor)."""
    numel = sum(p.numel() for p in params)
    return numel * 16 / 2e12 * 1e3 + 0.005 * len(params), 0.005 * len(params)


def make_params(shapes, device, dry: bool):
    if dry:  # sizes only, no memory
        return [torch.empty(s, device="meta") for s in shapes]
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.empty(s, device=device).normal_(0.0, 0.02, generator=gen)) for s in shapes]
    for p in params:  # filled in place: no full-size temporaries
        p.grad = torch.empty(p.shape, device=device).normal_(0.0, 1e-3, generator=gen)
    return params


# --- the sections --------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, report: Report, timer: Timer, device, free_bytes: int):
        self.args, self.report, self.timer, self.device = args, report, timer, device
        self.free_bytes = free_bytes
        self.started = time.perf_counter()

    def over_budget(self, what: str) -> bool:
        if time.perf_counter() - self.started > self.args.budget_s:
            self.report.notes.append(f"time budget of {self.args.budget_s:.0f} s spent: skipped {what}")
            return True
        return False

    def time_row(self, row: Result, make, params, bytes_per_param: float | None, steps: int) -> None:
        if make is None:
            self.report.add(row, None)
            return
        try:
            row.ms_per_step, row.host_ms_per_step = self.timer(make, params, self.args.warmup, steps)
        except Exception as exc:  # noqa: BLE001 - report and keep benchmarking the others
            row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.report.add(row, bytes_per_param)

    def flat(self, bnb) -> None:
        n, note = plan_flat_params(int(float(self.args.params)) // 256 * 256, self.free_bytes, state_values=2, bits=32)
        if note:
            self.report.notes.append(note)
        workload = f"{n / 1e9:.3g}B flat"
        params = make_params([(n,)], self.device, self.args.dry_run)
        for class_name, values, kwargs in EIGHT_BIT:
            for numerics in ("fast", "strict"):
                if self.over_budget(f"1B {class_name} {numerics}"):
                    return
                make, why = pagedopt_factory(class_name, kwargs, numerics, None)
                row = Result("1B", workload, class_name, numerics, n, 1, note=why)
                self.time_row(row, make, params, counted_bytes(values, 8), self.args.steps)
        make, why = pagedopt_factory("AdamW32bit", {}, None, None)
        self.time_row(Result("1B", workload, "AdamW32bit", "default", n, 1, note=why), make, params,
                      counted_bytes(2, 32), self.args.steps)
        self.time_row(Result("1B", workload, "torch AdamW fused", "-", n, 1), torch_fused, params,
                      counted_bytes(2, 32), self.args.steps)
        if bnb[0] is not None:
            self.time_row(Result("1B", workload, "bitsandbytes AdamW8bit", "-", n, 1), bnb[0], params,
                          counted_bytes(2, 8), self.args.steps)
        del params

    def gpt2(self, bnb) -> None:
        shapes = gpt2_small_shapes()
        numel = sum(torch.Size(s).numel() for s in shapes)
        params = make_params(shapes, self.device, self.args.dry_run)
        for numerics in ("fast", "strict"):
            for graph in (False, True):
                if self.over_budget(f"gpt2-small {numerics} graph={graph}"):
                    return
                make, why = pagedopt_factory("AdamW8bit", {}, numerics, graph)
                if make is None and graph:
                    continue  # no cuda_graph option: the graph-off row already says so
                row = Result("gpt2-small", "gpt2-small", "AdamW8bit", numerics, numel, len(shapes), graph, note=why)
                self.time_row(row, make, params, counted_bytes(2, 8), self.args.steps)
        self.time_row(Result("gpt2-small", "gpt2-small", "torch AdamW fused", "-", numel, len(shapes)), torch_fused,
                      params, counted_bytes(2, 32), self.args.steps)
        if bnb[0] is not None:
            self.time_row(Result("gpt2-small", "gpt2-small", "bitsandbytes AdamW8bit", "-", numel, len(shapes)),
                          bnb[0], params, counted_bytes(2, 8), self.args.steps)
        del params

    def curve(self) -> None:
        counts = curve_fits(self.free_bytes)
        if len(counts) < len(CURVE_TENSORS):
            self.report.notes.append(f"curve limited to {counts} tensors by free memory")
        for count in counts:
            if self.over_budget(f"curve at {count} tensors"):
                return
            shapes = [(CURVE_NUMEL,)] * count
            params = make_params(shapes, self.device, self.args.dry_run)
            steps = max(2, min(self.args.steps, 20_000 // count))
            workload = f"{count} x {CURVE_NUMEL}"
            for graph in (False, True):
                make, why = pagedopt_factory("AdamW8bit", {"min_8bit_size": CURVE_NUMEL}, None, graph)
                if make is None and graph:
                    continue
                row = Result("curve", workload, "AdamW8bit", "default", count * CURVE_NUMEL, count, graph, note=why)
                self.time_row(row, make, params, counted_bytes(2, 8), steps)
            self.time_row(Result("curve", workload, "torch AdamW fused", "-", count * CURVE_NUMEL, count), torch_fused,
                          params, counted_bytes(2, 32), steps)
            del params


def run(args: argparse.Namespace) -> Report:
    started = time.perf_counter()
    if args.dry_run:
        device, free = torch.device("cpu"), 140 * GIB
        report = Report(device="dry run (synthetic timings)", torch_version=torch.__version__, copy_gbps=4000.0,
                        free_gib=free / GIB)
        timer, bnb = synthetic_timer, (None, "bitsandbytes skipped: dry run")
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        free, _ = torch.cuda.mem_get_info(device)
        copy_bytes = int(min(4 * GIB, free // 8)) // 4 * 4
        report = Report(device=torch.cuda.get_device_name(device), torch_version=torch.__version__,
                        copy_gbps=measure_copy_gbps(copy_bytes, device), free_gib=free / GIB)
        timer, bnb = cuda_timer, (bnb_factory() if not args.no_bnb else (None, "bitsandbytes skipped: --no-bnb"))
    if bnb[1]:
        report.notes.append(bnb[1])
    bench = Bench(args, report, timer, device, free)
    sections = {"1B": lambda: bench.flat(bnb), "gpt2-small": lambda: bench.gpt2(bnb), "curve": bench.curve}
    for name in args.sections.split(","):
        if name not in sections:
            raise SystemExit(f"gpu_bench: --sections: unknown section {name!r} (known: {', '.join(sections)})")
        sections[name]()
        if not args.dry_run:
            gc.collect()
            torch.cuda.empty_cache()
    report.compare_to_fused()
    if args.dry_run:
        report.notes.append("dry run: synthetic timings, targets not evaluated")
    else:
        report.evaluate_targets()
    if not args.dry_run:
        from pagedopt.backends.cuda_compiler import kernel_stats

        report.kernel_stats = kernel_stats()
    report.seconds = time.perf_counter() - started
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="1e9", help="parameters of the flat workload (default 1e9)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer steps (5) and a 60 s budget")
    parser.add_argument("--budget-s", type=float, default=150.0, help="skip what remains after this many seconds")
    parser.add_argument("--sections", default="1B,gpt2-small,curve", help="comma-separated subset to run")
    parser.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes even if it imports")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: synthetic timings through the same bookkeeping")
    parser.add_argument("--out", "--json", dest="out", default=None,
                        help="results JSON (default: $OUT/gpu_bench.json when OUT is set)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.budget_s = min(args.steps, 5), min(args.budget_s, 60.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU (torch.cuda.is_available() is False); --dry-run checks the bookkeeping",
              file=sys.stderr)
        return 2
    report = run(args)
    print(format_table(report))
    path = args.out or (os.path.join(os.environ["OUT"], "gpu_bench.json") if os.environ.get("OUT") else None)
    if path:
        from pagedopt.fileio import atomic_write_text

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, report.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
