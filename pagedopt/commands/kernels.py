"""``pagedopt kernels``: compile every CUDA kernel into the on-disk cache, no GPU needed.

For air-gapped clusters (fill the cache on a login node, copy it or point
``PAGEDOPT_KERNEL_CACHE`` at shared storage) and for CI. Prints
``compiled N kernels for sm_80,sm_90`` (N counts kernels per architecture times
architectures) and exits non-zero with NVRTC's log on any compile error. ``--list`` prints
what the cache holds (program, architecture, size, last use) and ``--clear`` empties it; both
work without cuda-python. The cache keeps at most ``$PAGEDOPT_KERNEL_CACHE_MAX`` bytes (1 GiB)
and drops the least recently used programs first.

Example:
    >>> from pagedopt.cli import build_parser
    >>> args = build_parser().parse_args(["kernels", "--arch", "sm_80,sm_90"])
    >>> args.arch
    'sm_80,sm_90'
"""

from __future__ import annotations

import argparse
import sys
import time


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "kernels",
        help="compile all CUDA kernels into the cache (no GPU needed)",
        description="Compile every CUDA kernel with NVRTC for the given architectures and store "
        "the cubins in the kernel cache ($PAGEDOPT_KERNEL_CACHE, default ~/.cache/pagedopt/kernels).",
    )
    parser.add_argument(
        "--arch", default="sm_80,sm_90",
        help="comma-separated GPU architectures, e.g. sm_80,sm_90 (default: %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="recompile even when the cache has the cubin")
    parser.add_argument("--jobs", type=int, default=None, help="parallel NVRTC compilations (default: CPU count)")
    parser.add_argument("--verbose", action="store_true", help="print registers and spills of every kernel")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true", help="list the cached kernels (no compiling)")
    action.add_argument("--clear", action="store_true", help="remove every cached kernel (no compiling)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "list", False):
        return _list()
    if getattr(args, "clear", False):
        return _clear()
    from ..backends import cuda_compiler
    from ..backends.cuda_catalog import all_programs, distinct_kernels

    archs = [a.strip() for a in str(args.arch).split(",") if a.strip()]
    if not archs:
        print("pagedopt kernels: --arch needs at least one architecture, e.g. sm_90", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        archs = [cuda_compiler.check_arch(a) for a in archs]
        programs = cuda_compiler.compile_all(archs, all_programs(), workers=args.jobs, use_cache=not args.force)
    except (cuda_compiler.KernelCompileError, cuda_compiler.NvrtcUnavailableError, ValueError, FileNotFoundError) as exc:
        print(f"pagedopt kernels: {exc}", file=sys.stderr)
        return 1
    problems = _problems(programs)
    if args.verbose:
        _print_resources(programs)
    for line in problems:
        print(f"pagedopt kernels: {line}", file=sys.stderr)
    per_arch = len(distinct_kernels())
    cached = sum(p.from_cache for p in programs)
    print(
        f"compiled {per_arch * len(archs)} kernels for {','.join(archs)} "
        f"({per_arch} per architecture in {len(programs) // len(archs)} programs; {cached} of "
        f"{len(programs)} programs from the cache in {cuda_compiler.cache_dir()}; "
        f"{time.perf_counter() - started:.1f} s)"
    )
    return 1 if problems else 0


def _problems(programs) -> list[str]:
    """Compiler warnings and local-memory use (spills, stack) - both fail the command."""
    out = []
    for p in programs:
        for line in p.warnings():
            out.append(f"{p.spec.slug} ({p.arch}): {line}")
        for name, r in p.resources.items():
            if r["spill_stores"] or r["spill_loads"] or r["stack_bytes"]:
                out.append(
                    f"{p.spec.slug} ({p.arch}): {name} uses local memory: {r['stack_bytes']} bytes stack, "
                    f"{r['spill_stores']} bytes spill stores, {r['spill_loads']} bytes spill loads"
                )
    return out


def _print_resources(programs) -> None:
    print(f"{'arch':6} {'regs':>4} {'smem':>6} kernel")
    for p in programs:
        lowered = {v: k for k, v in p.symbols.items()}
        for name, r in sorted(p.resources.items()):
            print(f"{p.arch:6} {r['registers']:4d} {r['smem_bytes']:6d} {lowered.get(name, name)}")


def _list() -> int:
    from ..backends import kernel_cache

    directory = kernel_cache.cache_dir()
    try:
        limit = f"{kernel_cache.max_bytes() / 2**20:.0f} MiB"
    except ValueError as exc:
        limit = f"invalid: {exc}"
    items = kernel_cache.entries(directory)
    print(f"kernel cache {directory}: {len(items)} programs, {kernel_cache.total_bytes(directory) / 2**20:.1f} MiB "
          f"(limit {limit}, {kernel_cache.MAX_ENV})")
    if items:
        print(f"{'arch':7} {'KiB':>7} {'last used (UTC)':20} {'pagedopt':8} {'nvrtc':5} program")
    for entry in reversed(items):  # most recently used first
        info = entry.describe()
        print(f"{entry.arch:7} {entry.bytes / 1024:7.0f} {info['last_used']:20} {str(info.get('pagedopt', '?')):8} "
              f"{str(info.get('nvrtc', '?')):5} {entry.program}-{entry.key}")
    return 0


def _clear() -> int:
    from ..backends import kernel_cache

    directory = kernel_cache.cache_dir()
    count, freed = kernel_cache.clear(directory)
    print(f"removed {count} cached programs ({freed / 2**20:.1f} MiB) from {directory}")
    return 0
