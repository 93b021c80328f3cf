"""Step-time overhead of each paging policy against the unpaged optimizer.

All candidates run side by side in one process, interleaved round by round (so a noisy,
shared machine slows them alike); the table reports medians and ratios to ``unpaged``.

* ``--device cpu`` (default): CPU parameters, the ``simulated`` backend (a device pool and a
  host pool in host memory, real copies between them).
* ``--device cuda``: CUDA parameters, the ``auto`` backend: ``offload`` and ``budgeted`` stage
  through pinned host memory on dedicated copy streams, ``on_demand`` and ``pipelined`` use
  CUDA managed memory (prefetch on a side stream); ``offload (migrate)`` is managed memory. Step times come from CUDA events, with a synchronize between steps
  (outside the timed region of the optimizer itself).

Two tables: the full step (the update math included, through whichever backend
``pagedopt.functional.dispatch`` picks), and the step with the update math replaced by a
no-op (what paging itself costs: bookkeeping plus transfers). The transfer reference is
the time to copy the whole 8-bit state to the device and back with plain copies (pinned
memory + ``copy_`` on CUDA); the target for ``offload`` is an overhead within 1.2x of it on
CUDA and 1.5x on the simulated CPU backend. ``page-in MiB/step`` is measured over the timed
rounds (steady state): with ``budgeted (50%)`` and the default eviction about half the state
moves per step (exactly: all but the stable prefix, see pagedopt/paging/eviction.py), with
``lru`` all of it.

Example:
    python benchmarks/bench_paging.py --params 8 --numel 262144 --rounds 5
    python benchmarks/bench_paging.py --device cuda --params 32 --numel 4194304 --rounds 10
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

import pagedopt  # noqa: E402
from pagedopt.paging import PagingConfig  # noqa: E402


def candidates(state_bytes: int, backend: str) -> list[tuple[str, dict | None]]:
    common = {"backend": backend, "min_paged_numel": 1}
    return [
        ("unpaged", None),
        ("on_demand", {**common, "policy": "on_demand"}),
        ("pipelined", {**common, "policy": "pipelined", "prefetch_depth": 2}),
        ("budgeted (fits)", {**common, "policy": "budgeted", "device_budget_bytes": 2 * state_bytes}),
        ("budgeted (50%, lru)", {**common, "policy": "budgeted", "device_budget_bytes": state_bytes // 2,
                                 "eviction": "lru", "prefetch_depth": 1}),
        ("budgeted (50%)", {**common, "policy": "budgeted", "device_budget_bytes": state_bytes // 2,
                            "prefetch_depth": 1}),
        ("offload (migrate)", {**common, "policy": "offload", "prefetch_depth": 2, "transfer": "migrate"}),
        ("offload", {**common, "policy": "offload", "prefetch_depth": 2}),
    ]


class Timer:
    """Wall time on CPU; CUDA events on the current stream for CUDA (synchronized after)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started


def build(name: str, cfg: dict | None, n_params: int, numel: int, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(numel, generator=gen).to(device)) for _ in range(n_params)]
    grads = [torch.randn(numel, generator=gen).to(device) for _ in range(n_params)]
    for p, g in zip(params, grads):
        p.grad = g
    kwargs = {} if cfg is None else {"paging": PagingConfig(**cfg)}
    return getattr(pagedopt, name)(params, **kwargs), params


def skip_math(opt) -> None:
    """Replace the update math with no-ops, the same way for every candidate. The unpaged
    optimizer would run its update as a prepared launch (``_run_launch``), which bypasses
    ``_update_chunk``; with prepared launches off it takes the per-item passes like the paged
    ones, so every candidate does the same non-paging work and differs only in paging."""
    opt.prepared_launches = False
    opt._update_chunk = lambda works: None
    opt._prepare_chunk = lambda works: None


def transfer_round_trip(opt, device: torch.device):
    """A step-like callable: copy every state1/state2 buffer of ``opt`` to the device and
    back with plain copies into preallocated buffers (pinned host memory on CUDA)."""
    states = [t for s in opt.state.values() for k in ("state1", "state2") if isinstance(t := s.get(k), torch.Tensor)]
    pinned = device.type == "cuda"
    hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned) for t in states]
    devs = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in states]

    def round_trip() -> None:
        for h, d in zip(hosts, devs):
            d.copy_(h, non_blocking=True)
        for h, d in zip(hosts, devs):
            h.copy_(d, non_blocking=True)

    return round_trip


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    backend = "auto" if device.type == "cuda" else "simulated"
    probe, _ = build(args.optimizer, None, 1, args.numel, device)
    probe.step()
    p = probe.param_groups[0]["params"][0]
    per_param = sum(t.numel() * t.element_size() for k, t in probe.state[p].items() if k in ("state1", "state2"))
    state_bytes = per_param * args.params
    config = {k: v for k, v in vars(args).items() if k != "json"}  # no machine paths in results
    results: dict[str, dict] = {"config": config, "state_bytes": state_bytes}
    for math in ((True, False) if not args.paging_only else (False,)):
        runs = []
        for label, cfg in candidates(state_bytes, backend):
            opt, params = build(args.optimizer, cfg, args.params, args.numel, device)
            if not math:
                skip_math(opt)
            runs.append((label, opt, params))
        timer = Timer(device)
        steps = {label: opt.step for label, opt, _params in runs}
        initial = {label: [p.detach().clone() for p in params] for label, _opt, params in runs} if not math else {}
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        for label, _opt, params in runs if not math else ():
            if not all(torch.equal(a, b) for a, b in zip(initial[label], params)):
                raise RuntimeError(f"paging-only mode: {label!r} changed its parameters, so its update math "
                                   "ran; the overheads would be measured against different work")
        runs = [(label, opt) for label, opt, _params in runs]
        moved_before = {label: opt.pager.stats()["page_in_bytes"] for label, opt in runs if label != "unpaged"}
        if not math:  # the transfer reference runs interleaved with the candidates
            steps["plain copy round trip"] = transfer_round_trip(runs[0][1], device)
            steps["plain copy round trip"]()
        times: dict[str, list[float]] = {label: [] for label in steps}
        for _ in range(args.rounds):
            for label, step in steps.items():
                times[label].append(timer(step))
        base = statistics.median(times["unpaged"])
        table = {}
        for label, opt in runs:
            med = statistics.median(times[label])
            moved = opt.pager.stats()["page_in_bytes"] - moved_before[label] if label != "unpaged" else 0
            table[label] = {
                "median_s": med, "ratio": med / base, "overhead_s": med - base,
                "page_in_bytes_per_step": moved / args.rounds,  # steady state: warm-up steps excluded
            }
        results["with_update" if math else "paging_only"] = table
        if not math:
            transfer = statistics.median(times["plain copy round trip"])
            results["transfer_round_trip_s"] = transfer
            results["offload_overhead_over_transfer"] = table["offload"]["overhead_s"] / transfer
    return results


def markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [
        f"{cfg['optimizer']}, {cfg['params']} parameters x {cfg['numel']:,} elements on {cfg['device']} "
        f"({results['state_bytes'] / 2**20:.1f} MiB of paged state), {cfg['rounds']} interleaved rounds, medians.",
        "",
        "| policy | step (ms) | vs unpaged | paging only: overhead (ms) | page-in MiB/step |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, only in results["paging_only"].items():
        row = results.get("with_update", {}).get(label, {"median_s": float("nan"), "ratio": float("nan"),
                                                          "page_in_bytes_per_step": only["page_in_bytes_per_step"]})
        lines.append(
            f"| {label} | {row['median_s'] * 1e3:.2f} | {row['ratio']:.3f}x | {only['overhead_s'] * 1e3:.2f} | "
            f"{row['page_in_bytes_per_step'] / 2**20:.2f} |"
        )
    lines += [
        "",
        f"Plain-copy round trip of the state (device <- host -> back): {results['transfer_round_trip_s'] * 1e3:.2f} ms; "
        f"offload's paging-only overhead is {results['offload_overhead_over_transfer']:.2f}x of it "
        f"(targets: <= 1.2x on CUDA, <= 1.5x on the simulated CPU backend).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--optimizer", default="AdamW8bit")
    parser.add_argument("--params", type=int, default=8)
    parser.add_argument("--numel", type=int, default=262_144)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--paging-only", action="store_true", help="skip the table with the update math")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 keeps timings stable on a shared machine)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU (torch.cuda.is_available() is False)")
    results = run(args)
    print(markdown(results))
    if args.json:
        from pagedopt.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
