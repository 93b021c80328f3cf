"""Helpers shared by the main job's tests (test_train_library.py, test_train_cli.py,
test_train_distributed.py): the tiny run's settings and flags, free ports, scraping a metrics
endpoint, and reading a subprocess's output up to a line."""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from pagedopt.train import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]

# The small run most tests share: 137k parameters, 8-bit state for every weight matrix. One
# thread: at this size a second one gains little, and on a busy machine two spinning OpenMP
# threads per process slow a run down by an order of magnitude.
TINY = dict(model_size="tiny", seq_len=64, batch_size=8, max_corpus_bytes=400_000, eval_batches=2,
            progress="off", threads=1)
TINY_FLAGS = ["--model-size", "tiny", "--seq-len", "64", "--batch-size", "8", "--max-corpus-bytes", "400000",
              "--eval-batches", "2", "--threads", "1"]


def tiny(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, **overrides})


def free_port(consecutive: int = 1) -> int:
    """A port p with p .. p + consecutive - 1 free on 127.0.0.1 (for base + LOCAL_RANK)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + consecutive > 65535:
            continue
        try:
            for extra in range(1, consecutive):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + extra))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port range")


def scrape(port: int) -> dict[str, float]:
    """``name{labels}`` -> value of every sample on the endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def read_until(proc: subprocess.Popen, pattern: str, timeout: float = 120) -> list[str]:
    """The lines of ``proc``'s stdout up to the first matching ``pattern``; kills ``proc`` and
    fails the test (with its output) when the output ends or ``timeout`` passes first."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    proc.kill()
    pytest.fail(f"no line matching {pattern!r}:\n{''.join(lines)}\n{proc.stderr.read()[-3000:]}")
