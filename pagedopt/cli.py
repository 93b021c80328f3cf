"""The ``pagedopt`` command: ``train``, ``bench``, ``config``, ``kernels``, ``env``, ``plan``.

Each subcommand lives in its own module under :mod:`pagedopt.commands` and provides
``add_parser(subparsers)``, which registers its arguments and sets ``func`` to the function
that runs it (returning the process exit code). Modules import heavy dependencies inside
``func`` so ``pagedopt --help`` stays fast.

Example:
    >>> from pagedopt.cli import build_parser
    >>> build_parser().prog
    'pagedopt'
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order ``--help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "pagedopt.commands.train",
    "pagedopt.commands.bench",
    "pagedopt.commands.config",
    "pagedopt.commands.kernels",
    "pagedopt.commands.env",
    "pagedopt.commands.plan",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedopt",
        description="8-bit paged optimizers: train the demo model, benchmark, check configs, compile kernels, "
        "report the environment.",
    )
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"pagedopt {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
