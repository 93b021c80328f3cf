"""The Prometheus exporter serving alongside training: ports (a busy port disables the metrics
and training goes on; base port plus local rank, on loopback), errors inside the sink never stop
training, multiprocess mode (local rank 0 serves all local ranks on one port), and the training
scripts' flags and callback (the endpoint lingers after training)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import pagedopt
from pagedopt.telemetry import start_exporter
from pagedopt.telemetry.prometheus import PrometheusSink
from pagedopt.telemetry.sink import NULL_SINK, attach

from telemetry_helpers import scrape, single, small_model, step

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_busy_port_logs_warning_and_training_continues(caplog):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        w = torch.nn.Parameter(torch.randn(10))
        opt = pagedopt.AdamW([w])
        with caplog.at_level(logging.WARNING, logger="pagedopt.telemetry"):
            exporter = start_exporter(opt, port=port, local_rank=0)
        assert not exporter.enabled and exporter.url is None
        assert opt.sink is NULL_SINK
        assert any("metrics are disabled" in r.message and str(port) in r.message for r in caplog.records)
        w.grad = torch.ones(10)
        opt.step()  # training goes on
        exporter.finish()
        exporter.close()
    finally:
        blocker.close()


def test_port_is_base_plus_local_rank_on_loopback(monkeypatch):
    base = free_port()
    while True:  # a base whose +3 is free too
        if base > 2000:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + 3))
                break
            except OSError:
                pass
        base = free_port()
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "11")
    opt = pagedopt.AdamW([torch.nn.Parameter(torch.randn(4))])
    with start_exporter(opt, port=base) as exporter:
        assert exporter.port == base + 3
        assert exporter.url == f"http://127.0.0.1:{base + 3}/metrics"
        families = scrape(exporter)
        assert single(families, "pagedopt_run_info")  # serves
        assert {s.labels["rank"] for s in families["pagedopt_build_info"].samples} == {"11"}
        assert single(families, "pagedopt_device_info", local_rank="3") == 1
    with pytest.raises(ValueError, match="port=70000"):
        start_exporter(opt, port=70000)


def test_errors_inside_the_sink_never_stop_training(caplog, monkeypatch):
    w = torch.nn.Parameter(torch.randn(5000))
    opt = pagedopt.AdamW8bit([w], percentile_clipping=90)
    sink = attach(opt, PrometheusSink(opt, run="e"))

    def broken(report):
        raise RuntimeError("boom")

    monkeypatch.setattr(sink.aggregator, "submit", broken)
    with caplog.at_level(logging.ERROR, logger="pagedopt.telemetry"):
        for _ in range(3):
            w.grad = torch.randn(5000)
            opt.step()
    assert sink.errors == 3
    assert sum("error in the metrics sink" in r.message for r in caplog.records) == 1  # logged once
    assert single(scrape(sink), "pagedopt_telemetry_errors_total") == 3
    # A failing quantization-error probe (it runs inside the update pass) is contained too.
    from pagedopt.telemetry.quant_error import QuantErrorProbe

    def broken_probe(self, kind, entries, items):
        raise ValueError("bad shapes")

    monkeypatch.setattr(QuantErrorProbe, "before", broken_probe)
    sink.sampler.every = 1
    before = w.detach().clone()
    w.grad = torch.randn(5000)
    opt.step()
    assert sink.errors == 5 and not torch.equal(before, w)  # submit and the probe failed; the step ran


@pytest.mark.slow
def test_multiprocess_mode_serves_all_local_ranks_on_one_port(tmp_path):
    """Two ranks of one node (LOCAL_RANK 0 and 1) with PROMETHEUS_MULTIPROC_DIR: local rank 0
    serves both ranks' series on the base port; local rank 1 serves nothing."""
    mp_dir = tmp_path / "metrics"
    mp_dir.mkdir()
    port = free_port()
    procs = []
    status = []
    for rank, steps in ((0, 3), (1, 5)):
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(mp_dir), LOCAL_RANK=str(rank), RANK=str(rank),
                   WORLD_SIZE="2", PAGEDOPT_RUN="mp-run", PYTHONPATH=str(ROOT))
        ready = tmp_path / f"ready{rank}.jsonl"
        status.append(ready)
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "train_with_metrics.py"), "--steps", str(steps),
             "--metrics-port", str(port), "--linger", "120", "--hidden", "32", "--ready-file", str(ready)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            done = [p.read_text().count('"finished"') if p.exists() else 0 for p in status]
            if all(done) or procs[0].poll() is not None:
                break
            time.sleep(0.5)
        # Rank 0 serves (and lingers); rank 1 has no endpoint and may already have exited:
        # its values stay in the multiprocess directory.
        assert procs[0].poll() is None, procs[0].communicate()[0]
        assert procs[1].wait(timeout=120) == 0, procs[1].communicate()[0]
        first = [json.loads(line) for line in status[0].read_text().splitlines()]
        second = [json.loads(line) for line in status[1].read_text().splitlines()]
        assert first[0]["url"] == f"http://127.0.0.1:{port}/metrics"
        assert second[0]["url"] is None and second[0]["enabled"]
        text = urllib.request.urlopen(first[0]["url"], timeout=10).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        steps = {s.labels["rank"]: s.value for s in families["pagedopt_steps"].samples if s.name == "pagedopt_steps_total"}
        assert steps == {"0": 3.0, "1": 5.0}
        active = {s.labels["rank"]: s.value for s in families["pagedopt_training_active"].samples}
        assert active == {"0": 0.0, "1": 0.0}
        runs = {s.labels["run"] for f in families.values() for s in f.samples if "run" in s.labels}
        assert runs == {"mp-run"}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)


def test_training_flags_and_callback_linger(capsys):
    import argparse
    import threading

    from pagedopt.telemetry.training import add_metrics_arguments, metrics_callback

    parser = argparse.ArgumentParser()
    add_metrics_arguments(parser)
    for bad, message in ((["--linger", "-1"], "--linger: must be >= 0"),
                         (["--metrics-port", "70000"], "--metrics-port: must be a port number")):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
        assert message in capsys.readouterr().err
    assert metrics_callback(parser.parse_args([])) is None
    callback = metrics_callback(parser.parse_args(["--metrics-port", "0", "--linger", "1.5", "--metrics-top-k", "1"]),
                                run="cb")
    model = small_model()
    opt = pagedopt.AdamW8bit(model.parameters(), percentile_clipping=95)
    run = types.SimpleNamespace(optimizer=opt, model=model)
    callback.on_train_start(run)
    url = callback.exporter.url
    step(model, opt)
    callback.on_step_end(run, None)
    scraped = []
    started = time.monotonic()
    # While on_train_end lingers, the endpoint still serves the final values.
    timer = threading.Timer(0.5, lambda: scraped.append(urllib.request.urlopen(url, timeout=10).read().decode()))
    timer.start()
    callback.on_train_end(run, None)
    timer.join()
    assert time.monotonic() - started >= 1.5
    assert 'pagedopt_training_active{rank="0",run="cb"} 0.0' in scraped[0]
    assert 'pagedopt_param_state_bytes{param="0.weight",rank="0",residency="host",run="cb"}' in scraped[0]
    assert opt.sink is NULL_SINK
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)
