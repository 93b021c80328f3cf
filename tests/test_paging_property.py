"""Property tests: random sequences of visits (updates), prefetches, evictions, state-dict
round trips, replaced tensors, pressure spikes and allocation failures never lose data and
keep the pager's accounting exact (books == buffers == physical pool allocations), with the
budget checked at every transition.

Tolerance tier: **exact**. The pager-level machine applies integer-exact updates (adds of
small integers, wrapping for uint8) to the state and to a plain-tensor model; the
optimizer-level test compares a paged optimizer with an unpaged twin bit for bit.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, precondition, rule

import pagedopt
from pagedopt.paging import Pager, PagingConfig

from _paging_support import InvariantWatch, assert_identical, make_params

POLICIES = ("on_demand", "pipelined", "offload", "budgeted")


@st.composite
def paging_configs(draw) -> PagingConfig:
    policy = draw(st.sampled_from(POLICIES))
    budget = draw(st.one_of(st.none(), st.integers(200, 6000))) if policy != "budgeted" else draw(st.integers(200, 6000))
    capacity = draw(st.one_of(st.none(), st.integers(max(budget or 0, 1500), 12_000)))
    reserve = draw(st.sampled_from([0, 0, 300, 1000]))
    if capacity is not None and reserve >= capacity:
        reserve = 0
    return PagingConfig(
        policy=policy, backend="simulated", device_budget_bytes=budget, simulated_capacity_bytes=capacity,
        reserve_free_bytes=reserve, prefetch_depth=draw(st.integers(1, 3)), min_paged_numel=8,
        eviction=draw(st.sampled_from(["lru", "next_use"])),
        warn_on_fallback=False,
    )


@dataclass
class Work:
    key: torch.Tensor
    state: dict[str, Any]
    delta: int


class PagerMachine(RuleBasedStateMachine):
    """A pager driven like an optimizer would drive it, next to a plain-tensor model."""

    params = Bundle("params")

    @initialize(config=paging_configs())
    def start(self, config: PagingConfig) -> None:
        self.config = config
        self.pager = Pager(config)
        self.watch = InvariantWatch(self.pager, config.device_budget_bytes)
        self.states: dict[int, dict[str, Any]] = {}  # param index -> the "optimizer's" state dict
        self.model: dict[int, dict[str, torch.Tensor]] = {}
        self.tensors: list[torch.Tensor] = []
        self.spikes: list[torch.Tensor] = []

    # -- creating and dropping state -----------------------------------------------------------

    @precondition(lambda self: len(self.states) < 6)
    @rule(target=params, numel=st.integers(1, 400), two=st.booleans(), quantized=st.booleans())
    def add_param(self, numel: int, two: bool, quantized: bool) -> int:
        index = len(self.tensors)
        param = torch.zeros(numel)
        self.tensors.append(param)
        dtype = torch.uint8 if quantized else torch.float32
        keys = ("state1", "state2") if two else ("state1",)
        self.states[index] = {k: self.pager.zeros(param, k, (numel,), dtype) for k in keys}
        self.model[index] = {k: torch.zeros(numel, dtype=dtype) for k in keys}
        return index

    @rule(index=consumes(params))
    def drop_param(self, index: int) -> None:
        self.pager.forget(self.tensors[index])
        del self.states[index], self.model[index]

    # -- the step ---------------------------------------------------------------------------

    @rule(chosen=st.lists(params, unique=True), delta=st.integers(1, 9))
    def visit(self, chosen: list[int], delta: int) -> None:
        chosen = [i for i in sorted(chosen) if i in self.states]
        works = [Work(self.tensors[i], self.states[i], delta + i) for i in chosen]
        seen: list[torch.Tensor] = []
        fallbacks = self.pager.stats()["allocation_fallbacks_total"]

        def update(chunk: list[Work]) -> None:
            for w in chunk:
                seen.append(w.key)
                for key in list(w.state):
                    where = self.pager.location(w.key, key)
                    fell_back = self.pager.stats()["allocation_fallbacks_total"] > fallbacks
                    assert where in (None, "device") or fell_back, f"{key} updated while on the {where}"
                    w.state[key].add_(w.delta)  # read fresh from the dict: the pager may swap it

        self.pager.visit(works, update)
        assert [id(k) for k in seen] == [id(w.key) for w in works], "each work once, in order"
        for i in chosen:
            for key, t in self.model[i].items():
                t.add_(delta + i)

    @rule(chosen=st.lists(params, unique=True))
    def prefetch(self, chosen: list[int]) -> None:
        self.pager.prefetch([self.tensors[i] for i in chosen if i in self.states])

    @rule(chosen=st.lists(params, unique=True))
    def evict(self, chosen: list[int]) -> None:
        self.pager.evict([self.tensors[i] for i in chosen if i in self.states])

    @rule()
    def evict_all(self) -> None:
        self.pager.evict()

    # -- what the optimizer and the user do between steps -----------------------------------

    @rule(index=params)
    def state_dict_round_trip(self, index: int) -> None:
        """load_state_dict: forget the parameter, adopt saved copies into a new state dict."""
        if index not in self.states:
            return
        buf = io.BytesIO()
        torch.save({k: v for k, v in self.states[index].items()}, buf)
        buf.seek(0)
        saved = torch.load(buf)
        param = self.tensors[index]
        self.pager.forget(param)
        self.states[index] = {k: self.pager.adopt(param, k, v) for k, v in saved.items()}

    @rule(index=params)
    def replace_state_tensor(self, index: int) -> None:
        """The user puts a tensor the pager does not know into the state dict."""
        if index in self.states:
            self.states[index]["state1"] = self.model[index]["state1"].clone()

    @rule(nbytes=st.integers(1, 8000))
    def pressure_spike(self, nbytes: int) -> None:
        self.spikes.append(self.pager.simulated_device.occupy(nbytes))

    @precondition(lambda self: bool(self.spikes))
    @rule()
    def spike_gone(self) -> None:
        self.spikes.pop()

    @rule(count=st.integers(1, 3))
    def allocations_fail(self, count: int) -> None:
        self.pager.simulated_device.fail_next_allocations(count)

    # -- what must hold after every rule ----------------------------------------------------

    @invariant()
    def nothing_lost(self) -> None:
        for i, state in self.states.items():
            for key, expected in self.model[i].items():
                assert torch.equal(state[key], expected), f"param {i} {key} lost data"

    @invariant()
    def accounting_exact(self) -> None:
        self.pager.verify_accounting(physical=True)
        capacity = self.config.simulated_capacity_bytes
        if capacity is not None:
            dev = self.pager.simulated_device
            assert dev.used_bytes - dev.foreign_bytes <= capacity


PagerMachine.TestCase.settings = settings(
    max_examples=1200, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestPagerSequences = PagerMachine.TestCase


# -- the real optimizer, paged vs unpaged -------------------------------------------------------

OPS = st.sampled_from(["step", "step_some", "prefetch", "evict", "round_trip_same", "round_trip_new", "spike", "fail"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=paging_configs(),
    name=st.sampled_from(["AdamW32bit", "Lion32bit", "AdEMAMix32bit", "AdamW8bit"]),
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=4),
    ops=st.lists(OPS, min_size=1, max_size=8),
    data=st.data(),
)
def test_optimizer_sequences_match_unpaged(config, name, sizes, ops, data):
    shapes = [(n,) for n in sizes]
    cls = getattr(pagedopt, name)
    ref_params, params = make_params(shapes), make_params(shapes)
    ref = cls(ref_params, min_8bit_size=16)
    opt = cls(params, paging=config, min_8bit_size=16)
    InvariantWatch(opt.pager, config.device_budget_bytes)
    spikes = []
    for step, op in enumerate(ops):
        if op in ("step", "step_some"):
            skip = data.draw(st.sets(st.integers(0, len(sizes) - 1))) if op == "step_some" else set()
            gen = torch.Generator().manual_seed(step)
            for a, b in zip(ref_params, params):
                g = torch.randn(a.shape, generator=gen)
                a.grad, b.grad = g.clone(), g.clone()
            for i in skip:
                ref_params[i].grad = params[i].grad = None
            ref.step()
            opt.step()
        elif op == "prefetch":
            opt.pager.prefetch()
        elif op == "evict":
            opt.pager.evict()
        elif op.startswith("round_trip"):
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            if op == "round_trip_new":
                old = opt
                opt = cls(params, paging=config, min_8bit_size=16)
                InvariantWatch(opt.pager, config.device_budget_bytes)
                del old
            opt.load_state_dict(torch.load(buf))
        elif op == "spike":
            spikes.append(opt.pager.simulated_device.occupy(data.draw(st.integers(1, 6000))))
        elif op == "fail":
            opt.pager.simulated_device.fail_next_allocations(data.draw(st.integers(1, 3)))
        assert_identical(ref, ref_params, opt, params)
        opt.pager.verify_accounting()
