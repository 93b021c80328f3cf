"""Python's full garbage collections during optimizer steps: how often, how long, and with
``gc.freeze()`` (issue 13: host time per step).

The per-item step paths (paged state, trust ratios, tensor-wise state) create a few small
Python objects per tensor per step; the ones alive when a young-generation collection runs are
promoted, and every so many steps CPython then scans *every* tracked object of the process (a
process that imported torch holds ~330,000), which takes ~100 ms. ``min`` and ``median`` step
times hide these pauses; the ``mean`` - what a training run pays - includes them. Each candidate
runs in a fresh interpreter (its own object population), optionally after ``gc.freeze()``
(objects alive at that point are never scanned again). Since the step pauses the collector
while it runs (pagedopt/optim/execute.py ``_collection_paused``), no candidate should show
full collections any more; the benchmark checks that.

Example:
    python benchmarks/bench_gc_pauses.py --tensors 1000 --steps 40
    python benchmarks/bench_gc_pauses.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import gc, json, statistics, sys, time
import torch, pagedopt
from pagedopt.paging import PagingConfig
name, tensors, numel, steps, freeze = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
torch.set_num_threads(1)
ps = [torch.nn.Parameter(torch.randn(numel) * 0.1) for _ in range(tensors)]
for p in ps:
    p.grad = torch.randn(numel) * 0.01
builders = {
    "AdamW8bit (launched)": lambda: pagedopt.AdamW8bit(ps),
    # (simulated device: state that moves takes the per-item visits; CPU training's host
    # state never moves and is launched like AdamW8bit's)
    "PagedAdamW8bit (all paged)": lambda: pagedopt.PagedAdamW8bit(
        ps, paging=PagingConfig(min_paged_numel=1, backend="simulated")),
    "LAMB8bit": lambda: pagedopt.LAMB8bit(ps),
}
opt = builders[name]()
opt.step()  # state creation and plan building happen before the measurement
if freeze:
    gc.freeze()
pauses, started = [], [0.0]
def watch(phase, info):
    if info.get("generation") == 2:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - started[0])
gc.callbacks.append(watch)
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    opt.step()
    times.append(time.perf_counter() - t0)
print(json.dumps({"min_ms": min(times) * 1e3, "median_ms": statistics.median(times) * 1e3,
                  "mean_ms": statistics.mean(times) * 1e3, "full_collections": len(pauses),
                  "full_collection_ms": sum(pauses) * 1e3, "tracked_objects": len(gc.get_objects())}))
"""

CANDIDATES = ("AdamW8bit (launched)", "PagedAdamW8bit (all paged)", "LAMB8bit")


def run_child(name: str, args: argparse.Namespace, freeze: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, name, str(args.tensors), str(args.numel), str(args.steps),
                          "1" if freeze else "0"], capture_output=True, text=True, check=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=1000)
    ap.add_argument("--numel", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    print(f"{args.tensors} tensors x {args.numel}, {args.steps} steps, 1 thread (ms/step)")
    for name in CANDIDATES:
        for freeze in (False, True):
            r = {"optimizer": name, "gc_freeze": freeze, **run_child(name, args, freeze)}
            rows.append(r)
            print(f"  {name:28s} freeze={freeze!s:5s} min {r['min_ms']:7.2f}  median {r['median_ms']:7.2f}  "
                  f"mean {r['mean_ms']:7.2f}  full GCs {r['full_collections']} ({r['full_collection_ms']:.0f} ms)")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "gc_pauses", "tensors": args.tensors, "numel": args.numel,
                                         "steps": args.steps, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
