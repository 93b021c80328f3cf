"""Loading and validating config documents; the JSON Schema.

Example:
    >>> from pagedopt.config.load import validate_document
    >>> validate_document({"optimizer": {"name": "Lion8bit", "lr": 3e-5}}).optimizer.given()
    {'lr': 3e-05}
    >>> validate_document({"optimizer": {"name": "Lion8bit", "lr": -3e-5}}, "job.yaml")
    Traceback (most recent call last):
    ...
    pagedopt.config.errors.ConfigError: job.yaml: optimizer.lr: Invalid lr: -3e-05 (must be a finite number >= 0)
"""

from __future__ import annotations

import os
import typing
from typing import Any, Iterable, Mapping

from pydantic import BaseModel, ValidationError

from .. import optim
from ..paging.config import PagingConfig, parse_bytes
from . import optimizers
from .errors import ConfigError, ConfigIssue, issues_from_validation_error
from . import files
from .files import read_document
from .models import PagedoptConfig

# files.MAX_RULES caps the rules: they are checked against the optimizer one by one and
# matched against every parameter name when the optimizer is built.


def load_config(path: str | os.PathLike[str]) -> PagedoptConfig:
    """The validated config in ``path`` (``.yaml``/``.yml``, ``.toml`` or ``.json``).

    Raises :class:`~pagedopt.ConfigError` (a ``ValueError``) listing every problem found as
    ``file: key.path: message (got value)`` lines.

    Example:
        >>> import pagedopt, pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "opt.toml"
        >>> _ = path.write_text('[optimizer]\\nname = "PagedAdamW8bit"\\nlr = 2e-4\\n'
        ...                     '[paging]\\npolicy = "budgeted"\\ndevice_budget_bytes = "1GiB"\\n')
        >>> cfg = pagedopt.load_config(path)
        >>> cfg.optimizer.name, cfg.paging.device_budget_bytes
        ('PagedAdamW8bit', 1073741824)
    """
    return validate_document(read_document(path), str(path))


def validate_document(data: Any, source: str = "<config>") -> PagedoptConfig:
    """``data`` (a parsed document) validated; ConfigError names ``source`` on every line."""
    if data is None:
        raise ConfigError([ConfigIssue(source, "", "the document is empty (expected an 'optimizer' section)")])
    if not isinstance(data, Mapping):
        raise ConfigError([ConfigIssue(
            source, "", "expected a mapping of sections (optimizer, paging, telemetry, overrides, strict)",
            type(data).__name__)])
    rules = data.get("overrides")
    if isinstance(rules, (list, tuple)) and len(rules) > files.MAX_RULES:
        raise ConfigError([ConfigIssue(
            source, "overrides", f"{len(rules):,} rules, more than the limit of {files.MAX_RULES:,} (rules are matched "
                                 "against every parameter name; group parameters with a glob or re: pattern)")])
    try:
        config = PagedoptConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(issues_from_validation_error(e, source, clean_loc=_clean_loc, known_keys=_known_keys)) from None
    config._source = source
    return config


def as_config(config: PagedoptConfig | str | os.PathLike[str] | Mapping[str, Any], **optimizer_args: Any) -> PagedoptConfig:
    """A PagedoptConfig from a config, a path or a parsed document; ``optimizer_args`` replace
    the optimizer section's values (and are validated like them)."""
    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    elif not isinstance(config, PagedoptConfig):
        if not isinstance(config, Mapping):
            raise TypeError(f"expected a PagedoptConfig, a path or a mapping, got {type(config).__name__}")
        config = validate_document(config)
    if not optimizer_args:
        return config
    data = config.model_dump(exclude_unset=True)
    data["optimizer"] = {**data["optimizer"], **optimizer_args}
    return validate_document(data, config.source)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a config document (for editors; ``pagedopt config schema``)."""
    schema = PagedoptConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["description"] = (
        "pagedopt optimizer config: the optimizer and its arguments, paging, telemetry and "
        "per-parameter override rules. Byte sizes accept integers or strings such as '2GiB'."
    )
    _allow_byte_strings(schema)
    return schema


# -- error locations ----------------------------------------------------------------------------


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # The optimizer union puts the chosen class's name into the location: optimizer.AdamW8bit.lr
    if len(loc) > 1 and loc[0] == "optimizer" and loc[1] in optim.OPTIMIZER_NAMES:
        return (loc[0], *loc[2:])
    return loc


def _known_keys(parent: tuple[Any, ...]) -> Iterable[str] | None:
    """The keys allowed at location ``parent`` (uncleaned: optimizer union tags included)."""
    if len(parent) >= 2 and parent[0] == "optimizer" and parent[1] in optim.OPTIMIZER_NAMES:
        if len(parent) == 2:
            return optimizers.args_model(parent[1]).model_fields
        return None
    model: Any = PagedoptConfig
    for part in parent:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        model = _model_in(model.model_fields[part].annotation)
    return model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else None


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside ``Optional[...]``/``list[...]``/``Annotated[...]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _allow_byte_strings(schema: dict[str, Any]) -> None:
    # PagingConfig's byte sizes take "2GiB" through a before-validator that JSON Schema cannot
    # see; without this, editors would flag every human-readable size.
    byte_fields = {
        name for name, info in PagingConfig.model_fields.items()
        if any(getattr(m, "func", None) is parse_bytes for m in info.metadata)
        or "parse_bytes" in repr(info.annotation)
    }
    size_string = {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?\s*[A-Za-z]*\s*$",
                   "examples": ["512MiB", "2GiB", "1.5GB"]}
    for model_name in ("PagingConfig", "PagingOverride"):
        props = schema.get("$defs", {}).get(model_name, {}).get("properties", {})
        for name in byte_fields:
            if name in props:
                prop = props[name]
                options = prop.pop("anyOf", None) or [{k: prop.pop(k) for k in ("type", "minimum") if k in prop}]
                for option in options:  # pydantic writes a nested Field(ge=0) as "ge"
                    if "ge" in option:
                        option["minimum"] = option.pop("ge")
                prop["anyOf"] = [*options, size_string]


__all__ = ["load_config", "validate_document", "as_config", "json_schema"]
