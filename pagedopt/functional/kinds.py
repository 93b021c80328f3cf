"""The update kinds: which per-element algorithm an optimizer runs and what state it keeps.

Nine public optimizers reduce to six per-element algorithms; the rest is configuration:

=========  ==========  =====================================================
optimizer  algorithm   what differs
=========  ==========  =====================================================
Adam       ADAM        L2 weight decay added to the gradient (as torch.optim.Adam)
AdamW      ADAM        decoupled weight decay ``p *= 1 - lr * wd``
LAMB       ADAM        decoupled weight decay + trust ratio (``max_unorm``)
AdEMAMix   ADEMAMIX    second, slow first moment; decoupled weight decay
SGD        MOMENTUM    heavy-ball momentum (dampening, Nesterov)
LARS       MOMENTUM    + trust ratio (``max_unorm``)
Lion       LION        sign update; decoupled weight decay
RMSprop    RMSPROP     L2 weight decay
Adagrad    ADAGRAD     L2 weight decay, ``lr_decay``
=========  ==========  =====================================================

The integer values of :class:`Algorithm` are part of the native ABI (``native/include``).

Example:
    >>> from pagedopt.functional.kinds import kind_for
    >>> k = kind_for("lamb")
    >>> k.algorithm.name, k.num_states, k.decoupled_weight_decay
    ('ADAM', 2, True)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Algorithm(enum.IntEnum):
    """Per-element update algorithms (values shared with the native kernels)."""

    ADAM = 0
    ADEMAMIX = 1
    MOMENTUM = 2
    LION = 3
    RMSPROP = 4
    ADAGRAD = 5


@dataclass(frozen=True)
class UpdateKind:
    """What an ``optimizer_name`` means: algorithm, state layout and weight-decay style.

    ``state_signed[i]`` says whether state ``i`` uses the signed map (first moments) or the
    unsigned map (second moments / accumulators). ``state1_moments`` is 2 for AdEMAMix,
    whose ``state1`` holds the fast and the slow EMA as shape ``(2, *param.shape)``.
    """

    name: str
    algorithm: Algorithm
    num_states: int
    state_signed: tuple[bool, ...]
    decoupled_weight_decay: bool
    state1_moments: int = 1
    uses_eps: bool = True


_KINDS: dict[str, UpdateKind] = {
    k.name: k
    for k in (
        UpdateKind("adam", Algorithm.ADAM, 2, (True, False), decoupled_weight_decay=False),
        UpdateKind("adamw", Algorithm.ADAM, 2, (True, False), decoupled_weight_decay=True),
        UpdateKind("lamb", Algorithm.ADAM, 2, (True, False), decoupled_weight_decay=True),
        UpdateKind(
            "ademamix", Algorithm.ADEMAMIX, 2, (True, False), decoupled_weight_decay=True,
            state1_moments=2,
        ),
        UpdateKind("momentum", Algorithm.MOMENTUM, 1, (True,), False, uses_eps=False),
        UpdateKind("lars", Algorithm.MOMENTUM, 1, (True,), False, uses_eps=False),
        UpdateKind("lion", Algorithm.LION, 1, (True,), True, uses_eps=False),
        UpdateKind("rmsprop", Algorithm.RMSPROP, 1, (False,), False),
        UpdateKind("adagrad", Algorithm.ADAGRAD, 1, (False,), False),
    )
}

TWO_STATE_NAMES = tuple(n for n, k in _KINDS.items() if k.num_states == 2)
ONE_STATE_NAMES = tuple(n for n, k in _KINDS.items() if k.num_states == 1)


def kind_for(optimizer_name: str) -> UpdateKind:
    """The :class:`UpdateKind` for a bitsandbytes-style ``optimizer_name`` (case-insensitive)."""
    key = str(optimizer_name).lower()
    if key not in _KINDS:
        raise ValueError(
            f"optimizer_name={optimizer_name!r} is not a known update kind; "
            f"expected one of {sorted(_KINDS)}"
        )
    return _KINDS[key]
