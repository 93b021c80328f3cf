"""``pagedopt config check FILE [--model module:factory]`` and ``pagedopt config schema``.

``check`` validates a config file; given a model factory (an importable ``module:callable``,
or ``path/to/file.py:callable``, returning an ``nn.Module``) it also builds the optimizer on
that model and prints one row per parameter: name, shape, state precision, paging, the
rules that matched it and the settings that differ from the optimizer's. Exit status: 0
valid, 1 invalid config (or a rule matching nothing under ``strict``), 2 bad usage (the
model factory cannot be loaded).

``schema`` prints the JSON Schema of config documents, for editors (e.g. the YAML language
server: ``# yaml-language-server: $schema=pagedopt-config.schema.json``).

Example:
    >>> from pagedopt.cli import main
    >>> main(["config", "check", "examples/config.yaml"])  # doctest: +SKIP
    examples/config.yaml: valid (PagedAdamW8bit, 4 override rules)
    0
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "config", help="check a config file, print the config JSON Schema",
        description="Validate pagedopt config files (YAML, TOML, JSON) and export their JSON Schema.",
    )
    actions = parser.add_subparsers(dest="config_action", metavar="ACTION")
    parser.set_defaults(func=lambda args: _usage(parser))

    check = actions.add_parser(
        "check", help="validate FILE; with --model, print the per-parameter settings table",
        description="Validate a config file. With --model, build the optimizer for that model and print "
                    "what it does with every parameter. Exit status 0: valid, 1: invalid, 2: bad usage.",
    )
    check.add_argument("file", metavar="FILE", help="config file (.yaml, .yml, .toml, .json)")
    check.add_argument("--model", metavar="MODULE:FACTORY",
                       help="a callable returning the torch.nn.Module to resolve the rules against "
                            "(importable 'package.module:function' or 'path/to/file.py:function')")
    check.add_argument("--strict", action="store_true", help="a rule matching no parameter is an error")
    check.set_defaults(func=run_check)

    schema = actions.add_parser("schema", help="print the JSON Schema of config files (for editors)")
    schema.add_argument("-o", "--output", metavar="FILE", help="write the schema to FILE instead of stdout")
    schema.set_defaults(func=run_schema)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def run_check(args: argparse.Namespace) -> int:
    from ..config import ConfigError, load_config, optimizer_for, resolve, settings_table

    try:
        config = load_config(args.file)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    if args.strict:
        config = config.model_copy(update={"strict": True})
        config._source = args.file
    rules = len(config.overrides)
    summary = f"{args.file}: valid ({config.optimizer.name}, {rules} override rule{'s' if rules != 1 else ''})"
    if args.model is None:
        print(summary)
        return 0
    try:
        model = _load_model(args.model)
    except _UsageError as e:
        print(f"error: --model {args.model}: {e}", file=sys.stderr)
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            resolution = resolve(model, config)
            optimizer = optimizer_for(resolution)
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 1
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(summary)
    print(settings_table(optimizer, resolution))
    return 0


class _UsageError(Exception):
    pass


def _load_model(spec: str) -> Any:
    import torch

    factory = _load_callable(spec)
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported, not raised
        raise _UsageError(f"the factory raised {type(e).__name__}: {e}") from None
    if not isinstance(model, torch.nn.Module):
        raise _UsageError(f"the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_callable(spec: str) -> Callable[[], Any]:
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise _UsageError("expected MODULE:FACTORY, e.g. 'mypkg.models:build' or 'model.py:build'")
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise _UsageError(f"no such file: {module_name}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
        try:
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as e:  # noqa: BLE001
            raise _UsageError(f"importing {module_name} raised {type(e).__name__}: {e}") from None
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # the console script does not put the cwd on the path
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # noqa: BLE001
            raise _UsageError(f"cannot import {module_name!r}: {type(e).__name__}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise _UsageError(f"{module_name} has no callable {attr!r}")
    return factory


def run_schema(args: argparse.Namespace) -> int:
    from ..config import json_schema
    from ..fileio import AtomicWriteError, atomic_write_text

    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.output:
        try:
            atomic_write_text(args.output, text)
        except AtomicWriteError as exc:
            print(f"pagedopt config schema: error: {exc}", file=sys.stderr)
            return 74
    else:
        sys.stdout.write(text)
    return 0
