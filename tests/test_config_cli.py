"""Config files from the command line and the shipped example: ``pagedopt config check`` (with
and without a model, errors, strictness), ``pagedopt config schema`` (a JSON Schema that
accepts the example), and examples/config.yaml matching the example model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pagedopt.cli import main as cli_main
from pagedopt.config import ConfigWarning, build_optimizer, json_schema, resolve
from pagedopt.config.files import read_document

from config_helpers import write

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "config.yaml"


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
