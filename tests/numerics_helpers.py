"""Comparisons shared by the tests that check optimizers against the float64 oracle
(test_numerics.py, test_features.py): states dequantized in the oracle's order, the FP32
tier, and the 8-bit drift measure."""

from __future__ import annotations

import torch

from pagedopt.functional.quantization import dequantize


def float32_states(opt, p, kind_signed) -> list[torch.Tensor]:
    """The optimizer's states in the oracle's order, dequantized to float32."""
    st = opt.state[p]
    out = []
    for index in (1, 2):
        t = st.get(f"state{index}")
        if t is None:
            continue
        moments = t.shape[0] if (t.dim() == p.dim() + 1 and t.numel() == 2 * p.numel()) else 1
        block_wise = st.get(f"absmax{index}") is None or st[f"absmax{index}"].shape[-1] != 1 or t.numel() <= 256 * moments
        for m in range(moments):
            codes = t[m] if moments > 1 else t
            if t.dtype == torch.uint8:
                absmax = st[f"absmax{index}"].reshape(moments, -1)[m]
                out.append(dequantize(codes, absmax, signed=kind_signed[index - 1], block_wise=block_wise))
            else:
                out.append(codes.float())
    return out


def fp32_close(actual: torch.Tensor, expected: torch.Tensor, rtol=1e-5, atol=2e-6) -> None:
    """Tier FP32."""
    diff = (actual.double() - expected.double()).abs()
    bad = diff > atol + rtol * expected.double().abs()
    assert not torch.any(bad), f"{int(bad.sum())} elements outside FP32 tier, worst {diff.max():.3e}"


def quant_drift(actual: torch.Tensor, expected: torch.Tensor, start: torch.Tensor) -> float:
    """Mean |error| relative to the mean distance the oracle moved from ``start``."""
    moved = (expected.double() - start.double()).abs().mean()
    return float((actual.double() - expected.double()).abs().mean() / moved.clamp_min(1e-12))
