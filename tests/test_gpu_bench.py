"""The GPU benchmark's CPU-independent parts: counted bytes, the memory plan, targets, the
results JSON and the table, and a --dry-run of the whole script (synthetic timings)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_bench  # noqa: E402
from gpu_bench_report import (  # noqa: E402
    CURVE_TENSORS, EIGHT_BIT, GIB, Report, Result, counted_bytes, curve_fits, format_table, plan_flat_params,
    report_from_json,
)


def test_counted_bytes_per_parameter():
    assert counted_bytes(2, 8) == pytest.approx(4 + 4 + 4 + 2 * 2 + 2 * 8 / 256)  # AdamW8bit: ~16.06 B
    assert counted_bytes(3, 8) == pytest.approx(12 + 3 * (2 + 8 / 256))  # AdEMAMix8bit
    assert counted_bytes(2, 32) == 28  # fp32 AdamW


def test_flat_plan_never_exceeds_free_memory():
    n, note = plan_flat_params(10**9, free_bytes=140 * GIB, state_values=2, bits=32)
    assert n == 10**9 // 256 * 256 or n == 10**9 and note == ""
    n, note = plan_flat_params(10**9, free_bytes=10 * GIB, state_values=2, bits=32)
    assert n % 256 == 0 and n * (8 + 8 + 0.5) <= 0.8 * 10 * GIB and "scaled the 1B workload down" in note
    assert plan_flat_params(10**9, free_bytes=0, state_values=3)[0] == 0
    assert curve_fits(140 * GIB) == list(CURVE_TENSORS)
    assert curve_fits(int(0.5 * GIB)) == [10, 100, 1000]


def _report(rows):
    report = Report(device="test", torch_version="x", copy_gbps=4000.0, free_gib=100.0)
    for row, bytes_per_param in rows:
        report.add(row, bytes_per_param)
    report.compare_to_fused()
    report.evaluate_targets()
    return report


def test_targets_are_decided_from_the_rows():
    n = 10**9
    rows = [
        (Result("1B", "1B flat", "AdamW8bit", "fast", n, 1, ms_per_step=4.5), counted_bytes(2, 8)),  # 89%
        (Result("1B", "1B flat", "Lion8bit", "fast", n, 1, ms_per_step=5.0), counted_bytes(1, 8)),  # 71%
        (Result("1B", "1B flat", "AdamW8bit", "strict", n, 1, ms_per_step=8.0), counted_bytes(2, 8)),
        (Result("1B", "1B flat", "torch AdamW fused", "-", n, 1, ms_per_step=8.0), counted_bytes(2, 32)),
    ]
    for count, mine, fused in ((10, 0.2, 0.1), (10_000, 50.0, 78.0)):
        rows.append((Result("curve", f"{count}", "AdamW8bit", "default", count * 4096, count, False, ms_per_step=mine,
                            host_ms_per_step=mine), None))
        rows.append((Result("curve", f"{count}", "torch AdamW fused", "-", count * 4096, count, ms_per_step=fused), None))
    report = _report(rows)
    adamw = report.results[0]
    assert adamw.copy_fraction == pytest.approx(counted_bytes(2, 8) * n / 4.5e-3 / 1e9 / 4000)
    assert adamw.vs_torch_fused == pytest.approx(8.0 / 4.5)
    assert report.targets["adamw8bit_fast_at_85pct_of_copy_bandwidth"] is True
    assert report.targets["other_8bit_fast_at_80pct_of_copy_bandwidth"] is False  # Lion at 71%
    assert report.targets["gpt2_small_at_least_torch_fused"] is None  # not measured
    assert report.targets["curve_at_or_below_torch_fused"] is False  # 0.2 ms > 0.1 ms at 10 tensors
    assert report.targets["curve_host_time_flat_within_2x"] is False  # 0.2 -> 50 ms


def test_json_round_trip_and_table():
    report = _report([
        (Result("gpt2-small", "gpt2-small", "AdamW8bit", "fast", 124_000_000, 148, True, ms_per_step=1.0,
                host_ms_per_step=0.05), counted_bytes(2, 8)),
        (Result("gpt2-small", "gpt2-small", "AdamW8bit", "strict", 124_000_000, 148, False, note="no option"), None),
    ])
    again = report_from_json(report.to_json())
    assert again == report
    table = format_table(again)
    assert "gpt2-small" in table and "failed: no option" in table and " on " in table
    assert "target gpt2_small_at_least_torch_fused: not measured" in table


def test_dry_run_writes_every_configuration(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert gpu_bench.main(["--dry-run", "--out", str(out), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    flat = [r for r in data["results"] if r["section"] == "1B"]
    assert {(r["optimizer"], r["numerics"]) for r in flat} >= {(name, m) for name, _, _ in EIGHT_BIT for m in ("fast", "strict")}
    fast = [r for r in flat if r["numerics"] == "fast" and r["optimizer"] in {n for n, _, _ in EIGHT_BIT}]
    assert all(r["ms_per_step"] and r["copy_fraction"] for r in fast)  # the default runs the fast kernels
    assert {r["tensors"] for r in data["results"] if r["section"] == "curve"} == set(CURVE_TENSORS)
    assert any(r["optimizer"] == "torch AdamW fused" for r in data["results"] if r["section"] == "gpt2-small")
    assert "dry run: synthetic timings, targets not evaluated" in data["notes"]
    assert printed.startswith("device: dry run")


def test_without_a_gpu_the_real_run_refuses(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu_bench.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err
