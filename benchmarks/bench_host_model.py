"""Host time of one step on a real model's parameter list, as users configure it (issue 13/14).

Times ``opt.step()`` on the GPT-2-small list (148 tensors) with the native update replaced by
a no-op, so the numbers are pagedopt's host work alone, side by side in one run:

* ``AdamW8bit``: unpaged, every tensor in one prepared launch;
* ``AdamW8bit + Prometheus sink``: with the exporter's sink attached (gradient norms off, so
  the row is host work; with them on, the sink reads every gradient once more per step);
* ``AdamW8bit, per-item``: ``prepared_launches = False`` - every tensor through the per-item
  passes, as every step with a telemetry sink ran before the launches kept running;
* ``PagedAdamW8bit``: the default paging (``pipelined``; parameters below
  ``min_paged_numel``, 98 of the 148, keep unpaged state and are launched);
* ``PagedAdamW8bit, per-item``: every tensor through the pager's visits, as every paged
  optimizer stepped before the plan launched unpaged state.

``--fsdp`` wraps the parameters with FSDP2's ``fully_shard`` on a one-rank gloo group (a file
store in a temporary directory), so every parameter and gradient is a DTensor.

Example:
    python benchmarks/bench_host_model.py --steps 20 --json results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pagedopt  # noqa: E402
from bench_host_overhead import null_kernels  # noqa: E402
from pagedopt.bench import gpt2_small_shapes  # noqa: E402
from pagedopt.fileio import atomic_write_text  # noqa: E402


def _sink(opt) -> None:
    from prometheus_client import CollectorRegistry

    from pagedopt.telemetry import attach
    from pagedopt.telemetry.prometheus import PrometheusSink

    attach(opt, PrometheusSink(opt, registry=CollectorRegistry(), compute_grad_norms=False))


def candidates() -> dict[str, tuple[str, bool, bool]]:
    """label -> (optimizer class name, prepared launches on, Prometheus sink attached)."""
    return {
        "AdamW8bit": ("AdamW8bit", True, False),
        "AdamW8bit + Prometheus sink": ("AdamW8bit", True, True),
        "AdamW8bit, per-item": ("AdamW8bit", False, False),
        "PagedAdamW8bit": ("PagedAdamW8bit", True, False),
        "PagedAdamW8bit, per-item": ("PagedAdamW8bit", False, False),
    }


def _fully_shard(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    from torch.distributed.fsdp import fully_shard

    holder = torch.nn.Module()
    holder.ps = torch.nn.ParameterList(params)
    fully_shard(holder)
    return list(holder.parameters())


def build(name: str, prepared: bool, sink: bool, shapes: list[tuple], fsdp: bool = False) -> tuple:
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    if fsdp:
        params = _fully_shard(params)
    grads = [p.detach().clone() for p in params]  # (DTensors under --fsdp, like the parameters)
    opt = getattr(pagedopt, name)(params)
    opt.prepared_launches = prepared
    if sink:
        _sink(opt)
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
    ap.add_argument("--fsdp", action="store_true", help="parameters wrapped by fully_shard (DTensors)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    null_kernels()
    with tempfile.TemporaryDirectory() as store:
        if args.fsdp:
            import torch.distributed as dist

            dist.init_process_group("gloo", init_method=f"file://{store}/pg", rank=0, world_size=1)
        try:
            return _run(args)
        finally:
            if args.fsdp:
                dist.destroy_process_group()


def _run(args: argparse.Namespace) -> int:
    shapes = gpt2_small_shapes(layers=args.layers)
    runs = {label: build(*spec, shapes, fsdp=args.fsdp) for label, spec in candidates().items()}
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
        print(f"  {label:30s} {r['min_ms']:7.3f} ms  {r['min_ms'] / (base * 1e3):5.2f}x  "
              f"({r['launched_tensors']} launched, {r['per_item_tensors']} per item)")
    if args.json:
        result = {"benchmark": "host_model", "tensors": len(shapes), "fsdp": args.fsdp, "torch": torch.__version__,
                  "rows": rows}
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
