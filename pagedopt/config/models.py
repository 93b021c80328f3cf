"""The pydantic v2 models of a pagedopt config document (see :mod:`pagedopt.config`).

Example:
    >>> from pagedopt.config.models import PagedoptConfig
    >>> cfg = PagedoptConfig.model_validate({
    ...     "optimizer": {"name": "AdamW8bit", "lr": 1e-3},
    ...     "overrides": [{"match": "*.bias", "set": {"weight_decay": 0.0}}],
    ... })
    >>> cfg.optimizer.name, cfg.overrides[0].set.given()
    ('AdamW8bit', {'weight_decay': 0.0})
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from typing import Annotated, Any, Literal, Optional

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt, ValidationError,
    ValidationInfo, create_model, field_validator, model_serializer, model_validator,
)

from ..optim import validation
from ..paging.config import MemoryConfig, PagingConfig
from . import optimizers
from .errors import unknown_key_message
from .optimizers import OptimizerArgs, raise_located


class TelemetryConfig(BaseModel):
    """Where the Prometheus exporter serves metrics (consumed by ``pagedopt train``).

    Attributes:
        enabled: serve metrics at all.
        addr: interface to bind; ``127.0.0.1`` keeps the endpoint local (use ``0.0.0.0`` for a
            scraper on another host).
        port: base port; the process with ``LOCAL_RANK=r`` serves on ``port + r``.
        top_k: parameters with their own series (largest state first); the rest are summed
            into ``__other__``, which bounds label cardinality.

    Example:
        >>> TelemetryConfig(port=9460).port
        9460
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: StrictBool = True
    addr: str = "127.0.0.1"
    port: StrictInt = Field(default=9460, ge=1, le=65535)
    top_k: StrictInt = Field(default=20, ge=0)

    @field_validator("addr")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if value != "localhost":
                raise ValueError(f"not an IP address: {value!r} (e.g. '127.0.0.1', '0.0.0.0', '::1')") from None
        return value


class _OnlyGiven(BaseModel):
    """A partial model: it serializes only the fields the document gave (a dump loads back
    as the same partial settings, not as every field set to null)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_serializer(mode="wrap")
    def _given_only(self, handler: Any) -> Any:
        data = handler(self)
        return {k: v for k, v in data.items() if k in self.model_fields_set} if isinstance(data, dict) else data


def _paging_shorthand(value: Any) -> Any:
    # ``paging: false`` / ``paging: null`` -> unpaged; ``paging: true`` -> paged, inherited config.
    if value is None or isinstance(value, bool):
        return {"enabled": bool(value)}
    return value


def _paging_override_model() -> type[BaseModel]:
    fields: dict[str, Any] = {
        "enabled": (StrictBool, Field(default=True, description="false: this parameter's state is not paged")),
    }
    for name, info in PagingConfig.model_fields.items():
        # Optional, no default, but the field's validators (byte sizes) and bounds kept.
        # The constraints go inside Optional: Annotated[Optional[int], Ge(1)] would apply
        # ``>= 1`` to an explicit null and crash instead of failing validation.
        kind = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[name] = (Optional[kind], Field(default=None))
    return create_model(
        "PagingOverride",
        __base__=_OnlyGiven,
        __doc__="Per-parameter paging: fields of PagingConfig that replace the inherited ones.",
        **fields,
    )


PagingOverride = _paging_override_model()


def merge_paging(base: PagingConfig | None, override: BaseModel) -> PagingConfig | None:
    """``override`` (a PagingOverride) applied to ``base`` (``None``: PagingConfig's defaults).
    ``None`` means not paged. Raises pydantic's ValidationError for an invalid result."""
    given = {k: getattr(override, k) for k in override.model_fields_set if k != "enabled"}
    if not override.enabled:
        return None
    start = base.model_dump() if base is not None else {}
    return PagingConfig(**{**start, **given})


class Settings(
    create_model(  # type: ignore[misc]
        "_SettingsFields",
        __base__=_OnlyGiven,
        **optimizers.settings_fields(),
        paging=(Annotated[Optional[PagingOverride], BeforeValidator(_paging_shorthand)], Field(default=None)),
    )
):
    """What an ``overrides`` rule sets: any per-parameter optimizer setting, plus ``paging``.

    Which settings exist depends on the optimizer (checked by :class:`PagedoptConfig`).

    Example:
        >>> Settings(lr=1e-4, betas=[0.9, 0.95]).given()
        {'lr': 0.0001, 'betas': (0.9, 0.95)}
    """

    def given(self) -> dict[str, Any]:
        """The settings the rule sets, in the order of the model's fields."""
        return {k: getattr(self, k) for k in type(self).model_fields if k in self.model_fields_set}


class OverrideRule(BaseModel):
    """One ``overrides`` rule: which parameters (every given condition must hold) and what to set.

    Attributes:
        match: glob on the parameter's qualified name (``*`` also matches dots:
            ``"*.bias"``, ``"layers.*.attn.*"``), or ``"re:<regex>"`` (whole-name match).
        module: class name of the module owning the parameter, or of one of its base
            classes (``Embedding`` matches ``StableEmbedding`` too); ``torch.nn.Linear`` style
            qualified names work as well.
        min_numel, max_numel: inclusive bounds on the parameter's number of elements (the
            global size under FSDP2).
        set: the settings (see :class:`Settings`).

    Example:
        >>> rule = OverrideRule(match="re:layers\\\\.[0-9]+\\\\.bias", set={"weight_decay": 0.0})
        >>> rule.matches_name("layers.3.bias"), rule.matches_name("head.bias")
        (True, False)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    match: Optional[str] = None
    module: Optional[str] = None
    min_numel: Optional[StrictInt] = Field(default=None, ge=0)
    max_numel: Optional[StrictInt] = Field(default=None, ge=0)
    set: Settings

    _pattern: re.Pattern[str] | None = PrivateAttr(default=None)

    @field_validator("match")
    @classmethod
    def _valid_pattern(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return value
        if not value.strip():
            raise ValueError("empty pattern")
        if value.startswith("re:"):
            try:
                re.compile(value[3:])
            except re.error as e:
                raise ValueError(f"invalid regular expression {value[3:]!r}: {e}") from None
        return value

    @model_validator(mode="after")
    def _complete(self) -> "OverrideRule":
        if self.match is None and self.module is None and self.min_numel is None and self.max_numel is None:
            raise ValueError(
                "a rule needs at least one of match, module, min_numel, max_numel "
                "(settings for every parameter belong in the optimizer section)")
        if self.min_numel is not None and self.max_numel is not None and self.min_numel > self.max_numel:
            raise ValueError(f"min_numel ({self.min_numel}) is larger than max_numel ({self.max_numel})")
        if not self.set.model_fields_set:
            raise ValueError("'set' is empty: the rule would change nothing")
        return self  # the pattern is compiled on first use (a 10k-rule file validates in seconds)

    def describe(self) -> str:
        """The rule's conditions as written, e.g. ``match: '*.bias', min_numel: 10``."""
        parts = [f"{k}: {getattr(self, k)!r}" for k in ("match", "module", "min_numel", "max_numel")
                 if getattr(self, k) is not None]
        return ", ".join(parts)

    def matches_name(self, name: str) -> bool:
        if self.match is None:
            return True
        if self._pattern is None:
            source = self.match[3:] if self.match.startswith("re:") else fnmatch.translate(self.match)
            self._pattern = re.compile(source)
        return self._pattern.fullmatch(name) is not None

    def matches(self, names: list[str], module_classes: list[str], numel: int) -> bool:
        """Whether the rule selects a parameter with these names (a tied parameter has several),
        owning-module class names (bases included) and size."""
        if self.match is not None and not any(self.matches_name(n) for n in names):
            return False
        if self.module is not None and self.module not in module_classes:
            return False
        if self.min_numel is not None and numel < self.min_numel:
            return False
        if self.max_numel is not None and numel > self.max_numel:
            return False
        return True


class PagedoptConfig(BaseModel):
    """A pagedopt config document (see :mod:`pagedopt.config` for the format and precedence).

    Attributes:
        optimizer: ``name`` (any of the 54 optimizer classes) and its constructor arguments.
        paging: a :class:`~pagedopt.PagingConfig`; pages the optimizer's state (an
            unpaged class such as ``AdamW8bit`` then behaves like ``PagedAdamW8bit``).
        memory: the memory controller (:class:`~pagedopt.MemoryConfig`): free-memory headroom
            and OOM recovery; ``build_optimizer`` attaches a :class:`~pagedopt.MemoryController`.
        telemetry: the Prometheus exporter (:class:`TelemetryConfig`); read by ``pagedopt train``.
        overrides: rules applied in order to each parameter; later rules win.
        strict: a rule that matches no parameter is an error instead of a warning.
        numerics: ``fast`` (default) or ``strict``: the CUDA kernels' math mode (``strict``:
            bit-identical to the CPU kernels; see :class:`~pagedopt.optim.Optimizer8bit`).
        cuda_graph: replay the planned step as a CUDA graph on CUDA devices (default true).
        update_in_backward: update each parameter in backward and free its gradient
            (default false; see :mod:`pagedopt.optim.backward_update`).

    Example:
        >>> cfg = PagedoptConfig.model_validate({"optimizer": "Lion8bit"})
        >>> cfg.optimizer.name, cfg.optimizer.given()
        ('Lion8bit', {})
    """

    model_config = ConfigDict(extra="forbid", frozen=True, title="pagedopt config")

    optimizer: optimizers.optimizer_section_type()  # type: ignore[valid-type]
    paging: Optional[PagingConfig] = None
    memory: Optional[MemoryConfig] = None
    telemetry: Optional[TelemetryConfig] = None
    overrides: list[OverrideRule] = Field(default_factory=list)
    strict: StrictBool = False
    numerics: Literal["fast", "strict"] = "fast"
    cuda_graph: StrictBool = True
    update_in_backward: StrictBool = False

    _source: str | None = PrivateAttr(default=None)

    @property
    def source(self) -> str:
        """The file this config came from (``"<config>"`` when built in Python)."""
        return self._source or "<config>"

    @field_validator("overrides", mode="wrap")
    @classmethod
    def _settings_fit_optimizer(cls, value: Any, handler: Any, info: ValidationInfo) -> list[OverrideRule]:
        # Each rule is checked against the optimizer even when another rule is malformed, so
        # one run reports every problem.
        errors: list = []
        try:
            rules = handler(value)
        except ValidationError as e:
            rules = None
            errors.extend((err["loc"], err["type"], err["msg"], err.get("input")) for err in e.errors(include_url=False))
            valid = {}
            for index, raw in enumerate(value if isinstance(value, list) else []):
                try:
                    valid[index] = OverrideRule.model_validate(raw)
                except ValidationError:
                    continue
        else:
            valid = dict(enumerate(rules))
        opt: OptimizerArgs | None = info.data.get("optimizer")
        for index, rule in valid.items():
            if opt is None:  # the optimizer section has errors: check what needs no optimizer
                errors.extend(_generic_rule_errors(index, rule))
            else:
                errors.extend(_rule_errors(index, rule, opt, info.data.get("paging")))
        if errors:
            errors.sort(key=lambda err: err[0][0] if err[0] and isinstance(err[0][0], int) else -1)
            raise_located("overrides", errors)
        return rules

    def effective_paging(self) -> PagingConfig | None:
        """The optimizer's own paging: the ``paging`` section, PagingConfig's defaults for a
        paged class without one, or ``None`` (not paged)."""
        if self.paging is not None:
            return self.paging
        kwargs = self.optimizer.given()
        sig = optimizers.constructor_arguments(self.optimizer.optimizer_class)
        paged = kwargs.get("is_paged", sig["is_paged"].default)
        return PagingConfig() if paged else None

    def rule_base_arguments(self) -> dict[str, Any]:
        """Constructor arguments of the *algorithm* class (``AdamW`` for ``PagedAdamW8bit``)
        equal to the optimizer section: what rules' settings are applied over."""
        return base_arguments(self.optimizer)


def base_arguments(opt: OptimizerArgs) -> dict[str, Any]:
    kwargs = {k: v for k, v in opt.given().items() if k not in optimizers.OPTIMIZER_ONLY}
    pinned = optimizers.constructor_arguments(opt.optimizer_class)["optim_bits"].default
    kwargs.setdefault("optim_bits", pinned)
    return kwargs


def _rule_errors(index: int, rule: OverrideRule, opt: OptimizerArgs, paging: PagingConfig | None) -> list:
    errors = []
    where = (index, "set")
    allowed = optimizers.setting_names(opt.name)
    given = rule.set.given()
    unknown = [k for k in given if k not in allowed]
    for key in unknown:
        hint = unknown_key_message(key, allowed).replace(f"unknown key {key!r}", "")
        errors.append(((*where, key), "unknown_setting",
                       f"{opt.name} has no setting {key!r}{hint}", given[key]))
    if unknown:
        return errors
    values = {k: v for k, v in given.items() if k != "paging"}
    if values:
        algorithm_class = getattr(optimizers.optim, optimizers.algorithm_of(opt.name))
        kwargs = {**base_arguments(opt), **values}
        for key, msg in optimizers.probe_errors(algorithm_class, kwargs, list(values)):
            loc = (*where, key) if key else where
            errors.append((loc, "optimizer_argument", msg, values.get(key) if key else values))
    if "paging" in given:
        try:
            merge_paging(paging, given["paging"])
        except ValidationError as e:
            for err in e.errors(include_url=False):
                msg = err["msg"].removeprefix("Value error, ")
                errors.append(((*where, "paging", *err["loc"]), "paging", msg, err.get("input")))
    return errors


def _generic_rule_errors(index: int, rule: OverrideRule) -> list:
    """Value checks that hold for every optimizer (``lr >= 0``, ``optim_bits`` 8 or 32, ...)."""
    values = {k: v for k, v in rule.set.given().items() if k != "paging"}
    try:
        validation.check_hyperparameters({k: v for k, v in values.items() if k != "betas"})
    except ValueError as e:
        message = str(e)
        key = next((k for k in values if f"Invalid {k}:" in message), None)
        loc = (index, "set", key) if key else (index, "set")
        return [(loc, "optimizer_argument", message, values.get(key) if key else values)]
    return []
