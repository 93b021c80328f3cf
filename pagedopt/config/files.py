"""Reading config documents: YAML (``.yaml``/``.yml``), TOML (``.toml``) and JSON (``.json``).

Syntax errors become :class:`~pagedopt.config.errors.ConfigError` with the line and column.
Two YAML/JSON fixes over the plain parsers: a key given twice is an error (PyYAML and
``json`` silently keep the last one), and YAML reads ``1e-3`` as a number (PyYAML follows
YAML 1.1, where a float needs a dot: ``1e-3`` would be the *string* "1e-3").

Loading is bounded, so a small hostile file cannot hang a job or exhaust its memory (YAML
aliases can make a few hundred bytes expand to billions of values - "billion laughs"):

- the file is at most :data:`MAX_FILE_BYTES` (64 MiB);
- a document nests at most :data:`MAX_DEPTH` (64) mappings/lists deep;
- a YAML document expands to at most :data:`MAX_NODES` (4 million) values, counting every
  use of an anchor as a copy of what it names (the expansion is counted on the parsed node
  graph, shared parts once, before anything is built);
- the ``overrides`` list holds at most :data:`MAX_RULES` rules.

Each limit raises :class:`~pagedopt.config.errors.ConfigError` naming the file (and the line
of the alias or the key path). YAML is parsed by libyaml's C parser when PyYAML has it.

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
MAX_FILE_BYTES = 64 * 2**20
MAX_DEPTH = 64
MAX_NODES = 4_000_000
MAX_RULES = 10_000  # override rules in one file (each is matched against every parameter name)


def read_document(path: str | os.PathLike[str]) -> Any:
    """The parsed document in ``path`` (format from the suffix); ConfigError if unreadable
    or over a limit (see the module docstring)."""
    file = str(path)
    kind = SUFFIXES.get(Path(path).suffix.lower())
    if kind is None:
        raise ConfigError([ConfigIssue(
            file, "", f"unsupported config file type {Path(path).suffix!r} (use .yaml, .yml, .toml or .json)")])
    try:
        size = os.stat(path).st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError([ConfigIssue(file, "", f"the file has {size:,} bytes, more than the limit of "
                                                     f"{MAX_FILE_BYTES:,} for a config file")])
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([ConfigIssue(file, "", f"cannot read the file: {e}")]) from None
    parse = {"yaml": _parse_yaml, "toml": _parse_toml, "json": _parse_json}[kind]
    document = parse(text, file)
    if kind != "yaml":  # YAML was checked on its node graph, before it was built
        check_depth(document, file)
    return document


def check_depth(document: Any, file: str) -> None:
    """ConfigError when ``document`` nests deeper than :data:`MAX_DEPTH` (iterative: a deep
    document cannot exhaust the interpreter's stack here)."""
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(document, 0, ())]
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError([ConfigIssue(file, ".".join(map(str, where[:8])) + ("..." if len(where) > 8 else ""),
                                           f"nested more than {MAX_DEPTH} levels deep")])
        if isinstance(value, dict):
            stack.extend((v, depth + 1, where + (k,)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, depth + 1, where + (i,)) for i, v in enumerate(value))


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


class _LimitExceeded(Exception):
    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(message)
        self.mark = mark


def check_node_graph(root: Any) -> None:
    """Raise ``_LimitExceeded`` when the composed YAML node graph nests deeper than
    :data:`MAX_DEPTH` or expands (aliases counted as copies) to more than :data:`MAX_NODES`
    values. Shared nodes are measured once (memoized), so this is linear in the file."""
    import yaml

    sizes: dict[int, int] = {}
    # Iterative post-order walk: (node, depth, children done?)
    stack: list[tuple[Any, int, bool]] = [(root, 0, False)]
    on_path: set[int] = set()
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            if isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            else:
                children = list(node.value)
            total = 1 + sum(sizes[id(c)] for c in children)
            if total > MAX_NODES:
                raise _LimitExceeded(f"the document expands to more than {MAX_NODES:,} values (YAML aliases "
                                     "count once per use)", node.start_mark)
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if depth > MAX_DEPTH:
            raise _LimitExceeded(f"nested more than {MAX_DEPTH} levels deep", node.start_mark)
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = 1
            continue
        if key in on_path:  # a recursive alias (&a [*a]) never finishes expanding
            raise _LimitExceeded("a recursive YAML alias (a node that contains itself)", node.start_mark)
        on_path.add(key)
        stack.append((node, depth, True))
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
        stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)


def _check_rule_count(root: Any) -> None:
    """Refuse an over-long ``overrides`` list before building it (the limit is
    :data:`MAX_RULES`; checked again on the built document)."""
    import yaml


    if not isinstance(root, yaml.MappingNode):
        return
    for key, value in root.value:
        if isinstance(key, yaml.ScalarNode) and key.value == "overrides" and isinstance(value, yaml.SequenceNode):
            if len(value.value) > MAX_RULES:
                raise _LimitExceeded(f"overrides: {len(value.value):,} rules, more than the limit of {MAX_RULES:,}",
                                     value.start_mark)


PRESCAN_BYTES = 1 << 20  # files at least this large get their rule list counted from events first


def prescan_rule_count(text: str) -> None:
    """Raise ``_LimitExceeded`` at the first ``overrides`` entry past :data:`MAX_RULES`,
    reading only the parser's events (no nodes are built, and the rest of the file is not
    read). Composing a 10 MB file of 200k rules took half a minute before the node-graph check
    could refuse it; this refuses it after rule MAX_RULES + 1. Aliased rule lists are counted
    on the node graph (:func:`_check_rule_count`)."""
    import yaml

    depth = 0  # collections open around the next event
    expect_key = False  # the next top-level event is a key of the document's mapping
    next_is_rules = False  # the last top-level key was "overrides"
    rules_depth = -1  # depth of the overrides sequence's entries while inside it
    count = 0
    for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", None) or yaml.SafeLoader):
        starts = isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent))
        if depth == rules_depth and (starts or isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent))):
            count += 1
            if count > MAX_RULES:
                raise _LimitExceeded(f"overrides: more than the limit of {MAX_RULES:,} rules", event.start_mark)
        if depth == 1 and (starts or isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent))):
            if expect_key:
                next_is_rules = isinstance(event, yaml.ScalarEvent) and event.value == "overrides"
            elif next_is_rules and isinstance(event, yaml.SequenceStartEvent):
                rules_depth = 2
            expect_key = not expect_key
        if starts:
            depth += 1
            if depth == 1:
                expect_key = isinstance(event, yaml.MappingStartEvent)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
            if rules_depth > 0 and depth < rules_depth:
                return  # the whole rule list was within the limit


def _yaml_loader(fast: bool = True) -> type:
    import yaml

    # libyaml's C parser when available (several times faster on large files); the
    # constructor and resolver below are Python either way. A file libyaml rejects is parsed
    # again by PyYAML's Python parser, whose messages the error reports use.
    base = (getattr(yaml, "CSafeLoader", None) if fast else None) or yaml.SafeLoader

    class Loader(base):  # type: ignore[misc, valid-type]
        """SafeLoader + YAML 1.2 floats + duplicate keys rejected + bounded expansion."""

        def get_single_data(self) -> Any:
            node = self.get_single_node()
            if node is None:
                return None
            check_node_graph(node)
            _check_rule_count(node)
            return self.construct_document(node)

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


_LOADERS: dict[bool, type] = {}


def _parse_yaml(text: str, file: str) -> Any:
    import yaml

    try:
        return _load_yaml(text, file, fast=True)
    except ConfigError:
        raise
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError):
        return _load_yaml(text, file, fast=False)  # raises, with PyYAML's own message


def _load_yaml(text: str, file: str, fast: bool) -> Any:
    import yaml

    if fast not in _LOADERS:
        _LOADERS[fast] = _yaml_loader(fast)
    try:
        if fast and len(text) >= PRESCAN_BYTES:
            prescan_rule_count(text)
        return yaml.load(text, Loader=_LOADERS[fast])  # noqa: S506 - a SafeLoader subclass
    except _LimitExceeded as e:
        mark = e.mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        where = f"line {line}, column {column}: " if line is not None else ""
        raise ConfigError([ConfigIssue(file, "", f"{where}{e}")]) from None
    except yaml.MarkedYAMLError as e:
        if fast:
            raise
        mark = e.problem_mark or e.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise _syntax_error(file, "YAML", line, column, e.problem or e.context or str(e)) from None
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as e:
        if fast:
            raise
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
