"""Bounded config loading: alias expansion, depth, rule count and file size are capped with
errors naming the file (and line or key), and a large legitimate file still loads quickly."""

from __future__ import annotations

import json
import time

import pytest

import pagedopt
from pagedopt.config import ConfigError, files, load


def _laughs(levels: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\noptimizer: {name: AdamW8bit}\n"


@pytest.mark.parametrize("levels", [8, 12])
def test_yaml_alias_bombs_are_refused_at_once(tmp_path, levels):
    # 9**8 = 43M values from ~400 bytes: refused on the node graph before anything is built.
    path = tmp_path / "laughs.yaml"
    path.write_text(_laughs(levels))
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"laughs.yaml: line \d+, column \d+: the document expands to more than"):
        pagedopt.load_config(path)
    assert time.perf_counter() - started < 5.0  # the old loader took 18 s (and 876 MB) at 7 levels


def test_modest_aliases_still_work(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("common: &wd {weight_decay: 0.0}\noptimizer: {name: AdamW8bit}\n"
                    "overrides:\n  - {match: '*.bias', set: *wd}\n  - {match: '*norm*', set: *wd}\n")
    with pytest.raises(ConfigError, match="common"):  # the anchor's host key is not a section
        pagedopt.load_config(path)
    path.write_text("optimizer: {name: AdamW8bit}\noverrides:\n  - {match: '*.bias', set: &wd {weight_decay: 0.0}}\n"
                    "  - {match: '*norm*', set: *wd}\n")
    assert [r.set.given() for r in pagedopt.load_config(path).overrides] == [{"weight_decay": 0.0}] * 2


def test_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("optimizer: &a {name: AdamW8bit, x: [*a]}\n")
    with pytest.raises(ConfigError, match="loop.yaml: .*(recursive|nested more than)"):
        pagedopt.load_config(path)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_nesting_depth_is_capped(tmp_path, suffix):
    deep = {"optimizer": {"name": "AdamW8bit"}, "telemetry": {}}
    node = deep["telemetry"]
    for _ in range(files.MAX_DEPTH + 5):
        node["k"] = {}
        node = node["k"]
    path = tmp_path / f"deep{suffix}"
    path.write_text(json.dumps(deep))  # JSON is valid YAML flow syntax
    with pytest.raises(ConfigError, match=rf"deep{suffix}: .*nested more than {files.MAX_DEPTH} levels"):
        pagedopt.load_config(path)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_rule_count_is_capped(tmp_path, monkeypatch, suffix):
    monkeypatch.setattr(files, "MAX_RULES", 5)
    doc = {"optimizer": {"name": "AdamW8bit"},
           "overrides": [{"match": f"layer{i}.*", "set": {"lr": 1e-4}} for i in range(6)]}
    path = tmp_path / f"rules{suffix}"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=rf"rules{suffix}: .*overrides.*6 rules, more than the limit of 5"):
        pagedopt.load_config(path)
    doc["overrides"] = doc["overrides"][:5]
    path.write_text(json.dumps(doc))
    assert len(pagedopt.load_config(path).overrides) == 5


def test_file_size_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "MAX_FILE_BYTES", 100)
    path = tmp_path / "big.yaml"
    path.write_text("optimizer: {name: AdamW8bit}\n" + "# padding\n" * 20)
    with pytest.raises(ConfigError, match=r"big.yaml: the file has 2\d\d bytes, more than the limit of 100"):
        pagedopt.load_config(path)


def test_syntax_errors_keep_pyyaml_messages(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optimizer: {name: AdamW\n")
    with pytest.raises(ConfigError, match="line 2, column 1: invalid YAML: expected ',' or '}'"):
        pagedopt.load_config(path)


@pytest.mark.slow
def test_a_10_mb_config_loads_in_under_10_seconds(tmp_path):
    """10,000 rules (the cap) with ~1 KB glob patterns: 10 MB. Measured 8.0 s on a shared
    2-core machine at load average 14 (about 1.5 s quiet); the old loader compiled every
    pattern and probed an optimizer per rule (over 2 minutes)."""
    lines = ["optimizer: {name: AdamW8bit, lr: 1.0e-3}", "overrides:"]
    pad = "x" * 1000
    lines += [f"  - {{match: 'layers.{i}.{pad}*', set: {{lr: 1.0e-4}}}}" for i in range(files.MAX_RULES)]
    path = tmp_path / "big.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size > 10_000_000
    started = time.perf_counter()
    config = pagedopt.load_config(path)
    assert len(config.overrides) == files.MAX_RULES
    assert time.perf_counter() - started < 10.0


@pytest.mark.slow
def test_a_10_mb_file_of_200k_rules_is_refused_in_under_10_seconds(tmp_path):
    """A large file's rule list is counted from the parser's events and refused at rule
    MAX_RULES + 1, before the rest of the file is composed (it took 33-57 s to compose)."""
    lines = ["optimizer: {name: AdamW8bit, lr: 1.0e-3}", "overrides:"]
    lines += [f"  - {{match: 'layers.{i}.x*', set: {{lr: 1.0e-4}}}}" for i in range(200_000)]
    path = tmp_path / "rules.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size > 9_000_000
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"rules.yaml: line {files.MAX_RULES + 3}, column \d+: overrides: more than "
                                          rf"the limit of {files.MAX_RULES:,} rules"):
        pagedopt.load_config(path)
    assert time.perf_counter() - started < 10.0


def test_event_prescan_counts_only_the_top_level_rule_list(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "MAX_RULES", 3)
    monkeypatch.setattr(files, "PRESCAN_BYTES", 0)  # prescan every file
    ok = ("optimizer: {name: AdamW8bit, overrides: [1, 2, 3, 4, 5]}\n"  # a nested 'overrides' is not the list
          "paging: [a, b, c, d]\n"
          "overrides:\n" + "".join(f"  - {{match: 'l{i}.*', set: {{lr: 1.0e-4}}}}\n" for i in range(3)))
    files.prescan_rule_count(ok)  # three rules: within the limit
    with pytest.raises(files._LimitExceeded, match="more than the limit of 3 rules"):
        files.prescan_rule_count(ok + "  - {match: 'l3.*', set: {lr: 1.0e-4}}\n")
    path = tmp_path / "four.yaml"
    path.write_text("optimizer: {name: AdamW8bit}\noverrides: [{match: a, set: {lr: 0.1}}, {match: b, set: {lr: 0.1}},"
                    " {match: c, set: {lr: 0.1}}, {match: d, set: {lr: 0.1}}]\n")
    with pytest.raises(ConfigError, match=r"four.yaml: line 2, column \d+: overrides: more than the limit of 3 rules"):
        pagedopt.load_config(path)
