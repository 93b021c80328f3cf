"""Host time of a paged optimizer's step on a real model's parameter list (issue 13/14).

A paged optimizer pages only parameters with at least ``min_paged_numel`` elements (100,000
by default); the others keep unpaged state and join the step plan's prepared launches, like
an unpaged optimizer's. This times ``opt.step()`` on the GPT-2-small list (148 tensors, 50
of them paged by default) with the native update replaced by a no-op, so the numbers are
pagedopt's host work alone, side by side in one run:

* ``AdamW8bit``: unpaged, every tensor in one prepared launch;
* ``PagedAdamW8bit``: the default paging (``pipelined``, state stays resident);
* ``PagedAdamW8bit, per-item``: the same with ``prepared_launches = False`` - every tensor
  through the pager's visits, as every paged optimizer stepped before the plan launched
  unpaged state.

Example:
    python benchmarks/bench_paged_host.py --steps 20 --json results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pagedopt  # noqa: E402
from bench_host_overhead import null_kernels  # noqa: E402
from pagedopt.bench import gpt2_small_shapes  # noqa: E402
from pagedopt.fileio import atomic_write_text  # noqa: E402


def candidates() -> dict[str, tuple[str, bool]]:
    """label -> (optimizer class name, prepared launches on)."""
    return {
        "AdamW8bit": ("AdamW8bit", True),
        "PagedAdamW8bit": ("PagedAdamW8bit", True),
        "PagedAdamW8bit, per-item": ("PagedAdamW8bit", False),
    }


def build(name: str, prepared: bool, shapes: list[tuple]) -> tuple:
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    grads = [torch.zeros(s) for s in shapes]
    opt = getattr(pagedopt, name)(params)
    opt.prepared_launches = prepared
    return opt, params, grads


def step_seconds(opt, params, grads) -> float:
    for p, g in zip(params, grads):
        p.grad = g
    started = time.perf_counter()
    opt.step()
    seconds = time.perf_counter() - started
    opt.zero_grad(set_to_none=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per candidate (interleaved)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    null_kernels()
    shapes = gpt2_small_shapes(layers=args.layers)
    runs = {label: build(name, prepared, shapes) for label, (name, prepared) in candidates().items()}
    for opt, params, grads in runs.values():
        for _ in range(3):  # warm-up: state creation, plan building
            step_seconds(opt, params, grads)
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(args.steps):
        for label, run in runs.items():
            times[label].append(step_seconds(*run))
    base = min(times["AdamW8bit"])
    rows = {}
    print(f"{len(shapes)} tensors; host time per step (minimum of {args.steps}; native update skipped)")
    for label, (opt, _params, _grads) in runs.items():
        plan = opt._plan
        launched = sum(len(lg.entries) for lg in plan.launch_groups) if opt.prepared_launches else 0
        rows[label] = {
            "min_ms": min(times[label]) * 1e3,
            "median_ms": statistics.median(times[label]) * 1e3,
            "per_item_tensors": len(plan.entries) - launched,
            "launched_tensors": launched,
        }
        r = rows[label]
        print(f"  {label:26s} {r['min_ms']:7.3f} ms  {r['min_ms'] / (base * 1e3):5.2f}x  "
              f"({r['launched_tensors']} launched, {r['per_item_tensors']} per item)")
    if args.json:
        result = {"benchmark": "paged_host", "tensors": len(shapes), "torch": torch.__version__, "rows": rows}
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
