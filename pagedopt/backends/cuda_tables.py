"""Quantization tables for the CUDA kernels: maps, thresholds and the code-search lookup table.

The kernels find a value's code (``#{thresholds < x}``, see
:func:`pagedopt.functional.qmap.decision_thresholds`) without a binary search: a lookup
table indexed by the sign, exponent and top :data:`LUT_MANTISSA_BITS` mantissa bits of ``x``
gives ``lo = count_below(smallest x in that bucket)``; the answer lies at most
:data:`SPAN_SIGNED` / :data:`SPAN_UNSIGNED` codes above, and that many unrolled steps of
``code += thresholds[code] < x`` reach it (``native/cuda/qsearch.cuh``). This module builds
the table, proves the span bound for both maps when it builds it, and mirrors the kernel's
search in numpy so CI checks the algorithm without a GPU.

Buckets by the bits ``a`` of ``|x|``: 0 is ``[0, 2**-LUT_LOW_EXPONENT)``, 1..n-2 one
(exponent, top mantissa bits) cell each, n-1 is ``[1, inf]``; negative values use a second
row. NaN gets ``count_below``'s answer 255 (``torch.searchsorted`` sorts NaN last); values above
1 (a normalized value may exceed 1, see :mod:`pagedopt.functional.quantization`) fall into
the last bucket and get the top code.

Example:
    >>> import numpy as np
    >>> from pagedopt.backends.cuda_tables import build_tables, lut_count_below, count_below
    >>> t = build_tables()
    >>> x = np.array([0.0, -0.5, 0.3, 1.0], dtype=np.float32)
    >>> bool((lut_count_below(t, 0, x) == count_below(t.thresholds[0], x)).all())
    True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..functional.qmap import decision_thresholds, dynamic_map

LUT_MANTISSA_BITS = 6
LUT_LOW_EXPONENT = 24  # bucket 0 holds |x| < 2**-24; every threshold is larger (>= 1.6e-7)
LUT_BUCKETS = LUT_LOW_EXPONENT * (1 << LUT_MANTISSA_BITS) + 2
LUT_STRIDE = (LUT_BUCKETS + 15) // 16 * 16  # bytes per sign row (16-byte multiple)
SPAN_SIGNED = 1
SPAN_UNSIGNED = 2
_SHIFT = 23 - LUT_MANTISSA_BITS
_FIRST_KEY = (127 - LUT_LOW_EXPONENT) << LUT_MANTISSA_BITS
_LAST_KEY = 127 << LUT_MANTISSA_BITS  # bucket of 1.0
MAPS = ((0, True), (1, False))  # (map index in the device tables, signed)


@dataclass(frozen=True)
class QuantTables:
    """Host copies of what the kernels load into shared memory.

    ``maps``: float32 ``[2 maps][2 = (qmap, thresholds + inf sentinel)][256]``;
    ``luts``: uint8 ``[2 maps][2 signs][LUT_STRIDE]``; ``thresholds[m]``: the 255
    thresholds of map ``m`` (0 signed, 1 unsigned); ``spans[m]``: the largest
    ``hi - lo`` over all buckets of map ``m``.
    """

    maps: np.ndarray
    luts: np.ndarray
    thresholds: tuple[np.ndarray, np.ndarray]
    spans: tuple[int, int]


def count_below(thresholds: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``quant.h``'s ``count_below``: ``#{t < x}``, and 255 for NaN (like ``torch.searchsorted``)."""
    x = np.asarray(x, dtype=np.float32)
    codes = np.searchsorted(thresholds, x, side="left").astype(np.int64)
    return np.where(np.isnan(x), 255, codes)


def _bits_to_float(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def _bucket_bounds() -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest ``|x|`` bit pattern of every bucket (NaN excluded)."""
    idx = np.arange(LUT_BUCKETS, dtype=np.int64)
    low = (idx - 1 + _FIRST_KEY) << _SHIFT
    high = ((idx + _FIRST_KEY) << _SHIFT) - 1
    low[0], high[0] = 0, (_FIRST_KEY << _SHIFT) - 1
    low[-1], high[-1] = _LAST_KEY << _SHIFT, 0x7F800000  # [1.0, +inf]
    return low.astype(np.uint32), high.astype(np.uint32)


@functools.lru_cache(maxsize=1)
def build_tables() -> QuantTables:
    """Build (once per process) and check the tables; raises if a span bound fails."""
    maps = np.zeros((2, 2, 256), dtype=np.float32)
    luts = np.zeros((2, 2, LUT_STRIDE), dtype=np.uint8)
    low_bits, high_bits = _bucket_bounds()
    low, high = _bits_to_float(low_bits), _bits_to_float(high_bits)
    thresholds, spans = [], []
    for m, signed in MAPS:
        t = decision_thresholds(signed).numpy().astype(np.float32)
        maps[m, 0] = dynamic_map(signed).numpy()
        maps[m, 1, :255] = t
        maps[m, 1, 255] = np.inf
        pos_lo, pos_hi = count_below(t, low), count_below(t, high)
        neg_lo, neg_hi = count_below(t, -high), count_below(t, -low)
        luts[m, 0, :LUT_BUCKETS] = pos_lo
        luts[m, 1, :LUT_BUCKETS] = neg_lo
        span = int(max((pos_hi - pos_lo).max(), (neg_hi - neg_lo).max()))
        bound = SPAN_SIGNED if signed else SPAN_UNSIGNED
        if span > bound:
            raise AssertionError(
                f"code-search table: a bucket of the {'signed' if signed else 'unsigned'} map spans "
                f"{span} codes > {bound}; raise LUT_MANTISSA_BITS or the span constant"
            )
        thresholds.append(t)
        spans.append(span)
    return QuantTables(maps, luts, (thresholds[0], thresholds[1]), (spans[0], spans[1]))


def lut_count_below(tables: QuantTables, map_index: int, x: np.ndarray) -> np.ndarray:
    """numpy mirror of ``fast_count_below`` in ``native/cuda/qsearch.cuh`` (same steps)."""
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.int64)
    key = ((bits & 0x7FFFFFFF) >> _SHIFT) - _FIRST_KEY + 1
    bucket = np.clip(key, 0, LUT_BUCKETS - 1)
    code = tables.luts[map_index][bits >> 31, bucket].astype(np.int64)
    thr = tables.maps[map_index, 1]
    span = SPAN_SIGNED if map_index == 0 else SPAN_UNSIGNED
    for _ in range(span):
        code += thr[code] < x
    return np.where(np.isnan(x), 255, code)


def prelude_defines() -> dict[str, int]:
    """The table geometry as preprocessor constants for the kernel sources."""
    build_tables()  # the span bounds hold before any kernel is compiled with them
    return {
        "PO_LUT_MANTISSA_BITS": LUT_MANTISSA_BITS,
        "PO_LUT_LOW_EXPONENT": LUT_LOW_EXPONENT,
        "PO_LUT_STRIDE": LUT_STRIDE,
        "PO_LUT_SPAN_SIGNED": SPAN_SIGNED,
        "PO_LUT_SPAN_UNSIGNED": SPAN_UNSIGNED,
    }
