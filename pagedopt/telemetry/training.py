"""Metrics for a training loop: the command-line flags and a callback that runs the exporter.

``pagedopt train`` (and any script with an argparse parser) gets ``--metrics-port``,
``--metrics-addr``, ``--metrics-top-k`` and ``--linger`` from :func:`add_metrics_arguments`;
:func:`metrics_callback` turns the parsed arguments into a :class:`MetricsCallback` (or
``None`` when metrics are off). The callback follows the training loop's callback protocol
(``on_train_start(run)``, ``on_step_end(run, info)``, ``on_eval(run, info)``,
``on_train_end(run, result)``, where ``run`` has ``optimizer`` and ``model``) and can also
be driven by hand with :meth:`MetricsCallback.start` / :meth:`MetricsCallback.stop`.

Example:
    >>> import argparse, torch, pagedopt
    >>> from pagedopt.telemetry.training import add_metrics_arguments, metrics_callback
    >>> parser = argparse.ArgumentParser()
    >>> add_metrics_arguments(parser)
    >>> args = parser.parse_args(["--metrics-port", "0", "--linger", "0"])
    >>> callback = metrics_callback(args)
    >>> model = torch.nn.Linear(8, 8)
    >>> opt = pagedopt.AdamW8bit(model.parameters(), percentile_clipping=95)
    >>> exporter = callback.start(opt, model)
    >>> exporter.enabled
    True
    >>> callback.stop()
    >>> metrics_callback(parser.parse_args([])) is None   # metrics off unless a port is given
    True
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

log = logging.getLogger("pagedopt.telemetry")


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 0..65535 (0: any free port), got {text}")
    return value


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the metrics flags to ``parser`` (an argument group "metrics")."""
    group = parser.add_argument_group("metrics (Prometheus)")
    group.add_argument("--metrics-port", type=_port, default=None, metavar="PORT",
                       help="serve Prometheus metrics on PORT + LOCAL_RANK (off unless given; 9460 is the "
                            "conventional base; 0 picks a free port)")
    group.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR",
                       help="address the metrics endpoint binds (default 127.0.0.1; 0.0.0.0 for a Prometheus "
                            "on another host or container)")
    group.add_argument("--metrics-top-k", type=int, default=20, metavar="K",
                       help="parameters with their own per-parameter series, by state size (default 20)")
    group.add_argument("--linger", type=_non_negative_float, default=0.0, metavar="SECONDS",
                       help="keep serving metrics SECONDS after training ends, so Prometheus scrapes the final "
                            "values (default 0)")


def metrics_callback(args: argparse.Namespace, **sink_options: Any) -> "MetricsCallback | None":
    """A :class:`MetricsCallback` for parsed arguments, or ``None`` without ``--metrics-port``."""
    if getattr(args, "metrics_port", None) is None:
        return None
    return MetricsCallback(port=args.metrics_port, addr=args.metrics_addr, top_k=args.metrics_top_k,
                           linger=args.linger, **sink_options)


class MetricsCallback:
    """Starts the exporter when training starts; publishes final values, lingers and stops it
    when training ends (see the module docstring).

    Args:
        port, addr, top_k: as :func:`pagedopt.telemetry.start_exporter`.
        linger: seconds to keep serving after training.
        sink_options: passed to :func:`~pagedopt.telemetry.start_exporter` (``run=``,
            ``quant_error_every=``, ...).

    Example:
        >>> import types, torch, pagedopt
        >>> model = torch.nn.Linear(4, 4)
        >>> run = types.SimpleNamespace(optimizer=pagedopt.AdamW(model.parameters()), model=model)
        >>> callback = MetricsCallback(port=0)
        >>> callback.on_train_start(run); callback.exporter.enabled
        True
        >>> callback.on_train_end(run, None); callback.exporter is None
        True
    """

    def __init__(self, port: int, addr: str = "127.0.0.1", top_k: int = 20, linger: float = 0.0,
                 **sink_options: Any):
        self.port = port
        self.addr = addr
        self.top_k = top_k
        self.linger = linger
        self.sink_options = sink_options
        self.exporter: Any = None

    def start(self, optimizer: Any, model: torch.nn.Module | None = None) -> Any:
        from .exporter import start_exporter

        if not hasattr(optimizer, "sink"):
            log.warning("pagedopt telemetry: %s is not a pagedopt optimizer; metrics are off", type(optimizer).__name__)
            return None
        self.exporter = start_exporter(optimizer, model, port=self.port, addr=self.addr, top_k=self.top_k,
                                       **self.sink_options)
        return self.exporter

    def stop(self) -> None:
        """Final values, ``--linger`` seconds of serving, then close (idempotent).

        Ctrl-C (``KeyboardInterrupt``, or SIGTERM where the program maps it to one) while the
        final values are published or during the linger only cuts that short: training is
        over, so the interrupt is not an error of the run.
        """
        if self.exporter is None:
            return
        exporter, self.exporter = self.exporter, None
        try:
            exporter.finish()
            exporter.linger(self.linger)
        except KeyboardInterrupt:
            log.info("pagedopt telemetry: interrupted after training; closing the metrics endpoint")
        finally:
            exporter.close()

    # -- the training loop's callback protocol ------------------------------------------------------

    def on_train_start(self, run: Any) -> None:
        self.start(run.optimizer, getattr(run, "model", None))

    def on_step_end(self, run: Any, info: Any) -> None:
        return None

    def on_eval(self, run: Any, info: Any) -> None:
        return None

    def on_train_end(self, run: Any, result: Any) -> None:
        self.stop()
