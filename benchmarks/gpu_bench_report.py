"""The GPU benchmark's bookkeeping, without a GPU: what is counted, what fits, the results
JSON and the summary table (benchmarks/gpu_bench.py measures; this module only computes and
formats, so CI tests it on the CPU).

Bandwidth is reported at *counted* bytes: what a perfect single-pass kernel must move per
parameter and step with fp32 parameters and gradients - parameter read and write (8 B),
gradient read (4 B), each 8-bit state value read and written (2 B) plus its absmax per 256
elements (8/256 B), or 8 B per 32-bit state value - against a measured device-to-device
copy (bytes read + written per second).

Example:
    >>> counted_bytes(2, bits=8)
    16.0625
    >>> counted_bytes(2, bits=32)
    28
    >>> plan_flat_params(10**9, free_bytes=8 * 2**30, state_values=3)[0] < 10**9  # 11.6 B/param needed
    True
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 2**30
BLOCK = 256

# The 8-bit optimizers of the 1B sweep: (class name, number of state values, constructor
# arguments). LAMB and LARS also run a prepare pass (trust ratio), counted bytes are still
# those of one pass.
EIGHT_BIT = (
    ("Adam8bit", 2, {}),
    ("AdamW8bit", 2, {}),
    ("Lion8bit", 1, {}),
    ("AdEMAMix8bit", 3, {}),
    ("SGD8bit", 1, {"lr": 1e-3, "momentum": 0.9}),
    ("RMSprop8bit", 1, {}),
    ("Adagrad8bit", 1, {}),
    ("LAMB8bit", 2, {}),
    ("LARS8bit", 1, {"lr": 1e-3, "momentum": 0.9}),
)
CURVE_TENSORS = (10, 100, 1_000, 10_000)
CURVE_NUMEL = 4096
TARGET_ADAMW8BIT = 0.85  # of copy bandwidth (issue 13)
TARGET_OTHER_8BIT = 0.80


def counted_bytes(state_values: int, bits: int) -> float:
    """Bytes per parameter a single-pass step must move (fp32 parameters and gradients)."""
    per_value = (1 + 1 + 2 * 4 / BLOCK) if bits == 8 else 8
    return 4 + 4 + 4 + state_values * per_value


def resident_bytes(state_values: int, bits: int) -> float:
    """Bytes per parameter of optimizer state held on the device."""
    return state_values * ((1 + 4 / BLOCK) if bits == 8 else 4)


def plan_flat_params(requested: int, free_bytes: int, state_values: int, bits: int = 8,
                     fraction: float = 0.8) -> tuple[int, str]:
    """Parameters of the flat workload (a multiple of 256) such that parameter, gradient and
    the largest optimizer's state fit in ``fraction`` of the free device memory; the second
    value explains a scale-down ("" when none was needed)."""
    per_param = 8 + resident_bytes(state_values, bits) + 0.5  # + kernel temporaries
    fit = int(free_bytes * fraction / per_param) // BLOCK * BLOCK
    if fit >= requested:
        return requested, ""
    return max(fit, 0), (
        f"scaled the {requested / 1e9:g}B workload down to {fit / 1e9:.3f}B parameters: "
        f"{free_bytes / GIB:.1f} GiB free, {per_param:.1f} B/param needed"
    )


def curve_fits(free_bytes: int, fraction: float = 0.8) -> list[int]:
    """The tensor counts of the host-time curve whose largest run (fp32 AdamW: 16 B/param
    of state + parameter + gradient) fits in ``fraction`` of free memory."""
    return [n for n in CURVE_TENSORS if n * CURVE_NUMEL * 24 <= free_bytes * fraction]


@dataclass
class Result:
    """One timed configuration."""

    section: str  # "1B", "gpt2-small" or "curve"
    workload: str
    optimizer: str
    numerics: str  # "fast" | "strict" | "-" (not a pagedopt kernel)
    params: int
    tensors: int
    cuda_graph: bool | None = None
    ms_per_step: float | None = None
    host_ms_per_step: float | None = None
    counted_gbps: float | None = None
    copy_fraction: float | None = None
    vs_torch_fused: float | None = None
    note: str = ""


@dataclass
class Report:
    device: str
    torch_version: str
    copy_gbps: float
    free_gib: float
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: dict[str, bool | None] = field(default_factory=dict)
    kernel_stats: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, row: Result, bytes_per_param: float | None) -> Result:
        if row.ms_per_step and bytes_per_param:
            row.counted_gbps = bytes_per_param * row.params / (row.ms_per_step / 1e3) / 1e9
            row.copy_fraction = row.counted_gbps / self.copy_gbps if self.copy_gbps else None
        self.results.append(row)
        return row

    def compare_to_fused(self) -> None:
        """vs_torch_fused = torch fused ms / this ms, within each (section, workload)."""
        fused = {(r.section, r.workload): r.ms_per_step for r in self.results
                 if r.optimizer == "torch AdamW fused" and r.ms_per_step}
        for r in self.results:
            ref = fused.get((r.section, r.workload))
            if ref and r.ms_per_step:
                r.vs_torch_fused = ref / r.ms_per_step

    def evaluate_targets(self) -> None:
        """The issue-13 targets that these results can decide (None: not measured)."""
        flat = [r for r in self.results if r.section == "1B" and r.numerics == "fast" and r.copy_fraction]
        adamw = [r for r in flat if r.optimizer == "AdamW8bit"]
        others = [r for r in flat if r.optimizer != "AdamW8bit"]
        self.targets["adamw8bit_fast_at_85pct_of_copy_bandwidth"] = (
            adamw[0].copy_fraction >= TARGET_ADAMW8BIT if adamw else None)
        self.targets["other_8bit_fast_at_80pct_of_copy_bandwidth"] = (
            all(r.copy_fraction >= TARGET_OTHER_8BIT for r in others) if others else None)
        gpt2 = {r.optimizer: r.ms_per_step for r in self.results if r.section == "gpt2-small" and r.ms_per_step
                and r.numerics in ("fast", "-") and not r.cuda_graph}
        self.targets["gpt2_small_at_least_torch_fused"] = (
            gpt2["AdamW8bit"] <= gpt2["torch AdamW fused"] if {"AdamW8bit", "torch AdamW fused"} <= gpt2.keys() else None)
        curve = [r for r in self.results if r.section == "curve" and r.ms_per_step and not r.cuda_graph]
        mine = {r.tensors: r for r in curve if r.optimizer == "AdamW8bit"}
        torch_ = {r.tensors: r for r in curve if r.optimizer == "torch AdamW fused"}
        both = sorted(mine.keys() & torch_.keys())
        self.targets["curve_at_or_below_torch_fused"] = (
            all(mine[n].ms_per_step <= torch_[n].ms_per_step for n in both) if both else None)
        hosts = [mine[n].host_ms_per_step for n in sorted(mine) if mine[n].host_ms_per_step]
        self.targets["curve_host_time_flat_within_2x"] = (
            max(hosts) <= 2 * min(hosts) if len(hosts) >= 2 and min(hosts) > 0 else None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False)


def report_from_json(text: str) -> Report:
    data: dict[str, Any] = json.loads(text)
    rows = [Result(**r) for r in data.pop("results", [])]
    return Report(**data, results=rows)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(report: Report) -> str:
    """The summary printed at the end of a run (and by scripts/gpu_check.sh)."""
    lines = [
        f"device: {report.device}  torch {report.torch_version}  copy bandwidth {report.copy_gbps:.0f} GB/s "
        f"(read+write)  free {report.free_gib:.1f} GiB  ({report.seconds:.0f} s)",
        f"{'section':10} {'workload':18} {'optimizer':24} {'numerics':8} {'graph':5} {'tensors':>7} "
        f"{'ms/step':>8} {'host ms':>8} {'% copy':>7} {'vs fused':>8}",
    ]
    for r in report.results:
        graph = "-" if r.cuda_graph is None else ("on" if r.cuda_graph else "off")
        head = f"{r.section:10} {r.workload:18} {r.optimizer:24} {r.numerics:8} {graph:5} {r.tensors:7d}"
        if r.ms_per_step is None:
            lines.append(f"{head}  failed: {r.note[:80]}")
            continue
        copy = f"{100 * r.copy_fraction:6.1f}%" if r.copy_fraction is not None else "      -"
        vs = f"{r.vs_torch_fused:.2f}x" if r.vs_torch_fused else "-"
        lines.append(f"{head} {_ms(r.ms_per_step):>8} {_ms(r.host_ms_per_step):>8} {copy} {vs:>8}"
                     + (f"  ({r.note})" if r.note else ""))
    for key, ok in report.targets.items():
        lines.append(f"target {key}: {'not measured' if ok is None else ('met' if ok else 'NOT met')}")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)
