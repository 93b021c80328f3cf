"""Train a small regression MLP with 8-bit AdamW and serve its metrics to Prometheus.

A complete, runnable example of the telemetry API (and the training job the Prometheus
integration test scrapes): percentile clipping on, sampled quantization error, one
``/metrics`` endpoint on ``--metrics-port`` (+ ``LOCAL_RANK``), metrics kept alive for
``--linger`` seconds after training so Prometheus can scrape the final values.

    python examples/train_with_metrics.py --steps 500 --metrics-port 9460 --linger 60
    curl -s http://127.0.0.1:9460/metrics | grep pagedopt_grad_norm

``--ready-file`` receives a JSON line once the endpoint serves (its URL) and another when
training has finished (steps, final loss, optimizer state bytes), for scripts that drive
this one. SIGTERM/SIGINT end training early and cleanly (the exporter is closed).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import pagedopt  # noqa: E402
from pagedopt.telemetry import start_exporter  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--metrics-port", type=int, default=9460,
                   help="base port of the metrics endpoint; this process serves on port + LOCAL_RANK (0: any free port)")
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address the metrics endpoint binds (default 127.0.0.1)")
    p.add_argument("--linger", type=float, default=0.0, help="keep serving metrics this many seconds after training")
    p.add_argument("--top-k", type=int, default=20, help="parameters with their own per-parameter series")
    p.add_argument("--percentile-clipping", type=int, default=95,
                   help="clip gradients at this percentile of the last 100 norms (100 disables; default 95)")
    p.add_argument("--quant-error-every", type=int, default=10, help="sample the quantization error every N steps")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep after each step (slows the run down)")
    p.add_argument("--hidden", type=int, default=256, help="hidden width of the MLP")
    p.add_argument("--run", default=None, help="the run label (default: PAGEDOPT_RUN, torchrun's run id, or host-time)")
    p.add_argument("--ready-file", type=Path, default=None, help="write JSON status lines here")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class Stop:
    """Set by SIGTERM/SIGINT: the loop finishes its current step and exits cleanly."""

    requested = False

    @classmethod
    def install(cls) -> None:
        def handler(signum, frame):
            cls.requested = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def write_status(path: Path | None, **fields) -> None:
    if path is not None:
        with path.open("a") as f:
            f.write(json.dumps(fields) + "\n")


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, args.hidden), torch.nn.GELU(),
        torch.nn.Linear(args.hidden, args.hidden), torch.nn.GELU(),
        torch.nn.Linear(args.hidden, 1),
    )
    groups = [
        {"params": [p for n, p in model.named_parameters() if n.endswith("weight")], "name": "weights",
         "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "name": "biases",
         "weight_decay": 0.0},
    ]
    opt = pagedopt.AdamW8bit(groups, lr=2e-3, percentile_clipping=args.percentile_clipping)
    return model, opt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Stop.install()
    model, opt = build(args)
    exporter = start_exporter(opt, model=model, port=args.metrics_port, addr=args.metrics_addr,
                              top_k=args.top_k, run=args.run, quant_error_every=args.quant_error_every)
    write_status(args.ready_file, event="serving", url=exporter.url, enabled=exporter.enabled,
                 run=exporter.sink.run if exporter.sink else None)
    target = torch.nn.Linear(32, 1)
    generator = torch.Generator().manual_seed(args.seed + 1)
    steps = 0
    loss = torch.tensor(float("nan"))
    try:
        for _ in range(args.steps):
            if Stop.requested:
                break
            x = torch.randn(64, 32, generator=generator)
            with torch.no_grad():
                y = target(x).sin() + 0.05 * torch.randn(64, 1, generator=generator)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
            if args.step_sleep > 0:
                time.sleep(args.step_sleep)
        exporter.finish()
        report = opt.memory_report()
        write_status(args.ready_file, event="finished", steps=steps, loss=float(loss),
                     state_bytes=report.total_bytes - report.shared_bytes)
        print(f"trained {steps} steps, final loss {float(loss):.4f}, optimizer state {report.total_bytes:,} bytes")
        deadline = time.monotonic() + args.linger
        while time.monotonic() < deadline and not Stop.requested:
            time.sleep(min(0.2, deadline - time.monotonic()))
    finally:
        exporter.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
