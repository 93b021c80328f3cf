"""PagingConfig validation: human sizes, and clear errors that name the field."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import pagedopt
from pagedopt.paging import PagingConfig


def test_defaults_are_on_demand_on_auto():
    cfg = PagingConfig()
    assert (cfg.policy, cfg.backend, cfg.device_budget_bytes, cfg.reserve_free_bytes) == ("on_demand", "auto", None, 0)
    assert cfg.prefetch_depth == 2 and cfg.min_paged_numel == 100_000 and cfg.eviction == "next_use"


@pytest.mark.parametrize(
    "text, value",
    [("2GiB", 2 * 2**30), ("1.5 GB", 1_500_000_000), ("512MiB", 512 * 2**20), ("4096", 4096), (" 10kb ", 10_000)],
)
def test_human_sizes(text, value):
    assert PagingConfig(policy="budgeted", device_budget_bytes=text).device_budget_bytes == value


@pytest.mark.parametrize(
    "kwargs, field, message",
    [
        ({"policy": "sometimes"}, "policy", "on_demand"),
        ({"backend": "nvme"}, "backend", "managed"),
        ({"policy": "budgeted"}, None, "needs device_budget_bytes"),
        ({"policy": "budgeted", "device_budget_bytes": 0}, None, "use policy 'offload'"),
        ({"device_budget_bytes": "2 bananas"}, "device_budget_bytes", "not a byte size"),
        ({"device_budget_bytes": "0.5B"}, "device_budget_bytes", "whole number of bytes"),
        ({"reserve_free_bytes": -1}, "reserve_free_bytes", "greater than or equal to 0"),
        ({"prefetch_depth": 0}, "prefetch_depth", "greater than or equal to 1"),
        ({"simulated_capacity_bytes": "1MiB"}, None, "only used by backend='simulated'"),
        ({"backend": "simulated", "simulated_capacity_bytes": 100, "device_budget_bytes": 200}, None, "could never be used"),
        ({"backend": "simulated", "simulated_capacity_bytes": 100, "reserve_free_bytes": 100}, None, "must be below"),
        ({"eviction": "random"}, "eviction", "next_use"),
        ({"budget": "1GiB"}, "budget", "Extra inputs are not permitted"),
    ],
)
def test_bad_configs_name_the_problem(kwargs, field, message):
    with pytest.raises(ValidationError) as info:
        PagingConfig(**kwargs)
    error = info.value.errors()[0]
    if field is not None:
        assert error["loc"] == (field,)
    assert message in str(info.value)


def test_config_is_frozen():
    cfg = PagingConfig()
    with pytest.raises(ValidationError):
        cfg.policy = "offload"


def test_optimizer_takes_a_dict_and_reports_bad_fields():
    p = torch.nn.Parameter(torch.zeros(8))
    opt = pagedopt.AdamW8bit([p], paging={"policy": "offload", "backend": "simulated"})
    assert opt.is_paged and opt.pager.config.policy == "offload"
    with pytest.raises(ValidationError, match="prefetch_depth"):
        pagedopt.AdamW8bit([p], paging={"prefetch_depth": 100})
