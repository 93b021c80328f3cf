"""The metric catalogue: every series pagedopt exports, with its type, labels and meaning.

One table drives the exporter, the README's metric list and the tests. Every metric also
carries the labels ``run`` (the training run; ``PAGEDOPT_RUN`` or torchrun's run id) and
``rank`` (the global rank), so series of all ranks of all runs can live in one Prometheus.

Label cardinality is bounded by construction: ``group`` takes one value per parameter group,
``param`` at most ``top_k + 1`` values (``__other__``), ``state``/``precision``/``residency``/
``direction``/``reason`` a handful each.

Example:
    >>> from pagedopt.telemetry.metrics import METRICS, by_name
    >>> by_name("pagedopt_state_bytes").labels
    ('group', 'state', 'precision', 'residency')
    >>> all(m.name.startswith("pagedopt_") for m in METRICS)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

COMMON_LABELS = ("run", "rank")

# Step times range from about a millisecond (small models) to tens of seconds (paged giants).
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A prefetch copies one state buffer: tens of microseconds to a second over PCIe.
PREFETCH_BUCKETS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# NVRTC compiles: ~0.1 s for a small kernel to tens of seconds for a large template set.
COMPILE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric (``name`` is the exposed name, counters include ``_total``).

    Example:
        >>> MetricSpec("pagedopt_steps_total", "counter", "Optimizer steps").labels
        ()
    """

    name: str
    type: str  # "gauge", "counter" or "histogram"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None


METRICS: tuple[MetricSpec, ...] = (
    # identity
    MetricSpec("pagedopt_build_info", "gauge", "pagedopt build (value 1)",
               ("version", "torch_version", "cuda_version", "python_version")),
    MetricSpec("pagedopt_run_info", "gauge", "This process's optimizer and placement (value 1)",
               ("optimizer", "backend", "paging_policy", "world_size", "local_rank")),
    MetricSpec("pagedopt_device_info", "gauge",
               "Rank to device (value 1); gpu and UUID match dcgm-exporter's labels for joins",
               ("local_rank", "device", "gpu", "UUID", "model_name")),
    # memory
    MetricSpec("pagedopt_state_bytes", "gauge", "Optimizer state bytes",
               ("group", "state", "precision", "residency")),
    MetricSpec("pagedopt_param_state_bytes", "gauge",
               "Optimizer state bytes of the top-k parameters by state size (the rest under __other__)",
               ("param", "residency")),
    MetricSpec("pagedopt_device_budget_bytes", "gauge",
               "Device memory the optimizer state may use (paging budget, else device capacity)"),
    MetricSpec("pagedopt_device_headroom_bytes", "gauge",
               "Device memory still available to optimizer state under the budget"),
    MetricSpec("pagedopt_peak_device_state_bytes", "gauge", "Peak optimizer state bytes resident on the device"),
    MetricSpec("pagedopt_device_memory_used_bytes", "gauge",
               "Device memory held by this process (CUDA: torch's reserved memory; CPU: resident set)"),
    MetricSpec("pagedopt_device_memory_total_bytes", "gauge", "Device memory capacity"),
    # paging
    MetricSpec("pagedopt_page_transfers_total", "counter", "State page transfers", ("direction", "reason")),
    MetricSpec("pagedopt_page_transfer_bytes_total", "counter", "State bytes paged", ("direction", "reason")),
    MetricSpec("pagedopt_prefetch_latency_seconds", "histogram", "Time from prefetch issue to state ready",
               buckets=PREFETCH_BUCKETS),
    MetricSpec("pagedopt_prefetch_stall_seconds_total", "counter",
               "Time steps waited for state that was not resident yet"),
    MetricSpec("pagedopt_oom_avoidance_actions_total", "counter",
               "Actions the pager took to avoid running out of device memory", ("action",)),
    MetricSpec("pagedopt_step_page_bytes", "gauge", "State bytes paged in the last complete step", ("direction",)),
    MetricSpec("pagedopt_page_copy_seconds_total", "counter",
               "Time spent in synchronous state copies (simulated/host backends; CUDA copies are asynchronous "
               "and show in pagedopt_prefetch_latency_seconds)", ("direction",)),
    MetricSpec("pagedopt_page_thrash_transfers_total", "counter",
               "Page-ins of state that was already paged in earlier in the same step (thrashing)"),
    MetricSpec("pagedopt_page_thrash_bytes_total", "counter", "Bytes of thrashing page-ins"),
    MetricSpec("pagedopt_staging_pool_bytes", "gauge",
               "Device memory held by the staging pools of staged paging (offload, budgeted)"),
    MetricSpec("pagedopt_oom_recoveries_total", "counter",
               "Out-of-memory errors a guarded step recovered from (state evicted, cache emptied, retried; "
               "phase `multi-rank job (no retry)`: recovered, then the error propagated)",
               ("phase",)),
    MetricSpec("pagedopt_memory_free_bytes", "gauge",
               "Free device memory as the memory controller reads it (allocator cache counts as free)"),
    MetricSpec("pagedopt_memory_target_free_bytes", "gauge", "The memory controller's free-memory target"),
    # steps
    MetricSpec("pagedopt_steps_total", "counter", "Optimizer steps"),
    MetricSpec("pagedopt_step_duration_seconds", "histogram",
               "Optimizer step time (CUDA: device time between events around the step)", buckets=STEP_BUCKETS),
    MetricSpec("pagedopt_last_step_timestamp_seconds", "gauge", "Unix time of the last optimizer step"),
    MetricSpec("pagedopt_training_active", "gauge", "1 while training runs, 0 once it has finished"),
    # gradients and clipping
    MetricSpec("pagedopt_grad_norm", "gauge", "L2 norm of all gradients (finite elements) at the last measured step"),
    MetricSpec("pagedopt_group_grad_norm", "gauge", "L2 norm of a parameter group's gradients", ("group",)),
    MetricSpec("pagedopt_clip_threshold", "gauge",
               "Percentile-clipping threshold of a group (L2 norm of its parameters' thresholds)", ("group",)),
    MetricSpec("pagedopt_clip_scale_ratio", "gauge",
               "Fraction of a group's gradient norm kept by percentile clipping (1: nothing clipped)", ("group",)),
    MetricSpec("pagedopt_clipped_updates_total", "counter",
               "Parameter updates whose gradient percentile clipping scaled down", ("group",)),
    MetricSpec("pagedopt_clip_evaluations_total", "counter",
               "Parameter updates that went through percentile clipping", ("group",)),
    MetricSpec("pagedopt_param_grad_norm", "gauge", "Gradient L2 norm of the top-k parameters", ("param",)),
    MetricSpec("pagedopt_nonfinite_grad_elements_total", "counter",
               "Gradient elements that were NaN/Inf; their updates were skipped (pagedopt.optim.nonfinite)"),
    MetricSpec("pagedopt_param_clip_threshold", "gauge", "Percentile-clipping threshold of the top-k parameters",
               ("param",)),
    # quantization
    MetricSpec("pagedopt_quant_error_ratio", "gauge",
               "Relative RMS error requantization adds to 8-bit state in one step (sampled blocks)",
               ("group", "state")),
    # kernels
    MetricSpec("pagedopt_kernel_compile_seconds", "histogram", "CUDA kernel compile time (NVRTC)",
               buckets=COMPILE_BUCKETS),
    MetricSpec("pagedopt_kernel_cache_hits_total", "counter", "CUDA kernels loaded from the cubin cache"),
    # the exporter itself
    MetricSpec("pagedopt_telemetry_dropped_total", "counter",
               "Telemetry values dropped because the device was too far behind", ("what",)),
    MetricSpec("pagedopt_telemetry_errors_total", "counter", "Errors inside the telemetry sink (logged)"),
)

_BY_NAME = {m.name: m for m in METRICS}


def by_name(name: str) -> MetricSpec:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no pagedopt metric named {name!r}") from None


def markdown_table() -> str:
    """The catalogue as a Markdown table (for the README)."""
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for m in METRICS:
        lines.append(f"| `{m.name}` | {m.type} | {', '.join(m.labels) or '-'} | {m.help} |")
    return "\n".join(lines)
