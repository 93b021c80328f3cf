"""Config override rules: matching by name (glob, regex), module class and size, ordering
(later rules win key by key), parameter groups, precedence against the manager, keywords,
the optimizer section and class defaults, and paging per parameter.

Tolerance tier: exact up to fp32 rounding where a test reads back the lr a step really used.
"""

from __future__ import annotations

import pytest
import torch

import pagedopt
from pagedopt.config import ConfigWarning, build_optimizer
from pagedopt.optim.placement import RoutingStateStore

from config_helpers import Net, step


def group_of(opt: torch.optim.Optimizer, name: str) -> dict:
    for group in opt.param_groups:
        if name in group["param_names"]:
            return group
    raise KeyError(name)


def settings_of(opt, name: str) -> dict:
    for gindex, group in enumerate(opt.param_groups):
        if name in group["param_names"]:
            return opt.get_config(gindex, group["param_names"].index(name), group)
    raise KeyError(name)


# -- rules -------------------------------------------------------------------------------------


def build(model, overrides, optimizer=None, **kwargs):
    config = {"optimizer": optimizer or {"name": "AdamW8bit", "lr": 1e-3, "weight_decay": 0.1}, "overrides": overrides}
    return build_optimizer(model, config, **kwargs)


def test_glob_rule_matches_qualified_names_across_dots():
    opt = build(Net(), [{"match": "*.bias", "set": {"weight_decay": 0.0}}])
    biases = ["blocks.0.attn.bias", "blocks.0.norm.bias", "blocks.1.attn.bias", "blocks.1.norm.bias", "head.bias"]
    for name in biases:
        assert settings_of(opt, name)["weight_decay"] == 0.0
    assert settings_of(opt, "head.weight")["weight_decay"] == 0.1
    assert sorted(group_of(opt, "head.bias")["param_names"]) == biases  # one group for all of them


def test_regex_rule_matches_the_whole_name():
    with pytest.warns(ConfigWarning, match=r"overrides\[1\]: rule \(match: 're:head'\) matches no"):
        opt = build(Net(), [{"match": r"re:blocks\.[0-9]+\.attn\.weight", "set": {"lr": 1e-4}},
                            {"match": "re:head", "set": {"lr": 5.0}}])  # "head" is no whole name
    assert settings_of(opt, "blocks.1.attn.weight")["lr"] == 1e-4
    assert settings_of(opt, "blocks.1.attn.bias")["lr"] == 1e-3
    assert settings_of(opt, "head.weight")["lr"] == 1e-3


def test_module_rule_matches_class_base_classes_and_dotted_names():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), pagedopt.StableEmbedding(64, 8), torch.nn.LayerNorm(8))
    opt = build(model, [{"module": "Embedding", "set": {"lr": 0.2}},  # StableEmbedding is an Embedding
                        {"module": "torch.nn.LayerNorm", "set": {"lr": 0.3}},
                        {"module": "Linear", "set": {"lr": 0.4}}])
    assert settings_of(opt, "1.weight")["lr"] == 0.2
    assert settings_of(opt, "1.norm.weight")["lr"] == 0.3  # StableEmbedding's own LayerNorm
    assert settings_of(opt, "2.bias")["lr"] == 0.3
    assert settings_of(opt, "0.weight")["lr"] == 0.4


def test_size_bounds_are_inclusive_and_combine_with_match():
    opt = build(Net(), [
        {"min_numel": 5120, "set": {"lr": 0.2}},  # attn.weight 160x32 = 5120 (inclusive), emb, head
        {"max_numel": 32, "match": "blocks.*", "set": {"lr": 0.3}},  # block norms (32) but not the 160-bias
    ])
    assert settings_of(opt, "blocks.0.attn.weight")["lr"] == 0.2
    assert settings_of(opt, "emb.weight")["lr"] == 0.2
    assert settings_of(opt, "blocks.0.norm.weight")["lr"] == 0.3
    assert settings_of(opt, "blocks.0.attn.bias")["lr"] == 1e-3
    assert settings_of(opt, "head.bias")["lr"] == 1e-3


def test_later_rules_win_key_by_key():
    opt = build(Net(), [
        {"match": "*", "set": {"lr": 0.1, "weight_decay": 0.05}},
        {"match": "head.*", "set": {"lr": 0.2}},
        {"match": "*", "set": {"eps": 1e-6}},
    ])
    head, emb = settings_of(opt, "head.weight"), settings_of(opt, "emb.weight")
    assert (head["lr"], head["weight_decay"], head["eps"]) == (0.2, 0.05, 1e-6)
    assert (emb["lr"], emb["weight_decay"], emb["eps"]) == (0.1, 0.05, 1e-6)


def test_groups_share_identical_settings_and_carry_names():
    model = Net()
    opt = build(model, [{"match": "*.bias", "set": {"weight_decay": 0.0}},
                        {"match": "head.bias", "set": {"weight_decay": 0.0}}])  # same result: same group
    assert len(opt.param_groups) == 2
    assert [len(g["param_names"]) for g in opt.param_groups] == [6, 5]
    step(model, opt)
    names = [row.name for row in opt.memory_report().rows]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


def test_rule_arguments_map_like_the_constructor():
    # SGD packs momentum/dampening into betas: a rule's momentum lands there too.
    model = Net()
    opt = build(model, [{"match": "head.*", "set": {"momentum": 0.5, "nesterov": True}}],
                optimizer={"name": "SGD8bit", "lr": 0.1, "momentum": 0.9})
    assert settings_of(opt, "head.weight")["betas"] == (0.5, 0.0)
    assert settings_of(opt, "head.weight")["nesterov"] is True
    assert settings_of(opt, "emb.weight")["betas"] == (0.9, 0.0)
    step(model, opt)


def test_tied_parameter_matches_by_any_name():
    model = Net()
    model.head.weight = model.emb.weight  # tied: one parameter, two names
    opt = build(model, [{"match": "head.weight", "set": {"lr": 0.2}}, {"module": "Linear", "set": {"eps": 1e-5}}])
    cfg = settings_of(opt, "emb.weight")  # listed under its first name
    assert (cfg["lr"], cfg["eps"]) == (0.2, 1e-5)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_frozen_parameters_are_left_out():
    model = Net()
    model.emb.weight.requires_grad_(False)
    opt = build(model, [])
    assert "emb.weight" not in [n for g in opt.param_groups for n in g["param_names"]]
    opt_all = build(model, [], trainable_only=False)
    assert "emb.weight" in [n for g in opt_all.param_groups for n in g["param_names"]]


def test_optim_bits_rule_changes_state_precision_after_a_step():
    model = Net()
    opt = build(model, [{"match": "head.weight", "set": {"optim_bits": 32}},
                        {"match": "blocks.0.attn.weight", "set": {"min_8bit_size": 10_000}}])
    step(model, opt)
    precision = {r.name: r.precision for r in opt.memory_report().rows}
    assert precision["head.weight"] == "32bit"
    assert precision["blocks.0.attn.weight"] == "32bit"  # 5120 < 10000
    assert precision["blocks.1.attn.weight"] == "8bit-blockwise"
    assert precision["emb.weight"] == "8bit-blockwise"


# -- precedence --------------------------------------------------------------------------------


def test_precedence_manager_then_rules_then_kwargs_then_section_then_class_defaults():
    # Lion's update is exactly lr * sign(.) (fp32, no decay): the lr that each parameter really
    # used is read back from the parameter itself. Tolerance tier: exact up to fp32 rounding.
    model = torch.nn.ModuleDict({name: torch.nn.Linear(4, 4, bias=False) for name in "abcde"})
    pagedopt.GlobalOptimManager.get_instance().override_config(model["a"].weight, "lr", 0.5)
    config = {"optimizer": {"name": "Lion32bit", "lr": 0.2, "eps": 0} if False else {"name": "Lion32bit", "lr": 0.2},
              "overrides": [{"match": "[ab].*", "set": {"lr": 0.4}}, {"match": "c.*", "set": {"weight_decay": 0.0}}]}
    opt = build_optimizer(model, config, lr=0.3)  # kwargs replace the section's lr
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    used = {n: (before[n] - p.detach()).mean().item() for n, p in model.named_parameters()}
    assert used["a.weight"] == pytest.approx(0.5, rel=1e-6)  # manager override
    assert used["b.weight"] == pytest.approx(0.4, rel=1e-6)  # rule
    assert used["c.weight"] == pytest.approx(0.3, rel=1e-6)  # build_optimizer keyword
    cfg_only = build_optimizer(model, config)
    assert cfg_only.defaults["lr"] == 0.2  # the section
    default_only = build_optimizer(model, {"optimizer": "Lion32bit"})
    assert default_only.defaults["lr"] == 1e-4  # Lion's class default


def test_stable_embedding_stays_32bit_under_a_catch_all_8bit_rule():
    model = torch.nn.Sequential(pagedopt.StableEmbedding(1000, 64), torch.nn.Linear(64, 256))
    opt = build(model, [{"match": "*", "set": {"optim_bits": 8, "min_8bit_size": 0}}])
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    assert opt.state[model[0].weight]["state1"].dtype == torch.float32  # the manager wins
    assert opt.state[model[1].weight]["state1"].dtype == torch.uint8
    assert opt.state[model[1].bias]["state1"].dtype == torch.uint8  # min_8bit_size 0 from the rule


def test_rules_become_groups_that_lr_schedulers_scale():
    model = Net()
    opt = build(model, [{"match": "head.*", "set": {"lr": 0.01}}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5)
    assert settings_of(opt, "head.weight")["lr"] == pytest.approx(0.005)
    assert settings_of(opt, "emb.weight")["lr"] == pytest.approx(5e-4)
    del scheduler


# -- paging per parameter -------------------------------------------------------------------


class RecordingStore(pagedopt.paging.DeviceStateStore):
    def __init__(self, config):
        self.config, self.params = config, []

    def zeros(self, param, key, shape, dtype):
        self.params.append(param)
        return super().zeros(param, key, shape, dtype)


@pytest.fixture
def recorded_stores(monkeypatch):
    made = []

    def make(config):
        made.append(RecordingStore(config))
        return made[-1]

    monkeypatch.setattr(pagedopt.paging, "make_state_store", make)
    return made


def test_paging_rules_merge_over_the_section_and_route_state(recorded_stores):
    model = Net()
    config = {
        "optimizer": {"name": "AdamW8bit"},
        "paging": {"policy": "budgeted", "device_budget_bytes": "1MiB", "backend": "host"},
        "overrides": [{"min_numel": 16000, "set": {"paging": {"policy": "offload"}}},
                      {"match": "*.bias", "set": {"paging": False}}],
    }
    opt = build_optimizer(model, config)
    base = recorded_stores[0]
    assert base.config.policy == "budgeted"
    assert group_of(opt, "emb.weight")["paging"]["policy"] == "offload"
    assert group_of(opt, "emb.weight")["paging"]["device_budget_bytes"] == 2**20  # inherited
    assert group_of(opt, "head.bias")["paging"] is False
    assert "paging" not in group_of(opt, "blocks.0.attn.weight")
    step(model, opt)
    assert isinstance(opt.state_store, RoutingStateStore)
    offload = recorded_stores[1]
    assert offload.config.policy == "offload" and offload.config.device_budget_bytes == 2**20
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert {by_id[id(p)] for p in offload.params} == {"emb.weight", "head.weight"}
    assert {by_id[id(p)] for p in base.params} == {"blocks.0.attn.weight", "blocks.1.attn.weight",
                                                    "blocks.0.norm.weight", "blocks.1.norm.weight"}
    # state_dict stays plain data (loadable with weights_only=True) and loads back.
    import io

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = build_optimizer(model, config)
    fresh.load_state_dict(state)
    step(model, fresh, 1)


def test_paging_rule_on_an_unpaged_optimizer_pages_only_those_parameters(recorded_stores):
    model = Net()
    opt = build(model, [{"match": "emb.weight", "set": {"paging": {"policy": "offload", "backend": "host"}}}])
    step(model, opt)
    assert len(recorded_stores) == 1 and len(recorded_stores[0].params) == 2  # emb.weight's state1/state2
    assert opt.memory_report().rows[0].residency == "cpu"
