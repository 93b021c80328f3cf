"""optimizer.memory_report(): rows per parameter and totals equal to the allocated bytes."""

from __future__ import annotations

import pytest
import torch

import pagedopt


def allocated_bytes(opt) -> int:
    """Bytes of every distinct tensor storage reachable from the optimizer state."""
    seen, total = set(), 0
    for state in opt.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("name", ["AdamW", "AdEMAMix", "Lion", "LAMB"])
def test_report_matches_allocation(name):
    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.LayerNorm(200), torch.nn.Linear(200, 10))
    opt = pagedopt.optim.get_optimizer_class(f"{name}8bit")(model.named_parameters(), percentile_clipping=10)
    model(torch.randn(4, 300)).sum().backward()
    opt.step()
    report = opt.memory_report()
    assert report.total_bytes == allocated_bytes(opt)
    names = [r.name for r in report.rows]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    first = report.rows[0]
    assert first.numel == 60000 and first.precision.startswith("8bit") and first.residency == "cpu"
    assert report.rows[1].precision == "32bit"
    table = str(report)
    assert "0.weight" in table and "total" in table


def test_fp32_equivalent_and_saving():
    model = torch.nn.Linear(1000, 1000, bias=False)
    opt = pagedopt.AdamW8bit(model.parameters())
    model(torch.randn(2, 1000)).sum().backward()
    opt.step()
    report = opt.memory_report()
    assert report.fp32_equivalent_bytes == 1000 * 1000 * 2 * 4
    # two 1-byte states + two float32 absmax per 256 elements, about 2.03 bytes/param
    assert report.bytes_by_precision["8bit-blockwise"] == 2 * 1_000_000 + 2 * 4 * 3907
    assert report.total_bytes / report.fp32_equivalent_bytes < 0.26


def test_parameters_without_state_are_not_listed():
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(10))
    opt = pagedopt.Adam([a, b])
    a.grad = torch.randn(10)
    opt.step()
    assert [r.name for r in opt.memory_report().rows] == ["group0.param0"]
