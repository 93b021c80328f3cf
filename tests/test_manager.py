"""GlobalOptimManager: the seed's example, no leaks between optimizers, no inherited ids, no
strong references, resolved once, late overrides, per-parameter paging through the manager."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import pagedopt
from pagedopt.optim import OPTIMIZER_NAMES, get_optimizer_class
from pagedopt.optim.manager import KNOWN_SETTINGS, GlobalOptimManager
from pagedopt.optim.placement import RoutingStateStore


class TwoLayer(torch.nn.Module):
    """The seed example's shape: fc1 large enough for 8-bit state (>= 4096 elements)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    model(torch.randn(8, 64, generator=g)).pow(2).mean().backward()
    opt.step()


@pytest.fixture
def mng() -> GlobalOptimManager:
    return GlobalOptimManager.get_instance()


@pytest.mark.parametrize("override_first", [False, True])
def test_seed_example_register_on_cpu_override_after_moving(mng, override_first):
    # bitsandbytes 0.49.2 reads overrides through the (group, index) table that
    # register_parameters fills from overrides made *before* it; the seed's documented order
    # (register, then override) therefore needed 0.50's id() fallback. Both orders work here.
    torch.manual_seed(0)
    model = TwoLayer()
    if override_first:
        mng.override_config(model.fc1.weight, "optim_bits", 32)
    mng.register_parameters(model.parameters())  # 1. register while still on CPU
    model = model.to(torch.bfloat16)  # moving keeps the parameter objects (torch's default)
    adam = pagedopt.Adam(model.parameters(), lr=0.001, optim_bits=8)
    if not override_first:
        mng.override_config(model.fc1.weight, "optim_bits", 32)  # 2. override after creating the optimizer
    train_step_bf16(model, adam)
    assert adam.state[model.fc1.weight]["state1"].dtype == torch.float32
    assert adam.state[model.fc2.weight]["state1"].dtype == torch.uint8
    assert adam.memory_report().rows[0].precision == "32bit"


def train_step_bf16(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(8, 64, dtype=torch.bfloat16)).float().pow(2).mean().backward()
    opt.step()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to move the model to")
def test_seed_example_with_cuda(mng):
    model = TwoLayer()
    mng.register_parameters(model.parameters())
    model = model.cuda()
    adam = pagedopt.Adam(model.parameters(), lr=0.001, optim_bits=8)
    mng.override_config(model.fc1.weight, "optim_bits", 32)
    opt_input = torch.randn(8, 64, device="cuda")
    model(opt_input).pow(2).mean().backward()
    adam.step()
    assert adam.state[model.fc1.weight]["state1"].dtype == torch.float32
    assert adam.state[model.fc2.weight]["state1"].dtype == torch.uint8


def test_override_does_not_leak_into_a_second_optimizer(mng):
    first, second = TwoLayer(), TwoLayer()
    opt1 = pagedopt.AdamW8bit(first.parameters())
    opt2 = pagedopt.AdamW8bit(second.parameters())  # same (group, index) positions
    mng.register_parameters(first.parameters())
    mng.override_config(first.fc1.weight, key_value_dict={"optim_bits": 32, "lr": 0.0})
    train_step(first, opt1)
    train_step(second, opt2)
    assert opt1.state[first.fc1.weight]["state1"].dtype == torch.float32
    # bitsandbytes' (group 0, index 0) table would hand the override to second.fc1.weight.
    assert opt2.state[second.fc1.weight]["state1"].dtype == torch.uint8
    assert opt2.get_config(0, 0, opt2.param_groups[0])["lr"] == pytest.approx(1e-3)


def test_reused_id_does_not_inherit_an_override(mng):
    p = torch.nn.Parameter(torch.zeros(8192))
    mng.override_config(p, "optim_bits", 32)
    old_id = id(p)
    assert old_id in mng._by_param
    del p
    gc.collect()
    assert old_id not in mng._by_param  # dropped with the parameter
    reused = None
    keep = []
    for _ in range(2000):  # CPython hands freed memory out again quickly
        q = torch.nn.Parameter(torch.zeros(8192))
        if id(q) == old_id:
            reused = q
            break
        keep.append(q)
    if reused is None:
        pytest.skip("the interpreter did not reuse the id in 2000 allocations")
    assert mng.overrides_for(reused) == {}
    opt = pagedopt.AdamW8bit([reused])
    reused.grad = torch.ones_like(reused)
    opt.step()
    assert opt.state[reused]["state1"].dtype == torch.uint8


def test_reused_id_does_not_inherit_an_override_simulated(mng, monkeypatch):
    # Deterministic version of the test above: every tensor gets the same "id".
    import pagedopt.optim.manager as manager_module

    monkeypatch.setattr(manager_module, "id", lambda obj: 12345, raising=False)
    p = torch.nn.Parameter(torch.zeros(8192))
    mng.override_config(p, "optim_bits", 32)
    q = torch.nn.Parameter(torch.zeros(8192))  # alive together: same fake id, different object
    assert mng.overrides_for(q) == {} and mng.overrides_for(p) == {"optim_bits": 32}
    del p
    gc.collect()
    r = torch.nn.Parameter(torch.zeros(8192))
    assert mng.overrides_for(r) == {} and mng.overrides_for(q) == {}
    mng.override_config(r, "lr", 0.5)  # a new entry for the same id replaces nothing it should not
    assert mng.overrides_for(r) == {"lr": 0.5} and mng.overrides_for(q) == {}


def test_manager_holds_no_strong_references(mng):
    model = TwoLayer()
    emb = pagedopt.StableEmbedding(100, 16)  # registers a module override
    mng.override_config(model.fc1.weight, "lr", 0.5)
    mng.register_module_override(model.fc2, "weight", {"optim_bits": 32})
    refs = [weakref.ref(model), weakref.ref(model.fc1.weight), weakref.ref(model.fc2), weakref.ref(emb)]
    del model, emb
    gc.collect()
    assert [r() for r in refs] == [None, None, None, None]


def test_overrides_are_resolved_once_not_every_step(mng, monkeypatch):
    model = TwoLayer()
    mng.override_config(model.fc1.weight, "lr", 1e-4)
    opt = pagedopt.AdamW8bit(model.parameters())
    calls = []
    original = GlobalOptimManager.overrides_for
    monkeypatch.setattr(GlobalOptimManager, "overrides_for", lambda self, p: calls.append(p) or original(self, p))
    for seed in range(3):
        train_step(model, opt, seed)
    assert len(calls) == 4  # once per parameter over three steps
    mng.override_config(model.fc2.weight, "lr", 1e-4)  # a change: re-resolved once, at the next step
    train_step(model, opt, 3)
    train_step(model, opt, 4)
    assert len(calls) == 8


def test_late_hyperparameter_override_applies_at_the_next_step(mng):
    model = TwoLayer()
    opt = pagedopt.AdamW32bit(model.parameters(), weight_decay=0.0)
    train_step(model, opt, 0)
    before = model.fc1.weight.detach().clone()
    other_before = model.fc2.weight.detach().clone()
    mng.override_config(model.fc1.weight, "lr", 0.0)
    train_step(model, opt, 1)
    assert torch.equal(model.fc1.weight.detach(), before)  # exact: lr 0 and no decay leave it untouched
    assert not torch.equal(model.fc2.weight.detach(), other_before)


def test_late_state_shaping_override_warns_and_keeps_the_state(mng):
    model = TwoLayer()
    opt = pagedopt.AdamW8bit(model.parameters())
    train_step(model, opt, 0)
    mng.override_config(model.fc1.weight, key_value_dict={"optim_bits": 32, "lr": 1e-4})
    with pytest.warns(UserWarning, match=r"optim_bits=32 for parameter 'group0.param0' came after AdamW8bit created"):
        train_step(model, opt, 1)
    assert opt.state[model.fc1.weight]["state1"].dtype == torch.uint8
    config = opt.get_config(0, 0, opt.param_groups[0])
    assert config["optim_bits"] == 8 and config["lr"] == 1e-4  # the shape stays, the hyperparameter applies
    # A new optimizer creates new state, so the override applies there.
    fresh = pagedopt.AdamW8bit(model.parameters())
    train_step(model, fresh, 2)
    assert fresh.state[model.fc1.weight]["state1"].dtype == torch.float32


def test_per_parameter_lr_matches_torch_with_param_groups(mng):
    # Tolerance tier FP32: fp32 math vs torch.optim.AdamW; the absolute part is ~3e-5 of one
    # lr=3e-2 step (operation order differs, e.g. pagedopt's correctly rounded sqrt).
    torch.manual_seed(1)
    ours, ref = TwoLayer(), TwoLayer()
    ref.load_state_dict(ours.state_dict())
    mng.override_config(ours.fc1.weight, key_value_dict={"lr": 3e-2, "weight_decay": 0.0})
    opt = pagedopt.AdamW32bit(ours.parameters(), lr=1e-3)
    torch_opt = torch.optim.AdamW([
        {"params": [ref.fc1.weight], "lr": 3e-2, "weight_decay": 0.0},
        {"params": [ref.fc1.bias, ref.fc2.weight, ref.fc2.bias]},
    ], lr=1e-3)
    for seed in range(5):
        train_step(ours, opt, seed)
        train_step(ref, torch_opt, seed)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6, msg=name)


def test_module_override_follows_replaced_parameters(mng):
    model = TwoLayer()
    mng.register_module_override(model.fc1, "weight", {"optim_bits": 32})
    mng.override_config(model.fc2.weight, "optim_bits", 32)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model = model.to(torch.float16)  # new Parameter objects
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    opt = pagedopt.AdamW8bit(model.parameters())
    opt.zero_grad()
    model(torch.randn(8, 64, dtype=torch.float16)).float().pow(2).mean().backward()
    opt.step()
    assert opt.state[model.fc1.weight]["state1"].dtype == torch.float32  # module override: by attribute
    assert opt.state[model.fc2.weight]["state1"].dtype == torch.uint8  # direct override stayed on the old object


def test_stable_embedding_keeps_32bit_state(mng):
    emb = pagedopt.StableEmbedding(1000, 64)
    lin = torch.nn.Linear(64, 128)
    opt = pagedopt.AdamW8bit([*emb.parameters(), *lin.parameters()])
    lin(emb(torch.tensor([[1, 2, 3]]))).sum().backward()
    opt.step()
    assert opt.state[emb.weight]["state1"].dtype == torch.float32
    assert opt.state[lin.weight]["state1"].dtype == torch.uint8


def test_override_dict_is_copied(mng):
    p = torch.nn.Parameter(torch.zeros(4))
    settings = {"lr": 0.1}
    mng.override_config(p, key_value_dict=settings)
    settings["lr"] = 0.2
    settings["optim_bits"] = 8
    assert mng.overrides_for(p) == {"lr": 0.1}


def test_direct_override_wins_over_module_override(mng):
    lin = torch.nn.Linear(4, 4)
    mng.override_config(lin.weight, "lr", 0.3)
    mng.register_module_override(lin, "weight", {"lr": 0.1, "optim_bits": 32})
    assert mng.overrides_for(lin.weight) == {"lr": 0.3, "optim_bits": 32}


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m, p: m.override_config(p, "optim_bit", 32), ValueError, r"unknown optimizer setting 'optim_bit' \(did you mean 'optim_bits'\?\)"),
        (lambda m, p: m.override_config(p, "lr", -1.0), ValueError, r"override_config: Invalid lr: -1.0"),
        (lambda m, p: m.override_config(p, "optim_bits", 16), ValueError, r"Invalid optim_bits: 16 \(must be 8 or 32\)"),
        (lambda m, p: m.override_config(p, "paging", {"policy": "sometimes"}), ValueError, r"invalid paging"),
        (lambda m, p: m.override_config(p), ValueError, r"nothing to override"),
        (lambda m, p: m.override_config(p, "lr", 1.0, {"eps": 1.0}), ValueError, r"either key/value or key_value_dict"),
        (lambda m, p: m.override_config(torch.nn.Linear(2, 2), "lr", 1.0), TypeError, r"got a Module"),
        (lambda m, p: m.override_config([p, 3], "lr", 1.0), TypeError, r"expected tensors, got int"),
        (lambda m, p: m.register_module_override(torch.nn.Linear(2, 2), "wieght", {"lr": 1.0}), AttributeError, r"no attribute 'wieght'"),
        (lambda m, p: m.register_parameters([3]), TypeError, r"expected tensors or parameter groups"),
    ],
)
def test_bad_overrides_raise_at_the_call(mng, call, error, message):
    p = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(error, match=message):
        call(mng, p)
    assert mng.overrides_for(p) == {}


def test_setting_the_optimizer_lacks_raises_naming_parameter_and_optimizer(mng):
    model = TwoLayer()
    mng.override_config(model.fc2.bias, "nesterov", True)
    opt = pagedopt.AdamW8bit(model.named_parameters())
    with pytest.raises(ValueError, match=r"parameter 'fc2.bias': 'nesterov' is not a setting of AdamW8bit"):
        train_step(model, opt)


def test_betas_override_checked_against_the_optimizer(mng):
    p = torch.nn.Parameter(torch.zeros(8))
    mng.override_config(p, "betas", (0.9, 0.99))
    opt = pagedopt.AdEMAMix([p])  # needs three betas
    p.grad = torch.ones(8)
    with pytest.raises(ValueError, match=r"Invalid betas: \(0.9, 0.99\) \(expected 3 values\)"):
        opt.step()


def test_register_parameters_accepts_the_seed_forms(mng):
    model = TwoLayer()
    mng.register_parameters(model.parameters())
    mng.register_parameters([{"params": list(model.parameters())}])
    mng.register_parameters(model.named_parameters())


def test_clear_drops_every_override(mng):
    p = torch.nn.Parameter(torch.zeros(4))
    lin = torch.nn.Linear(2, 2)
    mng.override_config(p, "lr", 0.1)
    mng.register_module_override(lin, "weight", {"lr": 0.2})
    generation = mng.generation
    mng.clear()
    assert mng.overrides_for(p) == {} and mng.overrides_for(lin.weight) == {}
    assert mng.generation > generation  # optimizers re-resolve after a clear


def test_known_settings_are_the_optimizers_settings():
    union = set()
    for name in OPTIMIZER_NAMES:
        cls = get_optimizer_class(name)
        kwargs = {"lr": 0.1, "momentum": 0.9} if name.removeprefix("Paged").startswith(("SGD", "LARS")) else {}
        union |= set(cls([torch.nn.Parameter(torch.zeros(1))], **kwargs).defaults)
    assert KNOWN_SETTINGS == union | {"paging"}


class RecordingStore(pagedopt.paging.DeviceStateStore):
    def __init__(self, config):
        self.config, self.keys = config, []

    def zeros(self, param, key, shape, dtype):
        self.keys.append(key)
        return super().zeros(param, key, shape, dtype)


def test_paging_override_routes_that_parameter_to_its_own_store(mng, monkeypatch):
    made = []
    monkeypatch.setattr(pagedopt.paging, "make_state_store", lambda cfg: made.append(RecordingStore(cfg)) or made[-1])
    model = TwoLayer()
    mng.override_config(model.fc1.weight, "paging", {"policy": "offload", "backend": "host"})
    opt = pagedopt.AdamW8bit(model.parameters())
    train_step(model, opt)
    assert isinstance(opt.state_store, RoutingStateStore)
    assert len(made) == 1 and made[0].config.policy == "offload"
    assert made[0].keys == ["state1", "state2"]  # only fc1.weight's state went there
