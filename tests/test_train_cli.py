"""The main job's command line, ``pagedopt train``: console output (live on a terminal, plain
lines elsewhere), flags and their errors, the JSON summary and ``--save``, an optimizer config
file (``--config``), metrics (``--metrics-port``, the file's telemetry section) and SIGTERM.

Runs use the "tiny" model on a small slice of the standard library (see train_helpers.py).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagedopt.cli import main as cli_main
from pagedopt.train import TrainConfig, train
from pagedopt.train.loop import Callback
from pagedopt.train.model import DecoderLM, ModelConfig
from pagedopt.train.optimizers import build_optimizer
from pagedopt.train.progress import ConsoleReporter

from train_helpers import REPO_ROOT, TINY_FLAGS, read_until, free_port, scrape, tiny


# -- console output ---------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_progress_on_a_terminal_and_plain_lines_elsewhere():
    term, pipe = FakeTerminal(), io.StringIO()
    train(tiny(steps=4, log_every=2, progress="auto"), [], stream=term)
    train(tiny(steps=4, log_every=2, progress="auto"), [], stream=pipe)
    assert "\r" in term.getvalue() and "\x1b[K" in term.getvalue()
    assert "\r" not in pipe.getvalue() and "\x1b" not in pipe.getvalue()
    lines = pipe.getvalue().splitlines()
    progress = [line for line in lines if line.startswith("step ")]
    assert [p.split()[1] for p in progress] == ["2/4", "4/4"]
    assert all(" loss=" in p and " tok/s=" in p for p in progress)
    # The terminal keeps the same permanent lines, each replacing the live line.
    assert [line.split("\r")[-1].replace("\x1b[K", "").split()[1] for line in term.getvalue().split("\n")
            if "step " in line and "eval" not in line] == ["2/4", "4/4"]


def test_reporter_mode_is_explicit_when_asked():
    assert ConsoleReporter("lines", FakeTerminal()).live is False
    assert ConsoleReporter("live", io.StringIO()).live is True


# -- the command line ----------------------------------------------------------------------


def test_cli_subprocess_prints_lines_summary_and_json(tmp_path):
    summary_path = tmp_path / "out" / "summary.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pagedopt", "train", "--steps", "30", *TINY_FLAGS, "--json", str(summary_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "\r" not in out  # not a terminal: plain lines
    progress = [line for line in out.splitlines() if line.startswith("step ")]
    assert [p.split()[1] for p in progress] == [f"{s}/30" for s in range(3, 31, 3)]
    losses = [float(p.split("loss=")[1].split()[0]) for p in progress]
    assert losses[-1] < losses[0] - 1.0
    summary = json.loads(summary_path.read_text())
    assert summary["steps_completed"] == 30 and summary["optimizer"] == "AdamW8bit"
    assert f"final loss: train={summary['final_train_loss']:.4f}" in out
    assert f"val={summary['final_val_loss']:.4f}" in out
    state = summary["optimizer_state"]
    assert f"optimizer state (AdamW8bit): {state['total_bytes']:,} bytes" in out
    by_precision = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  ")}
    for precision, nbytes in state["bytes_by_precision"].items():
        assert f" {nbytes:,} bytes" in by_precision[precision]
    assert set(state["bytes_by_precision"]) == {"8bit-blockwise", "32bit"}
    assert f"fp32 states would take {state['fp32_equivalent_bytes']:,} bytes" in out
    assert f"{state['saving_ratio']:.2f}x" in out
    assert state["fp32_equivalent_bytes"] == 8 * summary["num_parameters"]
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 1.5


@pytest.mark.parametrize(
    "flags, message",
    [(["--steps", "0"], "--steps 0: must be an integer >= 1"),
     (["--optimizer", "adamw9bit"], "--optimizer adamw9bit: unknown optimizer; expected one of Adam,"),
     (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "cuda:999"], "--device cuda:"),
     (["--device", "banana"], "--device banana: not a torch device"),
     (["--percentile-clipping", "0"], "--percentile-clipping 0: must be an integer in 1..100"),
     (["--lr", "-1"], "--lr -1.0: must be > 0"),
     (["--data", "/no/such/dir"], "data: '/no/such/dir' does not exist"),
     (["--seq-len", "5000000"], "split has"),
     (["--json", "/proc/no/such.json"], "--json /proc/no/such.json: cannot write there")],
)
def test_cli_bad_values_exit_2_with_the_flag_named(flags, message, capsys):
    assert cli_main(["train", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pagedopt train: error: ") and message in err


@pytest.mark.parametrize("flags, message", [(["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
                                            (["--model-size", "huge"], "argument --model-size: invalid choice"),
                                            (["--no-such-flag"], "unrecognized arguments: --no-such-flag")])
def test_cli_malformed_flags_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["train", *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_cli_save_loads_with_weights_only(tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    assert cli_main(["train", "--steps", "2", *TINY_FLAGS, "--progress", "off", "--save", str(path)]) == 0
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["optimizer"] == "AdamW8bit"
    model = DecoderLM(ModelConfig(d_model=64, layers=2, heads=2, max_seq_len=64))
    model.load_state_dict(ckpt["model"])
    opt = build_optimizer(model, TrainConfig(**ckpt["config"]))
    opt.load_state_dict(ckpt["optimizer"])
    assert opt.state[model.blocks[0].mlp.up.weight]["state1"].dtype == torch.uint8


# -- --config: an optimizer config file under the command line -----------------------------

CONFIG_YAML = """\
optimizer: {name: Lion8bit, lr: 2.0e-4, weight_decay: 0.05}
overrides:
  - match: "*.bias"
    set: {weight_decay: 0.0}
  - module: LayerNorm
    set: {lr: 1.0e-4, weight_decay: 0.0}
  - match: head.weight
    set: {optim_bits: 32}
"""


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


class GrabOptimizer(Callback):
    """Per parameter name: (base lr, weight decay, percentile clipping, state precision)."""

    def __init__(self):
        self.by_name, self.type = {}, None

    def on_train_end(self, run, result):
        self.type = type(run.optimizer).__name__
        precision = {r.name: r.precision for r in run.optimizer.memory_report().rows}
        for g in run.optimizer.param_groups:
            for name in g["param_names"]:
                self.by_name[name] = (g["initial_lr"], g["weight_decay"], g["percentile_clipping"], precision[name])


def test_config_file_rules_apply_by_name_and_its_lr_is_not_replaced_by_the_family_default(tmp_path):
    path = write(tmp_path / "opt.yaml", CONFIG_YAML)
    grab = GrabOptimizer()
    result = train(tiny(steps=2, config_file=path), [grab])
    assert grab.type == "Lion8bit" and result.optimizer == "Lion8bit"
    # The file's lr 2e-4, not Lion's default 1e-3; the main job's clipping default fills in.
    assert grab.by_name["blocks.0.attn.qkv.weight"] == (2e-4, 0.05, 95, "8bit-blockwise")
    assert grab.by_name["blocks.0.attn.qkv.bias"] == (2e-4, 0.0, 95, "32bit")  # rule 0
    assert grab.by_name["blocks.1.ln_mlp.weight"] == (1e-4, 0.0, 95, "32bit")  # rule 1
    assert grab.by_name["head.weight"][3] == "32bit"  # rule 2: 256 x 64 would be 8-bit
    assert grab.by_name["token_embedding.weight"][3] == "32bit"  # StableEmbedding, as without a file
    assert result.lr == 2e-4 and result.weight_decay == 0.05


def test_config_file_values_yield_only_to_values_given_explicitly(tmp_path):
    path = write(tmp_path / "opt.yaml", CONFIG_YAML)
    grab = GrabOptimizer()
    train(tiny(steps=1, config_file=path, optimizer="adamw8bit", lr=1e-3, percentile_clipping=90), [grab])
    assert grab.type == "AdamW8bit"
    assert grab.by_name["blocks.0.mlp.up.weight"][:3] == (1e-3, 0.05, 90)  # flags over the section
    assert grab.by_name["ln_final.weight"][:3] == (1e-4, 0.0, 90)  # the rule still wins for its lr

    bare = write(tmp_path / "bare.toml", '[optimizer]\nname = "AdamW8bit"\n')
    cfg = TrainConfig(config_file=bare)
    # Silent file: the main job's per-family lr; weight decay is the class's (rules decide per parameter).
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.percentile_clipping) == ("AdamW8bit", None, 0.01, 95)
    from pagedopt.train.optimizers import resolved_lr
    assert resolved_lr(cfg) == 3e-3


def test_cli_config_runs_and_records_the_file(tmp_path, capsys):
    path = write(tmp_path / "opt.yaml", CONFIG_YAML)
    summary_path = tmp_path / "summary.json"
    assert cli_main(["train", "--config", path, "--steps", "3", *TINY_FLAGS, "--progress", "lines",
                     "--json", str(summary_path)]) == 0
    out = capsys.readouterr().out
    assert f"config    {path}: 3 override rules" in out and "optimizer Lion8bit, lr 2.00e-04" in out
    summary = json.loads(summary_path.read_text())
    assert summary["config"]["config_file"] == path and summary["optimizer"] == "Lion8bit"
    assert summary["lr"] == 2e-4 and summary["config"]["percentile_clipping"] == 95
    assert cli_main(["train", "--config", path, "--lr", "0.003", "--steps", "1", *TINY_FLAGS, "--progress", "off",
                     "--json", str(summary_path)]) == 0
    assert json.loads(summary_path.read_text())["lr"] == 3e-3


def test_cli_config_rule_matching_nothing_warns_or_fails_under_strict(tmp_path, capsys):
    text = "optimizer: AdamW8bit\noverrides:\n  - {match: '*.no_such', set: {lr: 1.0e-4}}\n"
    path = write(tmp_path / "loose.yaml", text)
    assert cli_main(["train", "--config", path, "--steps", "1", *TINY_FLAGS, "--progress", "off"]) == 0
    err = capsys.readouterr().err
    assert f"pagedopt train: warning: {path}: overrides[0]: rule (match: '*.no_such') matches no trainable " \
           "parameter of DecoderLM" in err
    strict = write(tmp_path / "strict.yaml", text + "strict: true\n")
    assert cli_main(["train", "--config", strict, "--steps", "1", *TINY_FLAGS, "--progress", "off"]) == 2
    err = capsys.readouterr().err
    assert f"pagedopt train: error: {strict}: overrides[0]: rule (match: '*.no_such') matches no" in err


@pytest.mark.parametrize(
    "text, flags, message",
    [("optimizer: {name: AdamW8bit, lr: -1.0}\n", [], "{path}: optimizer.lr: Invalid lr: -1.0"),
     ("optimizer: {name: AdamW8bit, weigth_decay: 0.1}\n", [], "optimizer.weigth_decay: unknown key 'weigth_decay' "
                                                              "(did you mean 'weight_decay'?)"),
     ("optimizer: AdamW8bit\noverrides: [{match: '*', set: {nesterov: true}}]\n", [],
      "overrides[0].set.nesterov: AdamW8bit has no setting 'nesterov'"),
     ("optimizer: AdamW8bit\n", ["--optimizer", "torch-adamw"], "--config {path}: configures a pagedopt optimizer"),
     (None, [], "{path}: cannot read the file")],
)
def test_cli_bad_config_files_exit_2_naming_file_key_and_value(tmp_path, capsys, text, flags, message):
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    assert cli_main(["train", "--config", str(path), *flags, "--steps", "1", *TINY_FLAGS]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pagedopt train: error: ") and message.format(path=path) in err


def test_metrics_settings_flags_over_the_file_telemetry_section():
    from pagedopt.cli import build_parser
    from pagedopt.commands.train import metrics_settings
    from pagedopt.config import TelemetryConfig

    def settings(flags, telemetry=None):
        ns = metrics_settings(build_parser().parse_args(["train", *flags]), telemetry)
        return ns.metrics_port, ns.metrics_addr, ns.metrics_top_k, ns.linger

    file = TelemetryConfig(port=9470, addr="0.0.0.0", top_k=5)
    assert settings([]) == (None, "127.0.0.1", 20, 0.0)  # metrics off by default
    assert settings([], file) == (9470, "0.0.0.0", 5, 0.0)
    assert settings(["--metrics-port", "9500", "--metrics-addr", "127.0.0.1", "--linger", "2"], file) == \
        (9500, "127.0.0.1", 5, 2.0)
    assert settings([], TelemetryConfig(enabled=False, port=9470)) == (None, "127.0.0.1", 20, 0.0)
    assert settings(["--metrics-port", "9501"], TelemetryConfig(enabled=False))[0] == 9501


def test_metrics_from_the_config_file_serve_live_clipping_statistics(tmp_path, capsys):
    """The file's telemetry section starts the exporter; with the default percentile clipping
    the clipping series have values (scraped at the end of training, before the endpoint closes)."""
    from pagedopt.commands.train import ReportedMetrics
    from pagedopt.telemetry.training import MetricsCallback

    port = free_port()
    path = write(tmp_path / "opt.yaml", f"optimizer: AdamW8bit\ntelemetry: {{port: {port}}}\n")
    assert cli_main(["train", "--config", path, "--steps", "2", *TINY_FLAGS, "--progress", "lines"]) == 0
    assert f"  metrics   http://127.0.0.1:{port}/metrics" in capsys.readouterr().out

    seen = {}

    class ScrapeAtEnd(Callback):
        def on_train_end(self, run, result):
            seen.update(scrape(port))

    metrics = MetricsCallback(port=port)
    train(tiny(steps=3), [ScrapeAtEnd(), ReportedMetrics(metrics)])
    assert metrics.exporter is None  # closed at the end
    values = {k.split("{")[0]: v for k, v in seen.items()}
    assert values["pagedopt_steps_total"] == 3
    assert values["pagedopt_clip_threshold"] > 0 and "pagedopt_clipped_updates_total" in values
    assert any(k.startswith("pagedopt_param_clip_threshold{") for k in seen)


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pagedopt", "train", *args], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def test_sigterm_stops_training_like_ctrl_c_and_ends_a_linger_cleanly():
    # During training: stop after the step, evaluate, report, exit 130.
    proc = _start(["--steps", "100000", *TINY_FLAGS, "--log-every", "1"])
    read_until(proc, r"^step 2/")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert re.search(r"^interrupted: \d+/100000 steps", out, re.M) and "fp32 states would take" in out
    # During the linger: training is done, so the exit code is 0.
    proc = _start(["--steps", "2", *TINY_FLAGS, "--metrics-port", str(free_port()), "--linger", "600"])
    read_until(proc, r"^serving the final metrics for 600 s")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
