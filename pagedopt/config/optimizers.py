"""The ``optimizer`` section and the settings of ``overrides`` rules, derived from the optimizer
classes themselves.

One pydantic model per algorithm (Adam, AdamW, ..., LARS) lists that algorithm's constructor
arguments with their types and defaults, taken from the class signature; its ``name`` is any
of the algorithm's six classes (``AdamW``, ``AdamW8bit``, ``PagedAdamW32bit``, ...). Types are
checked strictly (``lr: "1e-3"`` or ``block_wise: 1`` are errors, not coerced); values are
checked by constructing the optimizer class on a one-element dummy parameter, so the
config accepts exactly what the constructor accepts and reports the constructor's own
message (``Invalid lr: -0.001 (must be a finite number >= 0)``).

Example:
    >>> from pagedopt.config.optimizers import args_model
    >>> model = args_model("PagedLion8bit")
    >>> model.__name__, model.model_fields["optim_bits"].default, model.model_fields["is_paged"].default
    ('PagedLion8bitArgs', 8, True)
    >>> model(name="PagedLion8bit", lr=1e-4).given()
    {'lr': 0.0001}
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
import typing
from typing import Annotated, Any, Literal, Mapping, Optional, Union

import torch
from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError,
    create_model, model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .. import optim
from ..optim.validation import parse_betas
from ..paging.store import DeviceStateStore

# Constructor arguments that are not settings: the parameters, bitsandbytes' ``args`` object
# (config files set its six values directly), ``paging`` (its own section) and internals.
NOT_SETTINGS = frozenset({"self", "params", "args", "paging", "_extra_defaults"})
# Arguments of the optimizer section that cannot differ per parameter.
OPTIMIZER_ONLY = frozenset({"is_paged"})

# One-line descriptions of the constructor arguments (JSON Schema hover text in editors).
ARGUMENT_DOCS = {
    "lr": "learning rate",
    "betas": "EMA rates: Adam/AdamW/LAMB (beta1, beta2), AdEMAMix (beta1, beta2, beta3), Lion (beta1, beta2)",
    "eps": "added to the denominator",
    "weight_decay": "weight decay (decoupled for AdamW, Lion, AdEMAMix, LAMB; L2 for Adam, SGD, RMSprop, Adagrad)",
    "amsgrad": "accepted for compatibility; must be false",
    "optim_bits": "8 or 32 bits of optimizer state (pinned by the 8bit/32bit classes; rules may still set it)",
    "min_8bit_size": "parameters with fewer elements keep 32-bit state",
    "percentile_clipping": "clip gradients at this percentile of the last 100 gradient norms (100: off)",
    "block_wise": "one absmax per 256 elements (false: one per tensor)",
    "max_unorm": "trust-ratio bound ||update|| <= max_unorm * ||param|| (0: off)",
    "skip_zeros": "leave elements whose gradient is exactly 0 unchanged",
    "is_paged": "page the optimizer state (a paging section implies it)",
    "alpha": "AdEMAMix: weight of the slow EMA; RMSprop: smoothing constant",
    "t_alpha": "AdEMAMix: warm-up steps of alpha (null: none)",
    "t_beta3": "AdEMAMix: warm-up steps of beta3 (null: none)",
    "momentum": "momentum factor (must be > 0 for SGD/LARS; RMSprop: must be 0)",
    "dampening": "dampening of the momentum",
    "nesterov": "Nesterov momentum",
    "centered": "accepted for compatibility; must be false",
    "lr_decay": "Adagrad: learning-rate decay",
    "initial_accumulator_value": "Adagrad: initial value of the accumulator",
    "bias_correction": "LAMB: Adam's bias correction",
    "adam_w_mode": "LAMB: decoupled weight decay (false: L2)",
}

# Where each optimizer keeps an argument that it packs into ``betas`` (bitsandbytes' layout),
# so that an error about ``betas[i]`` names the argument the user wrote.
_BETA_ARGUMENTS = {"SGD": ("momentum", "dampening"), "LARS": ("momentum", "dampening"), "RMSprop": ("alpha",)}


def _betas_before(value: Any) -> Any:
    # bitsandbytes accepts betas written as a string, "(0.9, 0.999)"; lists pass through.
    if isinstance(value, str):
        try:
            return parse_betas(value)
        except ValueError as e:
            raise PydanticCustomError("betas", str(e)) from None
    return value


def _strict_type(hint: Any) -> Any:
    """The strict pydantic type for a constructor annotation (float/int/bool/tuple/Optional)."""
    origin = typing.get_origin(hint)
    if hint is float:
        return StrictFloat
    if hint is bool:
        return StrictBool
    if hint is int:
        return StrictInt
    if origin is tuple:
        inner = tuple(_strict_type(a) for a in typing.get_args(hint))
        return Annotated[tuple[inner], BeforeValidator(_betas_before)]  # type: ignore[valid-type]
    if origin is Union or type(hint).__name__ == "UnionType":
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return Optional[_strict_type(args[0])]
    raise TypeError(f"unsupported optimizer argument annotation {hint!r}")


def algorithm_of(name: str) -> str:
    """``"PagedAdamW8bit"`` -> ``"AdamW"`` (the algorithm class the variant pins)."""
    for algorithm in sorted(optim.ALGORITHMS, key=len, reverse=True):
        if name in (fmt.format(algorithm) for fmt in optim.VARIANT_FORMATS):
            return algorithm
    raise KeyError(name)


def suggest_names(name: Any) -> list[str]:
    """Close matches for a misspelled optimizer name (case-insensitive)."""
    lowered = {n.lower(): n for n in optim.OPTIMIZER_NAMES}
    text = str(name).lower().rsplit(".", 1)[-1]  # "bnb.optim.AdamW8bit" -> "adamw8bit"
    if text in lowered:
        return [lowered[text]]
    return [lowered[m] for m in difflib.get_close_matches(text, list(lowered), n=3, cutoff=0.6)]


def constructor_arguments(cls: type) -> dict[str, inspect.Parameter]:
    """Setting-like constructor arguments of optimizer class ``cls`` (variants included)."""
    return dict(_constructor_arguments(cls))


@functools.lru_cache(maxsize=None)
def _constructor_arguments(cls: type) -> tuple[tuple[str, inspect.Parameter], ...]:
    # inspect.signature costs ~0.5 ms; a config with thousands of rules asks once per rule.
    signature = inspect.signature(cls)
    # a variant's pinned value, not bitsandbytes' placeholder default (Adam8bit's optim_bits=32)
    pinned = getattr(cls, "pinned_arguments", {})
    return tuple((n, p.replace(default=pinned.get(n, p.default))) for n, p in signature.parameters.items()
                 if n not in NOT_SETTINGS and p.kind is not p.VAR_KEYWORD)


def setting_names(name: str) -> list[str]:
    """What an ``overrides`` rule may set for optimizer ``name`` (plus ``paging``)."""
    args = constructor_arguments(getattr(optim, algorithm_of(name)))
    return sorted([n for n in args if n not in OPTIMIZER_ONLY] + ["paging"])


# -- probing: the constructor validates the values ---------------------------------------------


@functools.lru_cache(maxsize=None)
def _probe_class(cls: type) -> type:
    # Same validation as ``cls``, but an unpaged state store: checking a config allocates no
    # paged memory and starts no pager.
    return type(cls.__name__, (cls,), {
        "_make_state_store": lambda self: DeviceStateStore(),
        "__module__": cls.__module__, "__qualname__": cls.__qualname__,
    })


def probe(cls: type, kwargs: Mapping[str, Any]) -> optim.Optimizer8bit:
    """``cls`` built on a one-element dummy parameter: raises what the constructor raises."""
    return _probe_class(cls)([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def _key_in_message(message: str, keys: list[str], algorithm: str) -> str | None:
    for key in sorted(keys, key=len, reverse=True):
        if re.search(rf"\b{re.escape(key)}\b", message):
            return key
    m = re.search(r"beta parameter at index (\d+)|Invalid betas", message)
    if m:
        packed = _BETA_ARGUMENTS.get(algorithm)
        if packed is None:
            return "betas" if "betas" in keys else None
        index = int(m.group(1) or 0)
        if index < len(packed) and packed[index] in keys:
            return packed[index]
    return None


def probe_errors(cls: type, kwargs: Mapping[str, Any], blame: list[str]) -> list[tuple[str | None, str]]:
    """``[(key, message)]`` for what ``cls(**kwargs)`` rejects; ``key`` is the argument (among
    ``blame``) that the message names, or ``None``. Memoized on the arguments' repr: a config
    with thousands of rules usually repeats a few settings, and building a probe optimizer
    costs milliseconds."""
    key = (cls, repr(sorted(kwargs.items(), key=lambda kv: kv[0])), tuple(blame))
    found = _PROBE_CACHE.get(key)
    if found is None:
        found = _probe_errors(cls, kwargs, blame)
        if len(_PROBE_CACHE) >= _PROBE_CACHE_SIZE:
            _PROBE_CACHE.pop(next(iter(_PROBE_CACHE)))
        _PROBE_CACHE[key] = found
    return list(found)


_PROBE_CACHE: dict[tuple[Any, ...], list[tuple[str | None, str]]] = {}
_PROBE_CACHE_SIZE = 4096


def _probe_errors(cls: type, kwargs: Mapping[str, Any], blame: list[str]) -> list[tuple[str | None, str]]:
    try:
        probe(cls, kwargs)
    except (ValueError, TypeError, ArithmeticError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        return [(_key_in_message(message, blame, algorithm_of(cls.__name__)), message)]
    return []


def raise_located(title: str, errors: list[tuple[tuple[Any, ...], str, str, Any]]) -> None:
    """Raise one ValidationError with ``(loc, error_type, message, input)`` line errors."""
    raise ValidationError.from_exception_data(
        title,
        [InitErrorDetails(type=PydanticCustomError(kind, "{message}", {"message": msg}), loc=loc, input=value)
         for loc, kind, msg, value in errors],
    )


# -- the per-algorithm argument models --------------------------------------------------------


class OptimizerArgs(BaseModel):
    """Base of the ``optimizer`` section models: ``name`` plus the constructor arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str

    def given(self) -> dict[str, Any]:
        """The arguments the config sets (the constructor's defaults fill in the rest)."""
        return {k: getattr(self, k) for k in type(self).model_fields if k != "name" and k in self.model_fields_set}

    @property
    def optimizer_class(self) -> type:
        return optim.get_optimizer_class(self.name)

    @model_validator(mode="after")
    def _constructor_accepts(self) -> "OptimizerArgs":
        given = self.given()
        errors = probe_errors(self.optimizer_class, given, [k for k in type(self).model_fields if k != "name"])
        if errors:
            raise_located(type(self).__name__, [
                ((key,) if key else (), "optimizer_argument", msg, getattr(self, key) if key else self.name)
                for key, msg in errors
            ])
        return self


@functools.lru_cache(maxsize=None)
def args_model(name: str) -> type[OptimizerArgs]:
    """The ``optimizer`` section model of optimizer class ``name``: its constructor arguments
    with the class's own defaults (``optim_bits`` is 8 for ``AdamW8bit``), so a dumped config
    loads back unchanged."""
    cls = optim.get_optimizer_class(name)
    algorithm = algorithm_of(name)
    hints = typing.get_type_hints(getattr(optim, algorithm).__init__)
    fields: dict[str, Any] = {"name": (Literal[name], ...)}
    for arg, parameter in constructor_arguments(cls).items():
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[arg] = (_strict_type(hints[arg]), Field(default=default, description=ARGUMENT_DOCS.get(arg)))
    doc = f"pagedopt.{name} and its constructor arguments"
    return create_model(f"{name}Args", __base__=OptimizerArgs, __doc__=doc, **fields)


def all_args_models() -> list[type[OptimizerArgs]]:
    return [args_model(n) for n in optim.OPTIMIZER_NAMES]


def _check_optimizer_name(value: Any) -> Any:
    if isinstance(value, str):
        value = {"name": value}  # shorthand: ``optimizer: AdamW8bit``
    if isinstance(value, Mapping) and "name" in value:
        name = value["name"]
        if not isinstance(name, str) or name not in optim.OPTIMIZER_NAMES:
            close = suggest_names(name)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            message = (
                f"unknown optimizer name {name!r}; {hint}(one of the {len(optim.OPTIMIZER_NAMES)} pagedopt "
                "optimizers, e.g. AdamW8bit, PagedAdamW8bit, Lion8bit, SGD8bit; see `pagedopt config schema`)"
            )
            raise PydanticCustomError("unknown_optimizer", "{message}", {"message": message})
    return value


def optimizer_section_type() -> Any:
    """The ``optimizer`` field's type: a union of the algorithm models, chosen by ``name``."""
    return Annotated[
        Union[tuple(all_args_models())],  # type: ignore[misc]
        Field(discriminator="name"),
        BeforeValidator(_check_optimizer_name),
    ]


# -- settings of ``overrides`` rules -----------------------------------------------------------


def settings_fields() -> dict[str, Any]:
    """Every per-parameter setting of some optimizer, with its strict type (betas of any
    length; which settings a given optimizer has is checked against its name)."""
    fields: dict[str, Any] = {}
    for algorithm in optim.ALGORITHMS:
        cls = getattr(optim, algorithm)
        hints = typing.get_type_hints(cls.__init__)
        for arg in constructor_arguments(cls):
            if arg in OPTIMIZER_ONLY or arg in fields:
                continue
            if arg == "betas":  # any length here; the optimizer checks its own
                kind = Annotated[tuple[StrictFloat, ...], BeforeValidator(_betas_before)]
            else:
                kind = _strict_type(hints[arg])
            fields[arg] = (kind, Field(default=None, description=ARGUMENT_DOCS.get(arg)))
    return fields
