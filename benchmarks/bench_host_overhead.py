"""Host time of one optimizer step against the number of parameter tensors (issue 13 item 1).

For N tensors of 4,096 elements (default N = 10, 100, 1000, 10000) it times ``opt.step()``
of pagedopt's AdamW8bit (planned, and with prepared launches off - the per-item path, i.e.
the step before the plan) next to torch's AdamW (``foreach`` and, where the build supports
it on this device, ``fused``), all measured side by side in one run. Gradients are replaced
every step (``zero_grad(set_to_none=True)`` users) unless ``--keep-grads``.

On CPU the time is host work plus the (small) kernels; "per tensor" divides by N.
On a shared machine, compare ratios within one run, not absolute times.

``--variants clipped,lamb,lars,paged,paged-host,tensorwise`` adds pagedopt configurations that take other
paths (percentile clipping, trust ratios, tensor-wise state, paged state).

Example:
    python benchmarks/bench_host_overhead.py --tensors 10,100,1000 --steps 20
    python benchmarks/bench_host_overhead.py --tensors 1000 --threads 1 --host-only --variants clipped,lamb,paged
    python benchmarks/bench_host_overhead.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pagedopt  # noqa: E402
from pagedopt.fileio import atomic_write_text  # noqa: E402


def make_case(n: int, numel: int, device: str, build: Callable) -> tuple[Callable[[], None], list]:
    params = [torch.nn.Parameter(torch.randn(numel, device=device) * 0.1) for _ in range(n)]
    grads = [torch.randn(numel, device=device) * 0.01 for _ in range(n)]
    opt = build(params)
    return opt, params, grads


def time_case(opt, params, grads, steps: int, keep_grads: bool, device: str) -> list[float]:
    """Seconds per step, one per timed step (gradients assigned outside the timed region)."""
    times = []
    for i in range(steps + 3):
        if keep_grads and params[0].grad is not None:
            pass
        else:
            for p, g in zip(params, grads):
                p.grad = g.clone() if not keep_grads else g
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        if not keep_grads:
            opt.zero_grad(set_to_none=True)
        if i >= 3:  # warm-up: plan building, state creation
            times.append(t1 - t0)
    return times


def _all_paged(ps, host_state: bool = False):
    """Every parameter's state paged: state that moves (the per-item visits; CPU parameters
    page through the simulated device), or with ``host_state`` CPU training's plain host
    memory (what ``auto`` picks for CPU parameters), which never moves."""
    from pagedopt.paging import PagingConfig

    backend = "host" if host_state else "simulated" if ps[0].device.type == "cpu" else "auto"
    return pagedopt.PagedAdamW8bit(ps, paging=PagingConfig(min_paged_numel=1, backend=backend))


# --variants: pagedopt configurations whose step takes other paths than plain AdamW8bit
VARIANTS: dict[str, tuple[str, Callable]] = {
    "clipped": ("pagedopt AdamW8bit percentile_clipping=95", lambda ps: pagedopt.AdamW8bit(ps, percentile_clipping=95)),
    "tensorwise": ("pagedopt AdamW8bit block_wise=False", lambda ps: pagedopt.AdamW8bit(ps, block_wise=False)),
    "lamb": ("pagedopt LAMB8bit", lambda ps: pagedopt.LAMB8bit(ps)),
    "lars": ("pagedopt LARS8bit", lambda ps: pagedopt.LARS8bit(ps, lr=0.1, momentum=0.9)),
    "paged": ("pagedopt PagedAdamW8bit (all paged, simulated device)", _all_paged),
    "paged-host": ("pagedopt PagedAdamW8bit (all paged, CPU host state)", lambda ps: _all_paged(ps, True)),
}


def optimizers(device: str, variants: list[str] | None = None) -> dict[str, Callable]:
    def planned(ps):
        return pagedopt.AdamW8bit(ps)

    def per_item(ps):
        opt = pagedopt.AdamW8bit(ps)
        opt.prepared_launches = False
        return opt

    out = {"pagedopt AdamW8bit (planned)": planned, "pagedopt AdamW8bit (per-item)": per_item}
    for key in variants or []:
        label, build = VARIANTS[key]
        out[label] = build
    out["torch AdamW foreach"] = lambda ps: torch.optim.AdamW(ps, foreach=True)
    try:
        p = torch.nn.Parameter(torch.zeros(4, device=device))
        p.grad = torch.zeros(4, device=device)
        torch.optim.AdamW([p], fused=True).step()
        out["torch AdamW fused"] = lambda ps: torch.optim.AdamW(ps, fused=True)
    except (RuntimeError, ValueError):
        pass
    return out


def null_kernels() -> None:
    """Make the native CPU update a no-op that returns success, so pagedopt's timings are
    its host work alone (the way the CUDA host path was measured with a null launcher)."""
    from pagedopt.backends import cpu

    lib = cpu.library()
    if lib is None:
        raise SystemExit("--host-only needs the native CPU library (python setup.py build_ext --inplace)")

    class NullUpdate:
        def __call__(self, *args):
            return 0

    lib.__dict__["po_update"] = NullUpdate()  # instance attribute: found before __getattr__


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", default="10,100,1000,10000")
    ap.add_argument("--numel", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep-grads", action="store_true", help="keep the same gradient tensors every step")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads (0: leave as is)")
    ap.add_argument("--host-only", action="store_true",
                    help="pagedopt rows skip the native update call (host work only; torch rows unchanged; "
                         "the prepare pass and gradient norms of the variants still run)")
    ap.add_argument("--variants", default="", help=f"extra pagedopt rows, comma list of {', '.join(VARIANTS)}")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.host_only:
        null_kernels()
    counts = [int(x) for x in args.tensors.split(",")]
    rows = []
    names = list(optimizers(args.device, variants))
    print(f"{'tensors':>8} " + " ".join(f"{n:>32}" for n in names) + "   (min ms/step; us/tensor)")
    for n in counts:
        steps = max(5, min(args.steps, args.steps * 100 // n))
        row = {"tensors": n, "numel": args.numel, "steps": steps, "ms_per_step": {}, "median_ms_per_step": {}}
        for name, build in optimizers(args.device, variants).items():
            opt, params, grads = make_case(n, args.numel, args.device, build)
            times = time_case(opt, params, grads, steps, args.keep_grads, args.device)
            # the minimum: on a shared machine the median mostly measures other processes
            row["ms_per_step"][name] = min(times) * 1e3
            row["median_ms_per_step"][name] = statistics.median(times) * 1e3
            if hasattr(opt, "plan_builds"):
                row.setdefault("plan_builds", {})[name] = opt.plan_builds
            del opt, params, grads
        rows.append(row)
        print(f"{n:>8} " + " ".join(
            f"{row['ms_per_step'][k]:>20.3f} ms {row['ms_per_step'][k] * 1e3 / n:>7.1f} us" for k in names))
    result = {
        "benchmark": "host_overhead",
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "keep_grads": args.keep_grads,
        "host_only": args.host_only,
        "variants": variants,
        "rows": rows,
    }
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
