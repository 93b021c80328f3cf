"""Cost of the Prometheus exporter on the optimizer step: telemetry on vs off, side by side.

Two identical models and optimizers step alternately (on, off, on, off, ...) in one process,
so machine noise hits both alike; the result is the ratio of median step times (the exporter's
``on_step`` included, a scrape every ``--scrape-every`` steps included). Two shapes: a few
large parameters (the per-step cost is the update) and many small ones (per-parameter
bookkeeping dominates).

    python benchmarks/telemetry_overhead.py --steps 40                          # no clipping
    python benchmarks/telemetry_overhead.py --steps 40 --percentile-clipping 95  # clipping
    python benchmarks/telemetry_overhead.py --device cuda --steps 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pagedopt  # noqa: E402
from pagedopt.telemetry import start_exporter  # noqa: E402


def make(shape: str, device: str) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    if shape == "large":
        sizes = [1 << 20, 1 << 20, 1 << 18, 4096]
    else:
        sizes = [4096 + i for i in range(50)] + [257] * 950
    return [torch.nn.Parameter(torch.randn(s, device=device)) for s in sizes]


def timed_step(opt, params, device: str) -> float:
    for p in params:
        p.grad = torch.randn_like(p)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    opt.step()
    if device == "cuda":
        torch.cuda.synchronize()  # measured outside the step: the step itself never syncs
    return time.perf_counter() - start


def run(shape: str, steps: int, device: str, scrape_every: int, clipping: int) -> tuple[float, float]:
    on_params, off_params = make(shape, device), make(shape, device)
    on = pagedopt.AdamW8bit(on_params, percentile_clipping=clipping)
    off = pagedopt.AdamW8bit(off_params, percentile_clipping=clipping)
    exporter = start_exporter(on, port=0, quant_error_every=50)
    times_on, times_off = [], []
    try:
        for i in range(steps):
            times_on.append(timed_step(on, on_params, device))
            times_off.append(timed_step(off, off_params, device))
            if scrape_every and i % scrape_every == 0:
                urllib.request.urlopen(exporter.url, timeout=30).read()
    finally:
        exporter.close()
    return statistics.median(times_on[2:]), statistics.median(times_off[2:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scrape-every", type=int, default=10)
    parser.add_argument("--percentile-clipping", type=int, default=100, help="both optimizers (100: off)")
    args = parser.parse_args()
    print(f"device {args.device}, {args.steps} steps per variant, median step time, "
          f"percentile_clipping={args.percentile_clipping}, a scrape every {args.scrape_every} steps")
    print(f"{'shape':<8} {'telemetry on':>14} {'off':>10} {'on / off':>9}")
    for shape in ("large", "many"):
        t_on, t_off = run(shape, args.steps, args.device, args.scrape_every, args.percentile_clipping)
        print(f"{shape:<8} {t_on * 1e3:>11.2f} ms {t_off * 1e3:>7.2f} ms {t_on / t_off:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
