"""Loading and validating config files: formats (YAML, TOML, JSON), errors naming the file, key
path and value (in a file, in a combination of rules, in build_optimizer's arguments), warnings
and strictness for rules that match nothing, and property tests that any document or text
either loads (and builds) or raises ConfigError."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pagedopt
from pagedopt.config import (
    ConfigError, ConfigWarning, PagedoptConfig, build_optimizer, load_config, validate_document,
)
from pagedopt.config.files import read_document
from pagedopt.config.optimizers import setting_names

from config_helpers import Net, step, write


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
