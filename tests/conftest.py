"""Shared test configuration.

Tolerance tiers used across the suite (each numerical test names its tier):

* ``EXACT`` - bit-identical results (same algorithm, same float32 operation order).
* ``FP32`` - float32 math against the float64 oracle: per element
  ``|x - ref| <= 2e-6 + 1e-5 * |ref|`` (about 100 float32 ulps of the values involved,
  accumulated over 50 steps without re-syncing).
* ``LOWP`` - 16-bit parameters against the oracle rounded to the same dtype: within 2 ulps of
  the dtype for all but a handful of elements (a float32 vs float64 intermediate can round a
  16-bit result the other way).
* ``QUANT`` - 8-bit states: statistical bounds on the drift from the float64 oracle (mean
  error relative to how far the parameters moved), as in the 8-bit optimizers paper's claims.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU with a working driver (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_manager():
    """Each test starts with an empty GlobalOptimManager (it is process-wide)."""
    from pagedopt import GlobalOptimManager

    GlobalOptimManager.get_instance().clear()
    yield
    GlobalOptimManager.get_instance().clear()
