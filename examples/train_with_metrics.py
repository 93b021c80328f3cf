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
from pagedopt.telemetry.training import add_metrics_arguments, metrics_callback  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    add_metrics_arguments(p)  # --metrics-port, --metrics-addr, --metrics-top-k, --linger
    p.add_argument("--percentile-clipping", type=int, default=95,
                   help="clip gradients at this percentile of the last 100 norms (100 disables; default 95)")
    p.add_argument("--quant-error-every", type=int, default=10, help="sample the quantization error every N steps")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep after each step (slows the run down)")
    p.add_argument("--hidden", type=int, default=256, help="hidden width of the MLP")
    p.add_argument("--run", default=None, help="the run label (default: PAGEDOPT_RUN, torchrun's run id, or host-time)")
    p.add_argument("--ready-file", type=Path, default=None, help="write JSON status lines here")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


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


def train(args: argparse.Namespace, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, float]:
    """A plain regression loop; returns (steps done, last loss). Ctrl-C/SIGTERM stop it early."""
    target = torch.nn.Linear(32, 1)
    generator = torch.Generator().manual_seed(args.seed + 1)
    steps, loss = 0, float("nan")
    try:
        for _ in range(args.steps):
            x = torch.randn(64, 32, generator=generator)
            with torch.no_grad():
                y = target(x).sin() + 0.05 * torch.randn(64, 1, generator=generator)
            batch_loss = torch.nn.functional.mse_loss(model(x), y)
            batch_loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
            loss = batch_loss.detach()
            if args.step_sleep > 0:
                time.sleep(args.step_sleep)
    except KeyboardInterrupt:
        print(f"interrupted after {steps} steps", file=sys.stderr)
    return steps, float(loss)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM behaves like Ctrl-C: training stops, the exporter is closed, the exit code is 0.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    model, opt = build(args)
    metrics = metrics_callback(args, run=args.run, quant_error_every=args.quant_error_every)
    exporter = metrics.start(opt, model) if metrics is not None else None
    write_status(args.ready_file, event="serving", url=exporter.url if exporter else None,
                 enabled=bool(exporter and exporter.enabled),
                 run=exporter.sink.run if exporter and exporter.sink else None)
    try:
        steps, loss = train(args, model, opt)
        report = opt.memory_report()
        if exporter is not None:
            exporter.finish()  # final values before the status line (stop() would do it too)
        write_status(args.ready_file, event="finished", steps=steps, loss=loss,
                     state_bytes=report.total_bytes - report.shared_bytes)
        print(f"trained {steps} steps, final loss {loss:.4f}, optimizer state {report.total_bytes:,} bytes")
        if metrics is not None:
            metrics.stop()  # lingers --linger seconds, then closes the endpoint
    except KeyboardInterrupt:
        pass
    finally:
        if metrics is not None:
            metrics.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
