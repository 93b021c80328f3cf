"""ConfigError: every problem of a config file, one ``file: key.path: message (got value)`` line each.

Example:
    >>> from pagedopt.config.errors import ConfigError, ConfigIssue
    >>> e = ConfigError([ConfigIssue("train.yaml", "optimizer.lr", "Invalid lr: -1.0 (must be >= 0)", -1.0)])
    >>> print(e)
    train.yaml: optimizer.lr: Invalid lr: -1.0 (must be >= 0)
    >>> isinstance(e, ValueError)
    True
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from pydantic import ValidationError

# Marks an issue without an offending value (a missing key, a file that cannot be read).
NO_VALUE = object()
_MAX_VALUE_CHARS = 80


class ConfigWarning(UserWarning):
    """A config that loads but probably does not do what was meant (a rule matching nothing)."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem: the file, the key path (``overrides[1].set.lr``), a message, the value."""

    file: str
    path: str
    message: str
    value: Any = NO_VALUE

    def __str__(self) -> str:
        text = f"{self.file}: {self.path}: {self.message}" if self.path else f"{self.file}: {self.message}"
        if self.value is not NO_VALUE:
            shown = short_repr(self.value)
            if shown not in self.message:
                text += f" (got {shown})"
        return text


class ConfigError(ValueError):
    """Invalid pagedopt config. ``issues`` lists every problem found; ``str()`` has one line each.

    Example:
        >>> import pagedopt, pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "bad.yaml"
        >>> _ = path.write_text("optimizer: {name: AdamW8bit, weigth_decay: 0.1}\\n")
        >>> try:
        ...     pagedopt.load_config(path)
        ... except pagedopt.ConfigError as e:
        ...     print(str(e).replace(str(path), "bad.yaml"))
        bad.yaml: optimizer.weigth_decay: unknown key 'weigth_decay' (did you mean 'weight_decay'?) (got 0.1)
    """

    def __init__(self, issues: Sequence[ConfigIssue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues) or "invalid config")

    @property
    def file(self) -> str | None:
        return self.issues[0].file if self.issues else None


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


def key_path(loc: Iterable[Any]) -> str:
    """``("overrides", 0, "set", "lr")`` -> ``"overrides[0].set.lr"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def unknown_key_message(key: Any, known: Iterable[str] | None) -> str:
    known = sorted(known or ())
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    if close:
        return f"unknown key {key!r} (did you mean {close[0]!r}?)"
    if known:
        return f"unknown key {key!r} (expected one of: {', '.join(known)})"
    return f"unknown key {key!r}"


def issues_from_validation_error(
    error: ValidationError,
    file: str,
    *,
    clean_loc: Callable[[tuple[Any, ...]], tuple[Any, ...]] = lambda loc: loc,
    known_keys: Callable[[tuple[Any, ...]], Iterable[str] | None] = lambda loc: None,
) -> list[ConfigIssue]:
    """One :class:`ConfigIssue` per pydantic line error, with friendlier messages.

    ``clean_loc`` drops union tags from a location; ``known_keys(parent_loc)`` lists the keys
    allowed at a location (for "did you mean" on misspelled keys).
    """
    issues = []
    for err in error.errors(include_url=False):
        raw_loc = tuple(err["loc"])
        loc = clean_loc(raw_loc)
        kind, message, value = err["type"], err["msg"], err.get("input", NO_VALUE)
        if kind == "extra_forbidden":
            message = unknown_key_message(loc[-1] if loc else "?", known_keys(raw_loc[:-1]))
        elif kind == "missing":
            message, value = "missing required key", NO_VALUE
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        elif message.startswith("Assertion failed, "):
            message = message[len("Assertion failed, "):]
        if isinstance(value, (dict, list)) and kind not in ("extra_forbidden",) and len(repr(value)) > _MAX_VALUE_CHARS:
            value = NO_VALUE  # a whole section: the key path says enough
        issues.append(ConfigIssue(file, key_path(loc), message, value))
    return issues
