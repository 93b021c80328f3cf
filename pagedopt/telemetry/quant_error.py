"""Sampled quantization error of 8-bit optimizer state (``pagedopt_quant_error_ratio``).

**Definition.** Every ``every`` steps, for a few parameters with 8-bit state and a contiguous
run of a few 256-element blocks of each, the probe computes the exact float32 state that this
step's update produces from the same inputs (old state dequantized, gradient, clip and trust
scales) with the pure-torch reference, *before* the backend runs, and compares it with what
the backend stores (the new 8-bit codes, dequantized with the new absmax) *after* it ran:

    ratio = sqrt( sum (dequantized_new - exact_new)^2 / sum exact_new^2 )

summed over the sampled elements of all sampled parameters of a group, per state
(``state1``: first moment(s), ``state2``: second moment). It is the relative RMS error that
requantization adds to the state in one step: about 1e-2 for healthy dynamic 8-bit blocks,
higher when a block's values span more than the map resolves (outliers in a block). It does
not include drift accumulated over earlier steps (that would need an fp32 shadow copy of the
state, updated every step).

**Cost.** Nothing on the other steps. On a sampling step: for ``params_per_sample`` parameters
(rotating through all 8-bit parameters across samples) a reference update of
``blocks_per_param`` blocks (a few dozen small kernels each) and a few reductions; the
results stay on the device (0-d float64 tensors) and are read by the sink later. Nothing is
written to the parameters or the state: telemetry on and off give bit-identical training.

Example:
    >>> import torch, pagedopt
    >>> from pagedopt.telemetry.quant_error import QuantErrorSampler
    >>> from pagedopt.telemetry.sink import RecordingSink, attach
    >>> w = torch.nn.Parameter(torch.randn(8192))
    >>> opt = pagedopt.AdamW8bit([w])
    >>> sink = attach(opt, RecordingSink(QuantErrorSampler(every=1)))
    >>> w.grad = torch.randn(8192); opt.step()
    >>> [s.state for s in sink.reports[0].quant_errors]
    ['state1', 'state2']
    >>> s = sink.reports[0].quant_errors[0]
    >>> 0 < float((s.error_sq / s.reference_sq).sqrt()) < 0.05
    True
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..functional import reference
from ..functional.items import UpdateItem
from ..functional.quantization import BLOCK_SIZE, dequantize
from .sink import QuantErrorSample


@dataclass
class _Window:
    """The sampled element range of one parameter (per moment of a state)."""

    name: str
    group: int
    param: torch.Tensor
    item: UpdateItem
    lo: int
    hi: int
    signed: tuple[bool, ...]  # per state: signed (first moments) or unsigned map
    exact: list[torch.Tensor]  # per state: float32 [moments, hi - lo], the exact new values


class QuantErrorSampler:
    """Decides which steps, parameters and blocks are sampled; hands out one probe per step.

    Args:
        every: sample every ``every``-th step (steps ``every``, ``2 * every``, ...); 0 disables.
        params_per_sample: parameters measured per sampling step (rotating through all 8-bit
            parameters, so each is measured every ``ceil(n / params_per_sample)`` samples).
        blocks_per_param: contiguous 256-element blocks measured per parameter.
        seed: seed of the block offsets (Python RNG; torch's RNG is never touched).

    Example:
        >>> QuantErrorSampler(every=10).probe(5) is None, QuantErrorSampler(every=10).probe(10) is None
        (True, False)
    """

    def __init__(self, every: int = 50, params_per_sample: int = 16, blocks_per_param: int = 8, seed: int = 0):
        for arg, value, low in (("every", every, 0), ("params_per_sample", params_per_sample, 1),
                                ("blocks_per_param", blocks_per_param, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{arg}={value!r}: must be an integer >= {low}")
        self.every = every
        self.params_per_sample = params_per_sample
        self.blocks_per_param = blocks_per_param
        self.seed = seed
        self._order: dict[torch.Tensor, int] = {}  # 8-bit parameters in first-seen order
        self._samples_taken = 0

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def probe(self, step: int) -> "QuantErrorProbe | None":
        """A probe for ``step`` if it is a sampling step, else ``None``."""
        if not self.due(step):
            return None
        known = len(self._order)
        start = (self._samples_taken * self.params_per_sample) % known if known else 0
        self._samples_taken += 1
        return QuantErrorProbe(self, step, start, known)

    def _rank(self, param: torch.Tensor) -> int:
        rank = self._order.get(param)
        if rank is None:
            rank = self._order[param] = len(self._order)
        return rank


class QuantErrorProbe:
    """Measures one step (see the module docstring); created by :meth:`QuantErrorSampler.probe`."""

    def __init__(self, sampler: QuantErrorSampler, step: int, start: int, known: int):
        self.sampler = sampler
        self.step = step
        self.start = start
        self.known = known
        self.samples: list[QuantErrorSample] = []
        self._pending: list[_Window] = []

    def _selected(self, rank: int) -> bool:
        if self.known == 0:  # first sample: the first parameters seen
            return rank < self.sampler.params_per_sample
        window = min(self.sampler.params_per_sample, self.known)
        return (rank - self.start) % self.known < window

    def before(self, kind: Any, entries: Sequence[tuple[str, int, torch.Tensor]], items: Sequence[UpdateItem]) -> None:
        """Compute the exact new state of the sampled blocks (inputs are still untouched)."""
        for (name, group, param), item in zip(entries, items):
            if not item.quantized or item.numel == 0:
                continue
            rank = self.sampler._rank(param)
            if not self._selected(rank):
                continue
            lo, hi = self._element_range(item.numel, rank)
            exact = _exact_new_states(kind, item, lo, hi)
            self._pending.append(_Window(name, group, param, item, lo, hi, tuple(kind.state_signed), exact))

    def after(self) -> None:
        """Compare the stored states of the sampled blocks with the exact ones."""
        for w in self._pending:
            stored = (w.item.state1, w.item.state2)
            scales = (w.item.absmax1, w.item.absmax2)
            for index, exact in enumerate(w.exact):
                got = _dequantized_range(stored[index], scales[index], exact.shape[0], w.lo, w.hi,
                                         w.item.block_wise, w.signed[index])
                diff = (got.double() - exact.double())
                self.samples.append(
                    QuantErrorSample(
                        name=w.name, group=w.group, state=f"state{index + 1}", elements=exact.numel(),
                        error_sq=diff.square().sum(), reference_sq=exact.double().square().sum(), param=w.param,
                    )
                )
        self._pending.clear()

    def _element_range(self, numel: int, rank: int) -> tuple[int, int]:
        blocks = (numel + BLOCK_SIZE - 1) // BLOCK_SIZE
        take = min(self.sampler.blocks_per_param, blocks)
        rng = random.Random(f"{self.sampler.seed}/{self.step}/{rank}")
        first = rng.randrange(blocks - take + 1)
        return first * BLOCK_SIZE, min((first + take) * BLOCK_SIZE, numel)


def _moments_of(state: torch.Tensor, numel: int) -> int:
    return state.numel() // numel if numel else 1


def _dequantized_range(codes: torch.Tensor, absmax: torch.Tensor, moments: int, lo: int, hi: int,
                       block_wise: bool, signed: bool) -> torch.Tensor:
    """float32 ``[moments, hi - lo]``: the stored state's values in ``[lo, hi)``."""
    per_moment = codes.reshape(moments, -1)[:, lo:hi]
    scales = absmax.reshape(moments, -1)
    if block_wise:
        scales = scales[:, lo // BLOCK_SIZE:(hi + BLOCK_SIZE - 1) // BLOCK_SIZE]
    return torch.stack([dequantize(c, a, signed=signed, block_wise=block_wise) for c, a in zip(per_moment, scales)])


def _exact_new_states(kind: Any, item: UpdateItem, lo: int, hi: int) -> list[torch.Tensor]:
    """Run the reference update on float32 copies of ``[lo, hi)``; the copies' new states."""
    numel = item.numel
    old = []
    for index, (codes, absmax) in enumerate(((item.state1, item.absmax1), (item.state2, item.absmax2))[: kind.num_states]):
        moments = _moments_of(codes, numel)
        values = _dequantized_range(codes, absmax, moments, lo, hi, item.block_wise, kind.state_signed[index])
        old.append(values if moments > 1 else values[0])
    sub = UpdateItem(
        param=item.param.detach().reshape(-1)[lo:hi].clone(),
        grad=item.grad.detach().reshape(-1)[lo:hi],
        state1=old[0],
        state2=old[1] if len(old) > 1 else None,
        absmax1=None,
        absmax2=None,
        scalars=item.scalars,
        block_wise=item.block_wise,
        gnorm_scale=item.gnorm_scale,
        update_scale=item.update_scale,
    )
    reference.update(kind, [sub])
    return [s.reshape(-1, hi - lo) for s in old]
