"""``pagedopt bench``: interleaved side-by-side CPU optimizer-step benchmark.

See :mod:`pagedopt.bench` for what is measured and how.

Example:
    >>> import argparse
    >>> from pagedopt.commands import bench
    >>> sub = argparse.ArgumentParser().add_subparsers()
    >>> bench.add_parser(sub).parse_args(["--case", "a", "--numel", "1000"]).repeats
    7
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark optimizer steps on CPU against torch, bitsandbytes and torchao",
        description=(
            "Time optimizer steps side by side in one process (interleaved rounds, median of repeats): "
            "case a = one fp32 tensor (32M parameters), case b = a GPT-2-small parameter list (124M). "
            "Case b with the default candidates needs about 5 GB of memory."
        ),
    )
    parser.add_argument("--case", choices=("a", "b", "all"), default="all", help="which case to run (default: all)")
    parser.add_argument(
        "--optimizers", default="default",
        help="comma-separated candidates; 'default' = pagedopt-adamw8bit, pagedopt-adamw32bit, torch-fused, "
             "torch-foreach, bnb-adamw8bit, torchao-adamw8bit; 'all-8bit' = every pagedopt 8-bit optimizer "
             "(e.g. 'torch-fused,all-8bit')",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per candidate (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per candidate before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--isa", choices=("avx512", "avx2", "baseline"), default=None,
                        help="instruction-set level of pagedopt's CPU kernels (default: the best this CPU "
                             "supports; the same as PAGEDOPT_CPU_ISA)")
    parser.add_argument("--numel", type=int, default=None, help="case a: tensor size (default 33554432)")
    parser.add_argument("--layers", type=int, default=12, help="case b: transformer layers (default 12)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import bench

    if args.repeats < 1 or args.warmup < 1:
        raise SystemExit("pagedopt bench: --repeats and --warmup must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("pagedopt bench: --threads must be at least 1")
        torch.set_num_threads(args.threads)
    try:
        optimizers = bench.resolve_optimizers(args.optimizers)
        for name in optimizers:
            if name not in bench.known_optimizers() and not name.startswith("pagedopt-"):
                raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(bench.known_optimizers())}")
    except ValueError as e:
        raise SystemExit(f"pagedopt bench: --optimizers: {e}") from None
    from ..backends import cpu

    if args.isa is not None:
        try:
            lib = cpu.library()
            if lib is None:
                raise SystemExit(f"pagedopt bench: --isa: the native CPU library is unavailable "
                                 f"({cpu.unavailable_reason()})")
            lib.select_isa(args.isa, source="--isa")
        except cpu.CpuIsaError as e:
            raise SystemExit(f"pagedopt bench: {e}") from None
    cases = ("a", "b") if args.case == "all" else (args.case,)
    try:
        bench.run(cases, optimizers, args.repeats, args.warmup, args.numel or bench.DEFAULT_NUMEL, args.layers,
                  json_path=args.json)
    except cpu.CpuIsaError as e:  # PAGEDOPT_CPU_ISA names a level this CPU cannot run
        raise SystemExit(f"pagedopt bench: {e}") from None
    return 0
