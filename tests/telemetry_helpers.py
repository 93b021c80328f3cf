"""Helpers shared by the Prometheus exporter's tests (test_telemetry_exporter.py,
test_telemetry_exporter_cardinality.py, test_telemetry_exporter_serving.py; test_paging_telemetry.py
imports scrape/single/values through test_telemetry_exporter): scraping an exporter or a sink,
reading samples by name and labels, and a small model with one training step."""

from __future__ import annotations

import urllib.request

import torch
from prometheus_client.parser import text_string_to_metric_families

from pagedopt.telemetry.metrics import COMMON_LABELS


def scrape(exporter_or_sink) -> dict[str, list]:
    """{family name: [samples]} from the exporter's HTTP endpoint (or a sink's registry)."""
    if hasattr(exporter_or_sink, "url"):
        text = urllib.request.urlopen(exporter_or_sink.url, timeout=10).read().decode()
    else:
        from prometheus_client import generate_latest

        text = generate_latest(exporter_or_sink.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def values(families, name, **labels) -> dict[tuple, float]:
    """Samples of ``name`` (exposed sample name) as {label tuple without run/rank: value}."""
    out = {}
    for family in families.values():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                key = tuple(sorted((k, v) for k, v in s.labels.items() if k not in COMMON_LABELS))
                out[key] = s.value
    return out


def single(families, name, **labels) -> float:
    found = values(families, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return next(iter(found.values()))


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))


def step(model, opt, scale=1.0):
    (model(torch.randn(16, 96)).square().mean() * scale).backward()
    opt.step()
