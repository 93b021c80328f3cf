"""Dynamic ("dynamic tree") quantization maps of the 8-bit optimizers paper.

Dettmers et al., *8-bit Optimizers via Block-wise Quantization* (ICLR 2022), section 2.2:
each code is a sign, a run of zero bits that sets the decimal exponent, an indicator bit
and a linear fraction. Enumerated, that gives for exponent level ``i = 0..6`` the midpoints
of ``linspace(0.1, 1, k + 1)`` scaled by ``10**(i - 6)``, with ``k = 2**i`` values per sign
for the signed map and ``k = 2**(i + 1)`` for the unsigned map, plus 0 and 1.0.

The values are computed in float32 the same way bitsandbytes does (float32 linspace and
midpoints, float32 scaling), so a bitsandbytes state dict's ``qmap1``/``qmap2`` compare equal
and import without requantization.

Besides the codes, the quantizers need the 255 *decision thresholds* between neighbouring
codes. pagedopt defines "nearest code" through these thresholds (see
:func:`decision_thresholds`); every backend (reference, CPU, CUDA) uses exactly this rule.

Example:
    >>> from pagedopt.functional.qmap import dynamic_map
    >>> q = dynamic_map(signed=True)
    >>> q.shape, float(q[127]), float(q[255])
    (torch.Size([256]), 0.0, 1.0)
"""

from __future__ import annotations

import functools

import torch

NUM_CODES = 256
SIGNED_ZERO_CODE = 127  # index of 0.0 in the signed map
EXPONENT_LEVELS = 7


@functools.lru_cache(maxsize=2)
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    values: list[float] = [0.0, 1.0]
    for level in range(EXPONENT_LEVELS):
        per_sign = 2**level if signed else 2 ** (level + 1)
        edges = torch.linspace(0.1, 1.0, per_sign + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10.0 ** (level - (EXPONENT_LEVELS - 1))) * mids
        values += scaled.tolist()
        if signed:
            values += (-scaled).tolist()
    values.sort()
    qmap = torch.tensor(values, dtype=torch.float32)
    assert qmap.numel() == NUM_CODES, qmap.numel()
    qmap.requires_grad_(False)
    return qmap


def dynamic_map(signed: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """The 256-entry float32 dynamic map, sorted ascending (a fresh tensor on ``device``).

    Signed: 127 negative codes, 0.0 at index 127, 128 positive codes up to 1.0.
    Unsigned: 0.0 at index 0 and 1.0 at index 255.
    """
    qmap = _dynamic_map_cpu(bool(signed))
    return qmap.to(device=device if device is not None else "cpu", copy=True)


@functools.lru_cache(maxsize=2)
def _thresholds_cpu(signed: bool) -> torch.Tensor:
    q = _dynamic_map_cpu(signed).double()
    return ((q[:-1] + q[1:]) * 0.5).float()


def decision_thresholds(signed: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """The 255 float32 thresholds ``t[i] = fp32((q[i] + q[i+1]) / 2)`` (midpoints in float64).

    The code of a normalized value ``x`` is the number of thresholds strictly below ``x``
    (``searchsorted(t, x, right=False)``): round to nearest, exact ties to the lower code.
    A float32 threshold can sit at most half an ulp from the true midpoint, so codes may
    differ from an exact nearest search only for values within an ulp of a midpoint; the
    tests count those as rounding ties.
    """
    t = _thresholds_cpu(bool(signed))
    return t.to(device=device if device is not None else "cpu", copy=True)


def is_canonical_map(qmap: torch.Tensor, signed: bool) -> bool:
    """True when ``qmap`` holds exactly pagedopt's (and bitsandbytes') dynamic map."""
    if qmap.numel() != NUM_CODES:
        return False
    return bool(torch.equal(qmap.detach().float().cpu().flatten(), _dynamic_map_cpu(bool(signed))))
