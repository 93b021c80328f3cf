"""load_state_dict validates before it changes anything (pagedopt.optim.state_checks).

Each bad state dict must raise StateDictError naming group, position, parameter name and key,
and the optimizer must be exactly as before (state and hyperparameters), so a caller can catch
the error and keep training.
"""

from __future__ import annotations

import copy

import pytest
import torch

import pagedopt
from pagedopt.optim.state_checks import StateDictError


def _trained(cls=pagedopt.AdamW8bit, steps=2, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Linear(80, 3))
    named = list(model.named_parameters())
    opt = cls([{"params": [p for _, p in named], "param_names": [n for n, _ in named]}], min_8bit_size=1024, **kwargs)
    for _ in range(steps):
        model(torch.randn(4, 64)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _snapshot(opt):
    return copy.deepcopy({"state": {id(p): s for p, s in opt.state.items()},
                          "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]})


def _same(a, b):
    assert a["groups"] == b["groups"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        for name, value in a["state"][key].items():
            other = b["state"][key][name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), name
            else:
                assert value == other, name


def _nested(sd, index=0):
    return sd["state"][index]["__bnb_optimizer_quant_state__"]


CORRUPTIONS = {
    "absmax NaN": (lambda sd: _nested(sd)["absmax1"].__setitem__(0, float("nan")), "'absmax1'", "NaN"),
    "absmax negative": (lambda sd: _nested(sd)["absmax2"].__setitem__(1, -1.0), "'absmax2'", "negative"),
    "32-bit state NaN": (lambda sd: _nested(sd, 1)["state1"].__setitem__(0, float("nan")), "'state1'", "NaN"),
    "eps nan": (lambda sd: sd["param_groups"][0].__setitem__("eps", float("nan")), "param group 0", "eps"),
    "lr -1": (lambda sd: sd["param_groups"][0].__setitem__("lr", -1.0), "param group 0", "lr"),
    "beta 2.0": (lambda sd: sd["param_groups"][0].__setitem__("betas", (2.0, 0.9)), "param group 0", "beta"),
    "random qmap": (lambda sd: _nested(sd).__setitem__("qmap1", torch.rand(256)), "'qmap1'", "increasing"),
    "fractional step": (lambda sd: sd["state"][0].__setitem__("step", 2.5), "'step'", "integer"),
    "negative step": (lambda sd: sd["state"][0].__setitem__("step", -1), "'step'", "integer"),
    "wrong shape": (lambda sd: _nested(sd).__setitem__("state1", torch.zeros(80, 63, dtype=torch.uint8)),
                    "'state1'", "does not fit"),
    "same numel, other shape": (lambda sd: _nested(sd).__setitem__("state1", _nested(sd)["state1"].reshape(64, 80)),
                                "'state1'", "same number of elements"),
    "absmax count": (lambda sd: _nested(sd).__setitem__("absmax1", torch.ones(3)), "'absmax1'", "scales"),
    "integer state": (lambda sd: _nested(sd, 1).__setitem__("state1", torch.zeros(80, dtype=torch.int32)),
                      "'state1'", "dtype"),
    "gnorm_vec inf": (lambda sd: _nested(sd).__setitem__("gnorm_vec", torch.full((100,), float("inf"))),
                      "'gnorm_vec'", "infinite"),
    "missing state2": (lambda sd: _nested(sd).pop("state2"), "'state2'", "missing"),
    "foreign tensor": (lambda sd: sd["state"][0].__setitem__("momentum_buffer", torch.zeros(80, 64)),
                       "'momentum_buffer'", "another optimizer"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_bad_state_dicts_are_refused_before_anything_changes(case):
    corrupt, key, problem = CORRUPTIONS[case]
    _, opt = _trained(percentile_clipping=90)
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    before = _snapshot(opt)
    with pytest.raises(StateDictError) as info:
        opt.load_state_dict(sd)
    message = str(info.value)
    assert key in message and problem in message, message
    if key != "param group 0":  # per-parameter problems name the parameter
        assert "param group 0, position" in message and ("'0.weight'" in message or "'0.bias'" in message), message
    _same(before, _snapshot(opt))


def test_a_valid_state_dict_still_loads_and_training_continues_identically():
    model, opt = _trained()
    sd = opt.state_dict()
    _, opt2 = _trained(steps=0)
    twin = list(opt2.param_groups[0]["params"])
    with torch.no_grad():
        for p, q in zip(model.parameters(), twin):
            q.copy_(p)
    opt2.load_state_dict(sd)
    for p, q in zip(model.parameters(), twin):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    for p, q in zip(model.parameters(), twin):
        assert torch.equal(p, q)


def test_one_state_dict_into_a_two_state_optimizer_names_the_layout():
    _, lion = _trained(pagedopt.Lion8bit)
    _, adam = _trained(steps=0)
    with pytest.raises(StateDictError, match=r"'state2'.*missing.*one-state"):
        adam.load_state_dict(lion.state_dict())
    _, lion2 = _trained(pagedopt.Lion8bit, steps=0)
    with pytest.raises(StateDictError, match="'state2'.*two-state"):
        lion2.load_state_dict(adam.state_dict() if adam.state else _trained()[1].state_dict())


def test_load_state_dict_hooks_of_torch_optim_are_called():
    _, opt = _trained()
    sd = opt.state_dict()
    calls = []

    def pre(optimizer, state_dict):
        calls.append(("pre", optimizer is opt))
        state_dict = dict(state_dict)
        state_dict["param_groups"] = [dict(g, lr=0.0123) for g in state_dict["param_groups"]]
        return state_dict

    def post(optimizer):
        calls.append(("post", optimizer.param_groups[0]["lr"]))

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(sd)
    assert calls == [("pre", True), ("post", 0.0123)]


def test_a_pre_hook_cannot_sneak_bad_values_past_validation():
    _, opt = _trained()
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: {**sd, "param_groups": [dict(g, lr=float("nan")) for g in sd["param_groups"]]})
    with pytest.raises(StateDictError, match="lr"):
        opt.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("cls", [pagedopt.AdamW8bit, pagedopt.AdamW32bit, pagedopt.Adam8bit])
def test_torch_adamw_state_dict_converts_and_continues_close_to_torch(cls):
    """torch.optim.AdamW state -> pagedopt: moments quantized (8-bit) or copied (32-bit).
    Tolerance: one more step from the converted state must match torch's next step within the
    8-bit tier (quantization of m and v: relative error of the update ~1e-2)."""
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(64, 80))
    ref = (torch.optim.AdamW if cls is not pagedopt.Adam8bit else torch.optim.Adam)([w], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        w.grad = torch.randn_like(w)
        ref.step()
    w2 = torch.nn.Parameter(w.detach().clone())
    opt = cls([w2], lr=1e-2, weight_decay=0.0)
    opt.load_state_dict(ref.state_dict())
    assert opt.state[w2]["step"] == 3
    assert opt.state[w2]["state1"].dtype == (torch.uint8 if cls is not pagedopt.AdamW32bit else torch.float32)
    g = torch.randn_like(w)
    before = w.detach().clone()
    w.grad, w2.grad = g.clone(), g.clone()
    ref.step()
    opt.step()
    torch_update, ours = w.detach() - before, w2.detach() - before
    rel = (ours - torch_update).norm() / torch_update.norm()
    assert rel < (1e-5 if cls is pagedopt.AdamW32bit else 3e-2), float(rel)


def test_torch_state_into_another_algorithm_or_with_amsgrad_says_why_not():
    w = torch.nn.Parameter(torch.randn(64))
    ref = torch.optim.AdamW([w], amsgrad=True)
    w.grad = torch.randn(64)
    ref.step()
    with pytest.raises(StateDictError, match="amsgrad"):
        pagedopt.AdamW8bit([w]).load_state_dict(ref.state_dict())
    with pytest.raises(StateDictError, match="Lion8bit keeps other moments"):
        pagedopt.Lion8bit([w]).load_state_dict(torch.optim.AdamW([w]).state_dict() | {"state": ref.state_dict()["state"]})


def test_group_and_parameter_counts_are_checked_first():
    _, opt = _trained()
    sd = opt.state_dict()
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match="parameter group 0 has 3 parameters"):
        opt.load_state_dict(sd)
