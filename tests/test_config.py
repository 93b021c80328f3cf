"""Config files: formats, rules by name/module/size, ordering, precedence, errors, strictness,
per-parameter paging, the CLI and the JSON Schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pagedopt
from pagedopt.cli import main as cli_main
from pagedopt.config import (
    ConfigError, ConfigWarning, PagedoptConfig, build_optimizer, json_schema, load_config, resolve,
    validate_document,
)
from pagedopt.config.files import read_document
from pagedopt.config.optimizers import setting_names
from pagedopt.optim.placement import RoutingStateStore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "config.yaml"


class Net(torch.nn.Module):
    """Names: emb.weight, blocks.{0,1}.attn.{weight,bias}, blocks.{0,1}.norm.{weight,bias},
    head.weight, head.bias."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(512, 32)  # 16384 elements
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"attn": torch.nn.Linear(32, 160), "norm": torch.nn.LayerNorm(32)}) for _ in range(2)
        )
        self.head = torch.nn.Linear(32, 512)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for block in self.blocks:
            x = block["norm"](x + block["attn"](x)[..., :32])
        return self.head(x)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    model(torch.randint(0, 512, (4, 8), generator=g)).pow(2).mean().backward()
    opt.step()


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


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


def error_lines(excinfo) -> list[str]:
    return str(excinfo.value).splitlines()


# -- formats ----------------------------------------------------------------------------------

YAML_DOC = """\
    optimizer: {name: PagedAdamW8bit, lr: 1e-3, betas: [0.9, 0.95], weight_decay: 0.01}
    paging: {policy: budgeted, device_budget_bytes: 2GiB}
    telemetry: {port: 9460, addr: 127.0.0.1}
    overrides:
      - match: "*.bias"
        set: {weight_decay: 0.0}
      - module: Embedding
        set: {optim_bits: 32}
      - min_numel: 1000000
        set: {paging: {policy: offload}}
"""

TOML_DOC = """\
    [optimizer]
    name = "PagedAdamW8bit"
    lr = 1e-3
    betas = [0.9, 0.95]
    weight_decay = 0.01

    [paging]
    policy = "budgeted"
    device_budget_bytes = "2GiB"

    [telemetry]
    port = 9460
    addr = "127.0.0.1"

    [[overrides]]
    match = "*.bias"
    set = {weight_decay = 0.0}

    [[overrides]]
    module = "Embedding"
    set = {optim_bits = 32}

    [[overrides]]
    min_numel = 1000000
    set = {paging = {policy = "offload"}}
"""


def test_yaml_toml_and_json_load_the_same_config(tmp_path):
    yaml_path = write(tmp_path, "c.yaml", YAML_DOC)
    from_yaml = load_config(yaml_path)
    from_toml = load_config(write(tmp_path, "c.toml", TOML_DOC))
    from_json = load_config(write(tmp_path, "c.json", json.dumps(read_document(yaml_path))))
    assert yaml.safe_load(yaml_path.read_text())["optimizer"]["lr"] == "1e-3"  # what plain PyYAML reads
    assert from_yaml.model_dump() == from_toml.model_dump() == from_json.model_dump()
    assert from_yaml.optimizer.lr == 1e-3  # YAML's 1e-3 is a number here (PyYAML alone: a string)
    assert from_yaml.paging.device_budget_bytes == 2 * 2**30
    assert from_yaml.telemetry.port == 9460 and from_yaml.telemetry.top_k == 20
    assert [r.describe() for r in from_yaml.overrides] == ["match: '*.bias'", "module: 'Embedding'", "min_numel: 1000000"]
    assert from_yaml.source.endswith("c.yaml")


def test_yml_suffix_and_optimizer_shorthand(tmp_path):
    config = load_config(write(tmp_path, "c.yml", "optimizer: Lion8bit\n"))
    assert config.optimizer.name == "Lion8bit" and config.optimizer.given() == {}


def test_dumped_config_loads_back_unchanged(tmp_path):
    config = load_config(write(tmp_path, "c.yaml", YAML_DOC))
    for dumped in (config.model_dump(), config.model_dump(exclude_unset=True), json.loads(config.model_dump_json())):
        assert validate_document(dumped).model_dump() == config.model_dump()


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


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("optimizer: {name: AdamW8bit, weigth_decay: 0.1}",
         "optimizer.weigth_decay: unknown key 'weigth_decay' (did you mean 'weight_decay'?) (got 0.1)"),
        ("optimizer: {name: AdamW8bit, lr: -0.001}",
         "optimizer.lr: Invalid lr: -0.001 (must be a finite number >= 0)"),
        ("optimizer: {name: AdamW8bit, lr: fast}",
         "optimizer.lr: Input should be a valid number (got 'fast')"),
        ("optimizer: {name: PagedAdamW8bit, is_paged: false}",
         "optimizer.is_paged: PagedAdamW8bit always uses is_paged=True; got is_paged=False (use AdamW8bit instead)"),
        ("optimizer: {name: AdamW8bt}",
         "optimizer: unknown optimizer name 'AdamW8bt'; did you mean 'AdamW8bit'"),
        ("optimizer: {name: adamw_8bit}",
         "optimizer: unknown optimizer name 'adamw_8bit'; did you mean 'AdamW8bit'"),
        ("optimizer: {name: SGD8bit, lr: 0.1}",
         "optimizer.momentum: Invalid momentum: 0 (SGD8bit keeps a momentum buffer and needs 0 < momentum < 1"),
        ("optimizer: {name: RMSprop, alpha: 1.5}",
         "optimizer.alpha: Invalid beta parameter at index 0: 1.5"),
        ("optimizer: {name: AdamW, betas: [0.9, 1.2]}",
         "optimizer.betas: Invalid beta parameter at index 1: 1.2"),
        ("optimizer: {name: AdamW}\noverrides: [{match: '*', set: {nesterov: true}}]",
         "overrides[0].set.nesterov: AdamW has no setting 'nesterov'"),
        ("optimizer: {name: AdamW}\noverrides: [{match: '*', set: {lr: -1.0}}]",
         "overrides[0].set.lr: Invalid lr: -1.0 (must be a finite number >= 0)"),
        ("optimizer: {name: AdamW}\noverrides: [{match: '*', set: {weight_dacay: 0}}]",
         "overrides[0].set.weight_dacay: unknown key 'weight_dacay' (did you mean 'weight_decay'?) (got 0)"),
        ("optimizer: {name: AdamW}\noverrides: [{match: '*', set: {}}]",
         "overrides[0]: 'set' is empty"),
        ("optimizer: {name: AdamW}\noverrides: [{set: {lr: 0.1}}]",
         "overrides[0]: a rule needs at least one of match, module, min_numel, max_numel"),
        ("optimizer: {name: AdamW}\noverrides: [{match: 're:(', set: {lr: 0.1}}]",
         "overrides[0].match: invalid regular expression '('"),
        ("optimizer: {name: AdamW}\noverrides: [{min_numel: 10, max_numel: 5, set: {lr: 0.1}}]",
         "overrides[0]: min_numel (10) is larger than max_numel (5)"),
        ("optimizer: {name: AdamW}\noverrides: [{min_numel: -1, set: {lr: 0.1}}]",
         "overrides[0].min_numel: Input should be greater than or equal to 0 (got -1)"),
        ("optimizer: {name: AdamW}\noverrides: [{match: '*', set: {paging: {policy: budgeted}}}]",
         "overrides[0].set.paging: policy 'budgeted' needs device_budget_bytes"),
        ("optimizer: {name: AdamW}\noverrides: [{match: '*', set: {paging: {polcy: offload}}}]",
         "overrides[0].set.paging.polcy: unknown key 'polcy' (did you mean 'policy'?) (got 'offload')"),
        ("optimizer: {name: AdamW}\npaging: {policy: budgeted, device_budget_bytes: 2 GiBs}",
         "paging.device_budget_bytes: not a byte size: '2 GiBs' (examples: 1048576, '512MiB', '2GiB', '1.5GB')"),
        ("optimizer: {name: AdamW}\npaging: {policy: budgeted, device_budget_bytes: -5}",
         "paging.device_budget_bytes: Input should be greater than or equal to 0 (got -5)"),
        ("optimizer: {name: AdamW}\npaging: {policy: budgeted}",
         "paging: policy 'budgeted' needs device_budget_bytes"),
        ("optimizer: {name: AdamW}\ntelemetry: {port: 70000}",
         "telemetry.port: Input should be less than or equal to 65535 (got 70000)"),
        ("optimizer: {name: AdamW}\ntelemetry: {addr: 'not an address'}",
         "telemetry.addr: not an IP address: 'not an address'"),
        ("optimizer: {name: AdamW}\noverides: []",
         "overides: unknown key 'overides' (did you mean 'overrides'?) (got [])"),
        ("optimizer: {name: AdamW}\nstrict: yes please",
         "strict: Input should be a valid boolean (got 'yes please')"),
        ("paging: {policy: offload}", ": optimizer: missing required key"),
        ("optimizer: {lr: 0.1}", "optimizer: Unable to extract tag using discriminator 'name'"),
        ("", ": the document is empty"),
        ("- optimizer", ": expected a mapping of sections (optimizer, paging, telemetry, overrides, strict) (got 'list')"),
        ("optimizer: {name: AdamW\n", ": line 3, column 1: invalid YAML: expected ',' or '}', but got '<stream end>'"),
        ("optimizer: {name: AdamW}\noptimizer: {name: Lion}", ": line 2, column 1: invalid YAML: duplicate key 'optimizer'"),
    ],
)
def test_errors_name_file_key_path_and_value(tmp_path, text, expected):
    path = write(tmp_path, "job.yaml", text + "\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert any(line.startswith(str(path)) and expected in line for line in error_lines(excinfo)), str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, "job.yaml", """\
        optimizer: {name: AdamW8bit}
        telemetry: {port: 0}
        overrides:
          - {match: "*", set: {lr: -1.0}}
          - {match: "*", set: {paging: {device_budget_bytes: 2 GiBs}}}
          - {match: "*", set: {nesterov: true}}
    """)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    paths = [issue.path for issue in excinfo.value.issues]
    assert paths == ["telemetry.port", "overrides[0].set.lr", "overrides[1].set.paging.device_budget_bytes",
                     "overrides[2].set.nesterov"]
    assert all(issue.file == str(path) for issue in excinfo.value.issues)


def test_rules_are_checked_even_when_the_optimizer_section_is_wrong(tmp_path):
    path = write(tmp_path, "job.yaml", """\
        optimizer: {name: AdamW8bit, wd: 0.1}
        overrides: [{match: "*", set: {lr: -1.0}}]
    """)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert [issue.path for issue in excinfo.value.issues] == ["optimizer.wd", "overrides[0].set.lr"]


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("job.toml", '[optimizer]\nname = "AdamW"\nlr = -1.0\n', "optimizer.lr: Invalid lr: -1.0"),
        ("job.toml", '[optimizer\nname = "AdamW"\n', "line 1, column 11: invalid TOML"),
        ("job.json", '{"optimizer": {"name": "AdamW", "lr": -1.0}}', "optimizer.lr: Invalid lr: -1.0"),
        ("job.json", '{"optimizer": {"name": "AdamW"}, "optimizer": {}}', "invalid JSON: duplicate key 'optimizer'"),
        ("job.json", '{"optimizer": ', "line 1, column 15: invalid JSON: Expecting value"),
        ("job.ini", "[optimizer]", "unsupported config file type '.ini' (use .yaml, .yml, .toml or .json)"),
    ],
)
def test_errors_in_toml_json_and_other_files(tmp_path, name, text, expected):
    path = write(tmp_path, name, text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert f"{path}: " in str(excinfo.value) and expected in str(excinfo.value), str(excinfo.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read the file"):
        load_config(tmp_path / "nope.yaml")


def test_rule_matching_nothing_warns_naming_the_rule(tmp_path):
    path = write(tmp_path, "job.yaml", """\
        optimizer: {name: AdamW8bit}
        overrides:
          - {match: "*.bias", set: {weight_decay: 0.0}}
          - {match: "*.bais", set: {weight_decay: 0.0}}
          - {module: Conv2d, set: {lr: 0.1}}
    """)
    with pytest.warns(ConfigWarning) as record:
        build_optimizer(Net(), path)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert messages[0].startswith(f"{path}: overrides[1]: rule (match: '*.bais') matches no trainable parameter of Net")
    assert messages[1].startswith(f"{path}: overrides[2]: rule (module: 'Conv2d') matches no trainable parameter")


def test_rule_matching_nothing_is_an_error_when_strict(tmp_path):
    path = write(tmp_path, "job.yaml", """\
        optimizer: {name: AdamW8bit}
        strict: true
        overrides: [{match: "*.bais", set: {weight_decay: 0.0}}]
    """)
    with pytest.raises(ConfigError, match=r"job.yaml: overrides\[0\]: rule \(match: '\*.bais'\) matches no trainable"):
        build_optimizer(Net(), path)


def test_invalid_combination_of_rules_names_the_rules_and_parameter():
    config = {"optimizer": {"name": "SGD", "lr": 0.1, "momentum": 0.9},
              "overrides": [{"match": "head.*", "set": {"nesterov": True}},
                            {"match": "*.bias", "set": {"dampening": 0.5}}]}
    validate_document(config)  # each rule alone is valid
    with pytest.raises(ConfigError, match=r"<config>: overrides\[0\], overrides\[1\]: the settings of these rules "
                                          r"together are invalid for parameter 'head.bias': Invalid dampening: 0.5"):
        build_optimizer(Net(), config)


def test_build_optimizer_keywords_are_validated():
    with pytest.raises(ConfigError, match=r"<config>: optimizer.lr: Invalid lr: -1.0"):
        build_optimizer(Net(), {"optimizer": "AdamW8bit"}, lr=-1.0)
    with pytest.raises(ConfigError, match=r"optimizer.bogus: unknown key 'bogus'"):
        build_optimizer(Net(), {"optimizer": "AdamW8bit"}, bogus=1)


def test_build_optimizer_rejects_what_is_not_a_config_or_model():
    with pytest.raises(TypeError, match="expected a PagedoptConfig, a path or a mapping, got int"):
        build_optimizer(Net(), 3)
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got list"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], {"optimizer": "AdamW8bit"})


# -- property test ------------------------------------------------------------------------------

KEYS = ["optimizer", "paging", "telemetry", "overrides", "strict", "name", "lr", "betas", "eps", "weight_decay",
        "optim_bits", "min_8bit_size", "percentile_clipping", "block_wise", "max_unorm", "momentum", "alpha",
        "t_alpha", "policy", "backend", "device_budget_bytes", "prefetch_depth", "port", "addr", "top_k",
        "match", "module", "min_numel", "max_numel", "set", "enabled", "nesterov", "is_paged", "bogus"]
NAMES = ["AdamW8bit", "PagedLion", "SGD8bit", "AdEMAMix32bit", "LARS", "Adagrad8bit", "adamw", "Nope", ""]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(NAMES + ["2GiB", "-1MiB", "1e-3", "re:(", "re:.*", "*.bias", "on_demand", "budgeted",
                             "127.0.0.1", "(0.9, 0.99)", "nan"]),
    st.text(max_size=8),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
    max_leaves=12,
)
OPTIMIZER = st.fixed_dictionaries({"name": st.sampled_from(NAMES)}, optional={k: VALUES for k in KEYS[6:18]})
RULE = st.fixed_dictionaries({}, optional={
    "match": st.sampled_from(["*.bias", "re:head.*", "re:(", "", "emb.weight"]) | VALUES,
    "module": st.sampled_from(["Linear", "Embedding"]) | VALUES,
    "min_numel": st.integers(-5, 10**7) | VALUES,
    "set": st.dictionaries(st.sampled_from(KEYS[6:] + ["paging"]), VALUES, max_size=4) | VALUES,
})
# Near-valid documents: real names and mostly sensible values, so that loading often succeeds
# and building (rule matching, groups, probes, paging merges) runs too.
SENSIBLE = {
    "lr": st.floats(0, 1), "eps": st.floats(0, 1e-3), "weight_decay": st.floats(0, 0.5),
    "betas": st.lists(st.floats(0, 0.999), min_size=2, max_size=3), "optim_bits": st.sampled_from([8, 32, 16]),
    "min_8bit_size": st.integers(-1, 20000), "percentile_clipping": st.integers(0, 101),
    "block_wise": st.booleans(), "max_unorm": st.floats(0, 2), "skip_zeros": st.booleans(),
    "momentum": st.floats(0, 1), "dampening": st.floats(0, 1), "nesterov": st.booleans(), "alpha": st.floats(0, 6),
    "t_alpha": st.none() | st.integers(-1, 100), "lr_decay": st.floats(0, 1), "adam_w_mode": st.booleans(),
}
SENSIBLE_PAGING = st.fixed_dictionaries({}, optional={
    "policy": st.sampled_from(["on_demand", "pipelined", "offload", "budgeted", "never"]),
    "backend": st.sampled_from(["auto", "host", "simulated"]),
    "device_budget_bytes": st.sampled_from([0, 1024, "1MiB", "2GiB", "1.5 GB", "-1", "lots"]),
    "prefetch_depth": st.integers(0, 70), "enabled": st.booleans(),
})
def sensible_document(name: str) -> st.SearchStrategy:
    keys = {k: SENSIBLE[k] for k in setting_names(name) if k in SENSIBLE}
    rule = st.fixed_dictionaries(
        {"set": st.fixed_dictionaries({}, optional={**keys, "paging": SENSIBLE_PAGING | st.booleans()})},
        optional={"match": st.sampled_from(["*.bias", "re:blocks\\.[01]\\..*", "head.*", "*", "re:["]),
                  "module": st.sampled_from(["Linear", "LayerNorm", "Embedding", "torch.nn.Linear", "Conv2d"]),
                  "min_numel": st.integers(0, 20000), "max_numel": st.integers(0, 20000)},
    )
    return st.fixed_dictionaries(
        {"optimizer": st.fixed_dictionaries({"name": st.just(name)}, optional=keys)},
        optional={"paging": SENSIBLE_PAGING, "overrides": st.lists(rule, max_size=4), "strict": st.booleans()},
    )


def valid_document(name: str) -> st.SearchStrategy:
    """Documents that should load: values inside every constructor's accepted range."""
    algorithm = name.removeprefix("Paged").removesuffix("8bit").removesuffix("32bit")
    common = {"eps": st.floats(1e-12, 1e-3), "weight_decay": st.floats(0, 0.5), "min_8bit_size": st.integers(0, 20000),
              "percentile_clipping": st.integers(1, 100), "block_wise": st.booleans(), "max_unorm": st.floats(0, 2),
              "skip_zeros": st.booleans()}
    required = {"lr": st.floats(0, 1)}
    if algorithm in ("SGD", "LARS"):
        required["momentum"] = st.floats(0.01, 0.99)
    elif algorithm == "RMSprop":
        common["alpha"] = st.floats(0, 0.99)
    elif algorithm == "AdEMAMix":
        common.update(betas=st.lists(st.floats(0, 0.999), min_size=3, max_size=3), alpha=st.floats(0, 6),
                      t_alpha=st.none() | st.integers(1, 100))
    elif algorithm != "Adagrad":
        common["betas"] = st.lists(st.floats(0, 0.999), min_size=2, max_size=2)
    common = {k: v for k, v in common.items() if k in setting_names(name)}
    paging = st.fixed_dictionaries({"device_budget_bytes": st.sampled_from([4096, "1MiB", "2GiB"])}, optional={
        "policy": st.sampled_from(["on_demand", "pipelined", "offload", "budgeted"]),
        "backend": st.sampled_from(["auto", "host", "simulated"]), "prefetch_depth": st.integers(1, 64)})
    rule = st.fixed_dictionaries(
        {"match": st.sampled_from(["*.bias", "re:blocks\\.[01]\\..*", "head.*", "*", "emb.weight"]),
         "set": st.fixed_dictionaries(required, optional={**common, "optim_bits": st.sampled_from([8, 32]),
                                                          "paging": paging | st.booleans()})},
        optional={"module": st.sampled_from(["Linear", "LayerNorm", "Embedding", "torch.nn.Linear"]),
                  "min_numel": st.integers(0, 200), "max_numel": st.integers(200, 20000)},
    )
    return st.fixed_dictionaries(
        {"optimizer": st.fixed_dictionaries({"name": st.just(name), **required}, optional=common)},
        optional={"paging": paging, "overrides": st.lists(rule, max_size=4)},
    )


SENSIBLE_DOCUMENTS = st.sampled_from(pagedopt.optim.OPTIMIZER_NAMES).flatmap(sensible_document)
VALID_DOCUMENTS = st.sampled_from(pagedopt.optim.OPTIMIZER_NAMES).flatmap(valid_document)

DOCUMENTS = VALID_DOCUMENTS | SENSIBLE_DOCUMENTS | st.fixed_dictionaries({}, optional={
    "optimizer": OPTIMIZER | VALUES,
    "paging": st.dictionaries(st.sampled_from(KEYS[18:22]), VALUES, max_size=4) | VALUES,
    "telemetry": st.dictionaries(st.sampled_from(KEYS[22:25] + ["enabled"]), VALUES, max_size=3),
    "overrides": st.lists(RULE, max_size=3) | VALUES,
    "strict": VALUES,
    "bogus": VALUES,
}) | VALUES


@settings(max_examples=int(os.environ.get("PAGEDOPT_HYPOTHESIS_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(document=DOCUMENTS, fmt=st.sampled_from(["yaml", "json"]))
def test_loading_any_document_succeeds_or_raises_config_error(tmp_path_factory, document, fmt):
    path = tmp_path_factory.mktemp("docs") / f"doc.{fmt}"
    try:
        text = yaml.safe_dump(document) if fmt == "yaml" else json.dumps(document)
    except (ValueError, OverflowError):  # JSON has no NaN/huge-int spelling issues here, but be explicit
        return
    path.write_text(text)
    try:
        config = load_config(path)
    except ConfigError as e:
        assert str(e) and all(issue.file == str(path) for issue in e.issues)
        return
    assert isinstance(config, PagedoptConfig)
    # A valid config also builds (or raises ConfigError for rule combinations).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        try:
            build_optimizer(Net(), config)
        except ConfigError:
            pass


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=VALID_DOCUMENTS)
def test_documents_within_the_constructors_ranges_load_build_and_step(document):
    config = validate_document(document)
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)  # e.g. a size-bounded rule matching nothing
        opt = build_optimizer(model, config)
    assert type(opt).__name__ == document["optimizer"]["name"]
    assert sorted(n for g in opt.param_groups for n in g["param_names"]) == sorted(n for n, _ in model.named_parameters())
    step(model, opt)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=80), suffix=st.sampled_from([".yaml", ".toml", ".json"]))
def test_loading_arbitrary_text_succeeds_or_raises_config_error(tmp_path_factory, text, suffix):
    path = tmp_path_factory.mktemp("text") / f"doc{suffix}"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError:
        pass


# -- example, CLI, schema -------------------------------------------------------------------------


def test_example_config_loads_and_matches_the_example_model():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import tiny_model
    finally:
        sys.path.remove(str(ROOT / "examples"))
    model = tiny_model.build()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        resolution = resolve(model, EXAMPLE)
    assert resolution.unmatched_rules == []
    opt = build_optimizer(model, EXAMPLE)
    assert type(opt).__name__ == "PagedAdamW8bit"


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedopt", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_cli_check_with_model_prints_the_resolved_table():
    result = run_cli("config", "check", "examples/config.yaml", "--model", "examples/tiny_model.py:build")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "examples/config.yaml: valid (PagedAdamW8bit, 4 override rules)"
    assert lines[1].startswith("PagedAdamW8bit(lr=0.0003, betas=(0.9, 0.95), weight_decay=0.1, percentile_clipping=95)")
    row = {line.split()[0]: line.split() for line in lines[3:-1]}
    assert row["embed.weight"][1:5] == ["4096x128", "32bit", "offload", "2GiB"]
    assert lines[3 + 0].endswith("optim_bits=32 [manager]")  # StableEmbedding's override, shown as such
    assert row["blocks.0.mlp.0.weight"][2] == "8bit-blockwise" and "lr=0.0001" in lines[lines.index(
        next(x for x in lines if x.startswith("blocks.0.mlp.0.weight")))]
    assert row["blocks.1.mlp.0.weight"][-1] == "-"
    assert lines[-1].startswith("30 parameters in ")
    assert result.stderr == ""


def test_cli_check_reports_errors_with_exit_status_1(tmp_path, capsys):
    bad = write(tmp_path, "bad.yaml", "optimizer: {name: AdamW8bit, lr: -1.0, weigth_decay: 0.1}\n")
    assert cli_main(["config", "check", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"{bad}: optimizer.weigth_decay: unknown key 'weigth_decay' (did you mean 'weight_decay'?) (got 0.1)"]
    assert cli_main(["config", "check", str(ROOT / "examples" / "config.yaml")]) == 0
    assert capsys.readouterr().out.endswith("config.yaml: valid (PagedAdamW8bit, 4 override rules)\n")


def test_cli_check_module_factory_and_usage_errors(tmp_path, capsys):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def build():\n    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))\n"
        "def broken():\n    raise RuntimeError('no weights here')\n"
        "def not_a_model():\n    return 3\n")
    config = write(tmp_path, "c.yaml", "optimizer: AdamW8bit\noverrides: [{match: '*.bias', set: {weight_decay: 0.0}}]\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert cli_main(["config", "check", str(config), "--model", "my_models:build"]) == 0
        out = capsys.readouterr().out
        rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[3:-1]}
        assert rows["0.weight"] == ["64x64", "8bit-blockwise", "off", "-", "-"]
        assert rows["1.bias"] == ["2", "32bit", "off", "0", "weight_decay=0"]
        assert cli_main(["config", "check", str(config), "--model", "my_models:broken"]) == 2
        assert "the factory raised RuntimeError: no weights here" in capsys.readouterr().err
        assert cli_main(["config", "check", str(config), "--model", "my_models:not_a_model"]) == 2
        assert "returned int, not a torch.nn.Module" in capsys.readouterr().err
        assert cli_main(["config", "check", str(config), "--model", "no_such_module:build"]) == 2
        assert "cannot import 'no_such_module'" in capsys.readouterr().err
        assert cli_main(["config", "check", str(config), "--model", "nocolon"]) == 2
        assert "expected MODULE:FACTORY" in capsys.readouterr().err
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_models", None)


def test_cli_check_strict_flag_turns_unmatched_rules_into_errors(tmp_path, capsys):
    config = write(tmp_path, "c.yaml", "optimizer: AdamW8bit\noverrides: [{module: Conv2d, set: {lr: 0.1}}]\n")
    model = str(ROOT / "examples" / "tiny_model.py") + ":build"
    assert cli_main(["config", "check", str(config), "--model", model]) == 0
    assert f"warning: {config}: overrides[0]: rule (module: 'Conv2d') matches no" in capsys.readouterr().err
    assert cli_main(["config", "check", str(config), "--model", model, "--strict"]) == 1
    assert f"{config}: overrides[0]: rule (module: 'Conv2d') matches no" in capsys.readouterr().err


def test_cli_schema_is_valid_json_schema_that_accepts_the_example():
    result = run_cli("config", "schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema == json.loads(json.dumps(json_schema()))
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    example = read_document(EXAMPLE)  # YAML 1.2 numbers, as editors' YAML servers read them
    assert list(validator.iter_errors(example)) == []
    example["overrides"][0]["set"]["weigth_decay"] = 0.0
    example["paging"]["device_budget_bytes"] = "2GiB"
    assert [e.message for e in validator.iter_errors(example)] == [
        "Additional properties are not allowed ('weigth_decay' was unexpected)"]


def test_cli_config_without_action_prints_usage(capsys):
    assert cli_main(["config"]) == 2
    assert "check" in capsys.readouterr().err
