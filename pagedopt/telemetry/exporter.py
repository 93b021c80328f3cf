"""Prometheus exporter: a :class:`~pagedopt.telemetry.prometheus.PrometheusSink` plus one
HTTP ``/metrics`` endpoint per process (or per node).

:func:`start_exporter` attaches a sink to the optimizer and serves its metrics (catalogue:
:mod:`pagedopt.telemetry.metrics`):

* **One endpoint per process.** Port ``port + LOCAL_RANK`` (torchrun sets ``LOCAL_RANK``), bound
  to ``127.0.0.1`` unless ``addr`` says otherwise (``0.0.0.0`` for a Prometheus on another
  host or in a container). ``port=0`` picks a free port (see :attr:`Exporter.port`).
* **One endpoint per node** (prometheus-client's multiprocess mode). Launch with an empty
  directory in ``PROMETHEUS_MULTIPROC_DIR`` (set before Python starts, e.g.
  ``rm -rf /tmp/pagedopt-metrics && mkdir /tmp/pagedopt-metrics &&
  PROMETHEUS_MULTIPROC_DIR=/tmp/pagedopt-metrics torchrun ...``). Every rank then writes its
  values to memory-mapped files there, and local rank 0 alone serves all of them on ``port``
  (series stay apart by their ``rank`` label). Values are written at step ends.
* **A busy port never stops training**: the exporter logs a warning and metrics stay off.
* Each exporter has its own ``CollectorRegistry`` (several optimizers or tests in one
  process do not collide).

Example:
    >>> import torch, urllib.request, pagedopt
    >>> from pagedopt.telemetry import start_exporter
    >>> model = torch.nn.Linear(256, 64)
    >>> opt = pagedopt.AdamW8bit(model.parameters(), percentile_clipping=95)
    >>> exporter = start_exporter(opt, model=model, port=0, run="demo")
    >>> model(torch.randn(8, 256)).square().mean().backward(); opt.step()
    >>> text = urllib.request.urlopen(exporter.url).read().decode()
    >>> 'pagedopt_steps_total{rank="0",run="demo"} 1.0' in text
    True
    >>> exporter.close()
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import torch
from prometheus_client import CollectorRegistry, make_wsgi_app

from .prometheus import PrometheusSink, _env_int, _RefreshingRegistry, multiprocess_enabled
from .sink import attach, detach

log = logging.getLogger("pagedopt.telemetry")

# Base port (+ LOCAL_RANK). Not 9400: dcgm-exporter, usually on the same GPU nodes, uses it.
DEFAULT_PORT = 9460


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress never keeps the training process alive


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return None


def _serve(registry: CollectorRegistry, addr: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    server_class = type("PagedoptMetricsServer", (_ThreadingServer,), {})
    if ":" in addr:
        server_class.address_family = socket.AF_INET6
    httpd = make_server(addr, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name=f"pagedopt-metrics-{port}", daemon=True)
    thread.start()
    return httpd, thread


class Exporter:
    """A running exporter: the sink attached to the optimizer and the HTTP server.

    ``enabled`` is False when the port was busy (a warning was logged, nothing is attached).
    A process that does not serve (multiprocess mode, local rank > 0) is enabled but has no
    ``port``.

    Example:
        >>> import torch, pagedopt
        >>> from pagedopt.telemetry import start_exporter
        >>> opt = pagedopt.AdamW8bit([torch.nn.Parameter(torch.zeros(10))])
        >>> with start_exporter(opt, port=0) as exporter:
        ...     exporter.enabled, exporter.url.startswith("http://127.0.0.1:")
        (True, True)
    """

    def __init__(self, optimizer: Any, sink: PrometheusSink | None, server: WSGIServer | None,
                 thread: threading.Thread | None, addr: str):
        self.optimizer = optimizer
        self.sink = sink
        self.addr = addr
        self._server = server
        self._thread = thread
        self.port: int | None = server.server_address[1] if server is not None else None

    @property
    def enabled(self) -> bool:
        return self.sink is not None

    @property
    def url(self) -> str | None:
        if self.port is None:
            return None
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def finish(self) -> None:
        """Mark training finished and publish final values (see :meth:`PrometheusSink.finish`)."""
        if self.sink is not None:
            self.sink.finish()

    def linger(self, seconds: float) -> None:
        """Keep serving for ``seconds`` (e.g. so Prometheus scrapes the final values)."""
        if seconds > 0 and self._server is not None:
            time.sleep(seconds)

    def close(self) -> None:
        """Detach from the optimizer and stop the server (idempotent)."""
        if self.sink is not None:
            detach(self.optimizer, self.sink)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "Exporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def start_exporter(
    optimizer: Any,
    model: torch.nn.Module | None = None,
    *,
    port: int = DEFAULT_PORT,
    addr: str = "127.0.0.1",
    top_k: int = 20,
    run: str | None = None,
    local_rank: int | None = None,
    multiprocess: bool | None = None,
    **sink_options: Any,
) -> Exporter:
    """Attach a :class:`PrometheusSink` to ``optimizer`` and serve it over HTTP.

    Args:
        optimizer: a pagedopt optimizer.
        model: names the parameters (when the optimizer got ``model.parameters()``).
        port: base port; this process serves on ``port + LOCAL_RANK`` (0: any free port).
        addr: address to bind (``127.0.0.1`` by default; ``0.0.0.0`` for all interfaces).
        top_k: parameters with their own per-parameter series.
        run: the ``run`` label (default: :func:`default_run_id`).
        local_rank: default ``LOCAL_RANK`` from the environment (0).
        multiprocess: one endpoint per node (default: on when ``PROMETHEUS_MULTIPROC_DIR`` is
            set); only local rank 0 serves, on ``port``.
        sink_options: passed to :class:`PrometheusSink` (``quant_error_every``, ...).

    A port that cannot be bound logs a warning and returns a disabled exporter; training
    goes on without metrics.
    """
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port={port!r}: must be an integer in 0..65535")
    local_rank = _env_int("LOCAL_RANK", 0) if local_rank is None else local_rank
    wants_multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR")) if multiprocess is None else multiprocess
    if wants_multiprocess and not multiprocess_enabled():
        log.error("pagedopt telemetry: multiprocess metrics need PROMETHEUS_MULTIPROC_DIR set before "
                  "prometheus_client is imported (set it in the launcher's environment); serving this "
                  "process's metrics on its own port instead")
        wants_multiprocess = False
    serves = not wants_multiprocess or local_rank == 0
    bind_port = (port + local_rank if port else 0) if not wants_multiprocess else port
    served = _RefreshingRegistry()
    registry: CollectorRegistry | None = served
    if wants_multiprocess:
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = None  # values go to the multiprocess directory
        if serves:
            MultiProcessCollector(served)
    server = thread = None
    if serves:
        try:
            server, thread = _serve(served, addr, bind_port)
        except OSError as e:
            log.warning("pagedopt telemetry: cannot serve metrics on %s:%s (%s); metrics are disabled, "
                        "training continues", addr, bind_port, e)
            return Exporter(optimizer, None, None, None, addr)
    sink = PrometheusSink(optimizer, model=model, registry=registry, top_k=top_k, run=run,
                          local_rank=local_rank, multiprocess=wants_multiprocess, **sink_options)
    if wants_multiprocess and serves:
        served.before_collect.append(sink.before_scrape)
    attach(optimizer, sink)
    exporter = Exporter(optimizer, sink, server, thread, addr)
    if exporter.url:
        log.info("pagedopt telemetry: serving metrics at %s", exporter.url)
    return exporter
