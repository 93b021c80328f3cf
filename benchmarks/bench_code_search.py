"""AdamW8bit step time under each code search of the avx512 level, side by side in one process.

The avx512 level quantizes with one of four searches (native/cpu/tables.h ``CodeSearch``):
``table`` (a gather per 16 values), ``arithmetic`` and ``lattice`` (VBMI only), and
``lattice_table`` (the lattice with the table as its fallback, for AVX-512 CPUs without
VBMI). ``--no-vbmi`` also switches the VBMI dequantization off, so a VBMI CPU runs what a
Skylake-SP / Cascade Lake CPU runs (F-only permutes); the searches that need VBMI are then
left out. Rounds are interleaved (a noisy machine slows every candidate alike); the table
reports the median ms/step and the ratio to the first candidate. Every candidate updates
its own copy of the same parameters and must end bit-identical to the others (the searches
are exact).

``--prefetch 0,2,4`` crosses the searches with those software prefetch distances (chunks
ahead; the library picks 0 on AMD and 2 elsewhere): candidates are then named
``search@prefetch``.

Example:
    python benchmarks/bench_code_search.py --numel 33554432 --rounds 7 --threads 2
    python benchmarks/bench_code_search.py --no-vbmi --json results.json
    python benchmarks/bench_code_search.py --prefetch 0,2,4 --searches table,lattice
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pagedopt  # noqa: E402
from pagedopt.backends import cpu  # noqa: E402

MODES = {"table": 0, "arithmetic": 1, "lattice": 2, "lattice_table": 3}
NEEDS_VBMI = {"arithmetic", "lattice"}


def candidates(no_vbmi: bool, searches: list[str] | None = None) -> list[str]:
    has_vbmi = "avx512vbmi" in (cpu._cpu_flags() or set())
    unknown = sorted(set(searches or []) - set(MODES))
    if unknown:
        raise SystemExit(f"--searches: unknown {', '.join(unknown)}; known: {', '.join(MODES)}")
    return [m for m in MODES if not (m in NEEDS_VBMI and (no_vbmi or not has_vbmi)) and (not searches or m in searches)]


def with_prefetch(names: list[str], distances: list[int] | None) -> list[tuple[str, str, int | None]]:
    """(label, search, prefetch distance or None = leave the library's) per candidate."""
    if not distances:
        return [(name, name, None) for name in names]
    return [(f"{name}@{d}", name, d) for name in names for d in distances]


def cpu_model() -> str:
    """The CPU's model name (as lscpu shows it), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def run(args: argparse.Namespace) -> dict:
    lib = cpu.library()
    if lib is None or not lib.po_isa_compiled(2):
        raise SystemExit("needs the native library with the avx512 level")
    torch.set_num_threads(args.threads)
    lib.select_isa("avx512")
    has_vbmi = "avx512vbmi" in (cpu._cpu_flags() or set())
    if args.no_vbmi and has_vbmi:
        lib.check(lib.po_set_dequantize_vbmi(0), "set_dequantize_vbmi")
    searches = [x.strip() for x in args.searches.split(",")] if args.searches else None
    distances = [int(x) for x in args.prefetch.split(",")] if args.prefetch else None
    plan = with_prefetch(candidates(args.no_vbmi, searches), distances)
    names = [label for label, _, _ in plan]
    prefetch_before = int(lib.po_get_prefetch())
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(args.numel, generator=gen)
    grads = [torch.randn(args.numel, generator=gen) for _ in range(2)]
    runs = {}
    for name in names:
        p = torch.nn.Parameter(init.clone())
        runs[name] = (p, pagedopt.AdamW8bit([p]))
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        for r in range(args.warmup + args.rounds):
            for name, search, distance in plan:
                p, opt = runs[name]
                p.grad = grads[r % 2]
                lib.check(lib.po_set_code_search(MODES[search]), "set_code_search")
                lib.check(lib.po_set_prefetch(prefetch_before if distance is None else distance), "set_prefetch")
                t0 = time.perf_counter()
                opt.step()
                if r >= args.warmup:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        lib.check(lib.po_set_dequantize_vbmi(int(has_vbmi)), "set_dequantize_vbmi")
        lib.check(lib.po_set_prefetch(prefetch_before), "set_prefetch")
    ref = runs[names[0]][0]
    for name in names[1:]:
        if not torch.equal(runs[name][0], ref):
            raise SystemExit(f"{name}: parameters differ from {names[0]}'s (the searches must be exact)")
    medians = {n: statistics.median(t) for n, t in times.items()}
    return {
        "command": " ".join(sys.argv),
        "machine": cpu_model(),
        "threads": args.threads,
        "numel": args.numel,
        "no_vbmi": bool(args.no_vbmi),
        "library_prefetch_chunks": prefetch_before,
        "ms_per_step": medians,
        "ratio_to_first": {n: medians[n] / medians[names[0]] for n in names},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 25)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-vbmi", action="store_true", help="run what an AVX-512 CPU without VBMI runs")
    parser.add_argument("--searches", help="comma list of searches to run (default: all this CPU can)")
    parser.add_argument("--prefetch", help="comma list of prefetch distances to cross with the searches")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = run(args)
    for name, ms in results["ms_per_step"].items():
        print(f"{name:<16} {ms:8.2f} ms/step  {results['ratio_to_first'][name]:.3f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
