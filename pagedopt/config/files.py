"""Reading config documents: YAML (``.yaml``/``.yml``), TOML (``.toml``) and JSON (``.json``).

Syntax errors become :class:`~pagedopt.config.errors.ConfigError` with the line and column.
Two YAML/JSON fixes over the plain parsers: a key given twice is an error (PyYAML and
``json`` silently keep the last one), and YAML reads ``1e-3`` as a number (PyYAML follows
YAML 1.1, where a float needs a dot: ``1e-3`` would be the *string* "1e-3").

Example:
    >>> import pathlib, tempfile
    >>> from pagedopt.config.files import read_document
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "c.yaml"
    >>> _ = path.write_text("optimizer: {name: AdamW8bit, lr: 1e-3}\\n")
    >>> read_document(path)
    {'optimizer': {'name': 'AdamW8bit', 'lr': 0.001}}
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import ConfigError, ConfigIssue

SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}


def read_document(path: str | os.PathLike[str]) -> Any:
    """The parsed document in ``path`` (format from the suffix); ConfigError if unreadable."""
    file = str(path)
    kind = SUFFIXES.get(Path(path).suffix.lower())
    if kind is None:
        raise ConfigError([ConfigIssue(
            file, "", f"unsupported config file type {Path(path).suffix!r} (use .yaml, .yml, .toml or .json)")])
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([ConfigIssue(file, "", f"cannot read the file: {e}")]) from None
    parse = {"yaml": _parse_yaml, "toml": _parse_toml, "json": _parse_json}[kind]
    return parse(text, file)


def _syntax_error(file: str, kind: str, line: int | None, column: int | None, problem: str) -> ConfigError:
    where = f"line {line}, column {column}: " if line is not None else ""
    return ConfigError([ConfigIssue(file, "", f"{where}invalid {kind}: {problem}")])


# -- YAML ------------------------------------------------------------------------------------

# YAML 1.2's float syntax (1e-3, 5E+4, .5, 1_000.0 are numbers), for PyYAML's 1.1 resolver.
_YAML_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


def _yaml_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader + YAML 1.2 floats + duplicate keys rejected."""

    Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for first in "-+0123456789.":
        Loader.yaml_implicit_resolvers[first] = [
            (tag, rx) for tag, rx in Loader.yaml_implicit_resolvers.get(first, []) if tag != "tag:yaml.org,2002:float"
        ]
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_FLOAT, list("-+0123456789."))

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> dict:
        loader.flatten_mapping(node)
        out: dict = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"unhashable key {key!r}", key_node.start_mark) from None
            if key in out:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            out[key] = loader.construct_object(value_node, deep=deep)
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


_LOADER: type | None = None


def _parse_yaml(text: str, file: str) -> Any:
    global _LOADER
    import yaml

    if _LOADER is None:
        _LOADER = _yaml_loader()
    try:
        return yaml.load(text, Loader=_LOADER)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise _syntax_error(file, "YAML", line, column, e.problem or e.context or str(e)) from None
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as e:
        raise _syntax_error(file, "YAML", None, None, str(e).splitlines()[0] if str(e) else type(e).__name__) from None


# -- TOML ------------------------------------------------------------------------------------


def _parse_toml(text: str, file: str) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError([ConfigIssue(file, "", "TOML configs need Python 3.11+ or the 'tomli' package")]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        problem = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        raise _syntax_error(file, "TOML", int(m.group(1)) if m else None, int(m.group(2)) if m else None,
                            problem) from None


# -- JSON ------------------------------------------------------------------------------------


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_json(text: str, file: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise _syntax_error(file, "JSON", e.lineno, e.colno, e.msg) from None
    except (_DuplicateKey, RecursionError) as e:
        raise _syntax_error(file, "JSON", None, None, str(e) or type(e).__name__) from None
