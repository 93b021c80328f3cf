"""The main job, ``pagedopt train``: library function, CLI, corpus, model, output formats.

Runs use the "tiny" model on a small slice of the standard library so the whole file stays
well under two minutes on two cores. Loss thresholds are chosen far from what a working run
reaches (ln 256 = 5.55 nats at initialisation; a working tiny run is near 3 after 30 steps)
and far from what a broken one does (a model that does not learn stays near 5.5).

Also the main job's integration with config files (``--config``), metrics (``--metrics-port``)
and torch.distributed (``--distributed``, ``torchrun`` runs marked ``distributed``).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import pagedopt
from pagedopt.cli import main as cli_main
from pagedopt.optim import ALGORITHMS
from pagedopt.train import TrainConfig, TrainConfigError, train
from pagedopt.train.data import BatchSampler, DataError, eval_batches, list_files, load_corpus
from pagedopt.train.loop import Callback, lr_schedule
from pagedopt.train.model import DecoderLM, ModelConfig
from pagedopt.train.optimizers import build_optimizer, param_groups, state_memory
from pagedopt.train.progress import ConsoleReporter

REPO_ROOT = Path(__file__).resolve().parents[1]
INITIAL_LOSS = math.log(256)  # uniform prediction over bytes

# The small run most tests share: 137k parameters, 8-bit state for every weight matrix. One
# thread: at this size a second one gains little, and on a busy machine two spinning OpenMP
# threads per process slow a run down by an order of magnitude.
TINY = dict(model_size="tiny", seq_len=64, batch_size=8, max_corpus_bytes=400_000, eval_batches=2,
            progress="off", threads=1)
TINY_FLAGS = ["--model-size", "tiny", "--seq-len", "64", "--batch-size", "8", "--max-corpus-bytes", "400000",
              "--eval-batches", "2", "--threads", "1"]


def tiny(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, **overrides})


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("steps", 0), ("steps", 2.5), ("batch_size", -1), ("seq_len", 0), ("lr", -1e-3), ("lr", float("nan")),
     ("weight_decay", -0.1), ("percentile_clipping", 0), ("percentile_clipping", 101), ("model_size", "huge"),
     ("embedding", "fancy"), ("progress", "loud"), ("amp", "fp8"), ("val_fraction", 1.0), ("seed", -3),
     ("optimizer", "adamw9bit"), ("heads", 0), ("max_grad_norm", float("inf"))],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(TrainConfigError) as info:
        TrainConfig(**{field: value})
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}={value!r}: ")


def test_config_cross_field_checks():
    with pytest.raises(TrainConfigError, match="d_model=100: must be divisible by heads"):
        TrainConfig(d_model=100, heads=3)
    with pytest.raises(TrainConfigError, match="needs a pagedopt optimizer"):
        TrainConfig(optimizer="torch-adamw", percentile_clipping=5)


def test_config_optimizer_names_are_case_insensitive_and_cover_every_class():
    assert TrainConfig(optimizer="pagedlion8bit").optimizer == "PagedLion8bit"
    assert TrainConfig(optimizer="TORCH-ADAMW").optimizer == "torch-adamw"
    for name in pagedopt.optim.OPTIMIZER_NAMES:
        assert TrainConfig(optimizer=name.upper()).optimizer == name


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = lr_schedule(TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1))
    values = [f(i) for i in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # monotone decay after warm-up
    assert values[100] == pytest.approx(0.1)


# -- data -------------------------------------------------------------------------------------


def test_stdlib_corpus_is_deterministic_capped_and_split_by_file():
    a = load_corpus(max_bytes=300_000, val_fraction=0.1)
    b = load_corpus(max_bytes=300_000, val_fraction=0.1)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.split == "by file" and a.val_files >= 1 and a.train_files >= 1
    # The cap counts file bytes; the blank-line separators between files add a few more.
    separators = 2 * (a.train_files + a.val_files - 2)
    assert len(a.train) + len(a.val) == 300_000 + separators
    assert 0.05 < len(a.val) / 300_000 < 0.5
    assert b"def " in bytes(a.train[:200_000].tolist())  # it is Python source


def test_list_files_skips_third_party_and_caches(tmp_path):
    for rel in ["a.py", "pkg/b.py", "pkg/c.txt", "site-packages/numpy/x.py", "__pycache__/a.cpython-311.pyc",
                "dist-packages/y.py"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    assert sorted(rel for rel, _ in list_files(tmp_path, "*.py")) == ["a.py", "pkg/b.py"]


def test_corpus_from_a_directory_and_from_a_single_file(tmp_path):
    for i in range(12):
        (tmp_path / f"m{i}.txt").write_bytes(bytes([65 + i]) * 1000)
    corpus = load_corpus(tmp_path, pattern="*.txt", max_bytes=10_000, val_fraction=0.2)
    assert corpus.split == "by file" and corpus.train_files + corpus.val_files == 10
    train_letters, val_letters = set(corpus.train.tolist()) - {10}, set(corpus.val.tolist()) - {10}
    assert train_letters and val_letters and not train_letters & val_letters  # no file in both splits

    single = tmp_path / "m0.txt"
    corpus = load_corpus(single, max_bytes=10_000, val_fraction=0.25)
    assert corpus.split == "by bytes" and (len(corpus.train), len(corpus.val)) == (750, 250)


def test_corpus_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(tmp_path / "missing")
    with pytest.raises(DataError, match=r"no files matching '\*\.py'"):
        load_corpus(tmp_path)
    (tmp_path / "small.py").write_text("x = 1\n" * 10)
    with pytest.raises(DataError, match="the train split has .* fewer than seq_len"):
        train(tiny(data=str(tmp_path / "small.py"), steps=1))


def test_batches_are_shifted_windows_of_the_data_and_seeded_per_rank():
    data = torch.randint(0, 256, (5000,), dtype=torch.uint8)
    x, y = BatchSampler(data, batch_size=4, seq_len=32, seed=3).next_batch()
    assert x.dtype == torch.long and x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):
        start = next(s for s in range(len(data) - 32) if torch.equal(data[s:s + 32].long(), row_x))
        assert torch.equal(data[start + 1:start + 33].long(), row_y)
    again, _ = BatchSampler(data, batch_size=4, seq_len=32, seed=3).next_batch()
    other_rank, _ = BatchSampler(data, batch_size=4, seq_len=32, seed=3, rank=1).next_batch()
    assert torch.equal(x, again) and not torch.equal(x, other_rank)
    fixed = eval_batches(data, batch_size=4, seq_len=32, num_batches=3)
    assert len(fixed) == 3 and fixed[0][0][0, 0] == data[0] and fixed[-1][1][-1, -1] == data[-1]


# -- model and optimizer --------------------------------------------------------------------


def test_attention_is_causal():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(d_model=32, layers=2, heads=4, max_seq_len=16)).eval()
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :10], b[:, :10])  # earlier positions cannot see position 10
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_tied_head_and_stable_embedding_state_precision():
    model = DecoderLM(ModelConfig(d_model=64, layers=1, heads=2, max_seq_len=32, tie_weights=True))
    assert model.head.weight is model.token_embedding.weight
    assert isinstance(model.token_embedding, pagedopt.StableEmbedding)
    groups = param_groups(model, weight_decay=0.1)
    decayed = [n for n, _ in groups[0]["params"]]
    assert decayed == ["blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.up.weight",
                       "blocks.0.mlp.down.weight"]  # no embeddings (tied head included), norms or biases
    opt = build_optimizer(model, TrainConfig(optimizer="AdamW8bit"))
    model.loss(torch.randint(0, 256, (2, 32)), torch.randint(0, 256, (2, 32))).backward()
    opt.step()
    precision = {r.name: r.precision for r in opt.memory_report().rows}
    assert precision["token_embedding.weight"] == "32bit"  # StableEmbedding's override
    assert precision["position_embedding.weight"] == "32bit"  # 32 x 64 = 2048 < min_8bit_size
    assert precision["blocks.0.attn.qkv.weight"] == "8bit-blockwise"


# -- training through the library -----------------------------------------------------------


def test_training_reduces_loss_and_reports_8bit_state_memory():
    result = train(tiny(steps=30))
    assert result.steps_completed == 30 and len(result.train_losses) == 30
    assert result.initial_val_loss == pytest.approx(INITIAL_LOSS, abs=0.1)
    assert result.final_val_loss < INITIAL_LOSS - 1.5
    assert sum(result.train_losses[-5:]) / 5 < sum(result.train_losses[:5]) / 5 - 1.5
    memory = result.memory
    assert memory.bytes_by_precision["8bit-blockwise"] > 0 and memory.bytes_by_precision["32bit"] > 0
    # AdamW: two fp32 states per parameter element would be 8 bytes each.
    assert memory.fp32_equivalent_bytes == 8 * result.num_parameters
    assert sum(memory.parameters_by_precision.values()) == result.num_parameters
    assert 2.5 < memory.saving_ratio < 4.0
    assert result.tokens == 30 * 8 * 64 and result.tokens_per_second > 0


def test_state_memory_equals_what_the_optimizer_allocated():
    model = DecoderLM(ModelConfig(d_model=64, layers=1, heads=2, max_seq_len=32))
    opt = build_optimizer(model, TrainConfig(optimizer="AdamW8bit"))
    model.loss(torch.randint(0, 256, (2, 32)), torch.randint(0, 256, (2, 32))).backward()
    opt.step()
    allocated = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items()
                    if isinstance(t, torch.Tensor) and k in ("state1", "state2", "absmax1", "absmax2", "gnorm_vec"))
    assert all("gnorm_vec" in s for s in opt.state.values())  # percentile clipping is on by default
    memory = state_memory(opt)
    assert sum(memory.bytes_by_precision.values()) == allocated
    assert memory.total_bytes == allocated + memory.shared_bytes


def test_same_seed_same_run_other_seed_other_run():
    a = train(tiny(steps=4))
    b = train(tiny(steps=4))
    c = train(tiny(steps=4, seed=1))
    assert a.train_losses == b.train_losses and a.final_val_loss == b.final_val_loss
    assert a.train_losses != c.train_losses


def test_threads_setting_is_restored_after_the_run():
    before = torch.get_num_threads()
    train(tiny(steps=1, threads=before + 1))
    assert torch.get_num_threads() == before


def test_paged_optimizer_summary_shows_residency():
    out = io.StringIO()
    result = train(tiny(steps=2, optimizer="PagedAdamW8bit", progress="lines"), stream=out)
    memory = result.memory
    assert memory.paged and sum(memory.bytes_by_residency.values()) == sum(memory.bytes_by_precision.values())
    residency_line = next(line for line in out.getvalue().splitlines() if line.startswith("  residency:"))
    for place, nbytes in memory.bytes_by_residency.items():
        assert f"{place} {nbytes:,} bytes" in residency_line


def test_torch_baseline_reports_fp32_state():
    result = train(tiny(steps=3, optimizer="torch-adamw"))
    memory = result.memory
    assert memory.bytes_by_precision == {"32bit": 8 * result.num_parameters}
    assert memory.bytes_by_residency == {"cpu": 8 * result.num_parameters} and not memory.paged
    assert memory.fp32_equivalent_bytes == 8 * result.num_parameters and memory.saving_ratio == 1.0


@pytest.mark.parametrize("given, expected", [(5, 5), (None, 95)])
def test_percentile_clipping_reaches_the_optimizer(given, expected):
    # Default on (95): the clipping metrics of the telemetry are live in a default run.
    seen = {}

    class Grab(Callback):
        def on_train_end(self, run, result):
            seen["groups"] = [g["percentile_clipping"] for g in run.optimizer.param_groups]
            seen["has_history"] = all("gnorm_vec" in s for s in run.optimizer.state.values())

    out = io.StringIO()
    train(tiny(steps=2, percentile_clipping=given, progress="lines"), [Grab()], stream=out)
    assert seen == {"groups": [expected, expected], "has_history": True}
    assert f"percentile clipping {expected}" in out.getvalue()


def test_percentile_clipping_default_is_off_only_for_the_torch_baseline():
    assert TrainConfig().percentile_clipping == 95
    assert TrainConfig(optimizer="torch-adamw").percentile_clipping == 100
    assert TrainConfig(optimizer="lion8bit", percentile_clipping=100).percentile_clipping == 100


def test_callbacks_see_every_step_and_eval_in_order():
    events = []

    class Record(Callback):
        def on_train_start(self, run):
            events.append("start")

        def on_step_end(self, run, info):
            assert info.loss.dim() == 0 and info.lr > 0 and info.tokens == info.step * 8 * 64
            events.append(info.step)

        def on_eval(self, run, info):
            events.append(f"eval{info.step}")

        def on_train_end(self, run, result):
            events.append("end")

    train(tiny(steps=5, eval_every=2), [Record()])
    assert events == ["start", "eval0", 1, 2, "eval2", 3, 4, "eval4", 5, "eval5", "end"]


def test_ctrl_c_stops_the_run_and_still_reports():
    class Interrupt(Callback):
        def on_step_end(self, run, info):
            if info.step == 3:
                raise KeyboardInterrupt

    out = io.StringIO()
    result = train(tiny(steps=10, progress="lines", log_every=1), [Interrupt()], stream=out)
    assert result.interrupted and result.steps_completed == 3 and len(result.train_losses) == 3
    assert [e.step for e in result.evals] == [0, 3]
    assert "interrupted: 3/10 steps" in out.getvalue() and "final loss: train=" in out.getvalue()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_optimizer_family_trains_with_its_default_lr(algorithm):
    # 8-bit variants (the point of the library); the default lr table must suit each family.
    result = train(tiny(steps=25, optimizer=f"{algorithm}8bit"))
    assert math.isfinite(result.final_val_loss)
    assert result.final_val_loss < INITIAL_LOSS - 0.5, result.train_losses
    assert result.memory.bytes_by_precision.get("8bit-blockwise", 0) + \
        result.memory.bytes_by_precision.get("8bit-tensorwise", 0) > 0


def test_bf16_autocast_runs_on_cpu():
    result = train(tiny(steps=3, amp="bf16"))
    assert all(math.isfinite(x) for x in result.train_losses)


def test_8bit_and_32bit_adamw_end_within_2_percent():
    """Issue 2's bound: a short training run where 8-bit and 32-bit end within 2% of each
    other's loss (statistical tier: quantized state perturbs each update, the run's loss may
    differ, but by far less than the 2% a real defect - e.g. a wrong absmax or a sign flip -
    produces; measured gap ~0.03% for seeds 0-2)."""
    cfg = dict(steps=60, eval_batches=4)
    eight = train(tiny(optimizer="AdamW8bit", **cfg))
    full = train(tiny(optimizer="AdamW32bit", **cfg))
    assert eight.memory.bytes_by_precision.get("8bit-blockwise", 0) > 0
    assert "8bit-blockwise" not in full.memory.bytes_by_precision
    assert full.final_val_loss < INITIAL_LOSS - 2.0  # both really trained
    assert abs(eight.final_val_loss - full.final_val_loss) / full.final_val_loss < 0.02
    assert abs(eight.final_train_loss - full.final_train_loss) / full.final_train_loss < 0.02


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one():
    # fp32 tier: inductor fuses and reorders float32 ops, so losses agree to ~1e-5 relative,
    # not bitwise; a compile that changed the model would differ by far more.
    eager = train(tiny(steps=3))
    compiled = train(tiny(steps=3, compile=True))
    assert compiled.train_losses == pytest.approx(eager.train_losses, rel=1e-3)
    assert compiled.final_val_loss == pytest.approx(eager.final_val_loss, rel=1e-3)


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


def free_port(consecutive: int = 1) -> int:
    """A port p with p .. p + consecutive - 1 free on 127.0.0.1 (for base + LOCAL_RANK)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + consecutive > 65535:
            continue
        try:
            for extra in range(1, consecutive):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + extra))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port range")


def scrape(port: int) -> dict[str, float]:
    """``name{labels}`` -> value of every sample on the endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


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


def _read_until(proc: subprocess.Popen, pattern: str, timeout: float = 120) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    proc.kill()
    pytest.fail(f"no line matching {pattern!r}:\n{''.join(lines)}\n{proc.stderr.read()[-3000:]}")


def test_sigterm_stops_training_like_ctrl_c_and_ends_a_linger_cleanly():
    # During training: stop after the step, evaluate, report, exit 130.
    proc = _start(["--steps", "100000", *TINY_FLAGS, "--log-every", "1"])
    _read_until(proc, r"^step 2/")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert re.search(r"^interrupted: \d+/100000 steps", out, re.M) and "fp32 states would take" in out
    # During the linger: training is done, so the exit code is 0.
    proc = _start(["--steps", "2", *TINY_FLAGS, "--metrics-port", str(free_port()), "--linger", "600"])
    _read_until(proc, r"^serving the final metrics for 600 s")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]


# -- --distributed: DDP and FSDP2 -------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_distributed_world_of_one_trains_like_a_single_process(mode):
    """Without torchrun, --distributed runs as a world of one: the wrapped (DDP) or sharded
    (FSDP2, DTensor parameters) model trains like the plain one. fp32 tier: the same
    arithmetic on the same values, except that FSDP2's DTensor gradient-norm reduction may
    sum in another order (~1e-7 relative); 1e-5 leaves room for float32 rounding over 4
    steps and is far below what a wiring mistake (wrong data, unsynced or unclipped
    gradients) does."""
    plain = train(tiny(steps=4))
    wrapped = train(tiny(steps=4, distributed=mode))
    assert (wrapped.world_size, wrapped.distributed) == (1, mode)
    assert wrapped.train_losses == pytest.approx(plain.train_losses, rel=1e-5)
    assert wrapped.final_val_loss == pytest.approx(plain.final_val_loss, rel=1e-5)
    assert wrapped.memory.bytes_by_precision["8bit-blockwise"] == plain.memory.bytes_by_precision["8bit-blockwise"]
    assert not torch.distributed.is_initialized()  # the world of one was torn down


@pytest.mark.distributed
def test_fsdp_save_path_must_be_a_directory_and_is_checked_before_training(tmp_path, capsys):
    a_file = tmp_path / "ckpt.pt"
    a_file.write_bytes(b"x")
    assert cli_main(["train", "--distributed", "fsdp", "--save", str(a_file), "--steps", "1", *TINY_FLAGS]) == 2
    captured = capsys.readouterr()
    assert f"--save {a_file}: is a file; a sharded (FSDP) checkpoint is a directory" in captured.err
    assert "eval step" not in captured.out and not torch.distributed.is_initialized()
    missing = tmp_path / "new" / "ckpt"
    assert cli_main(["train", "--distributed", "fsdp", "--save", str(missing), "--steps", "1", *TINY_FLAGS,
                     "--progress", "off"]) == 0
    assert (missing / ".metadata").is_file()


def _torchrun_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def _torchrun(nproc: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         "-m", "pagedopt", "train", *args],
        cwd=REPO_ROOT, env=_torchrun_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


TORCHRUN_FLAGS = ["--steps", "5", "--model-size", "tiny", "--seq-len", "64", "--batch-size", "8",
                  "--max-corpus-bytes", "400000", "--eval-batches", "2", "--log-every", "1", "--device", "cpu"]


def _check_torchrun_output(out: str, mode: str) -> list[float]:
    """One header and one summary (rank 0 prints), finite falling losses; returns them."""
    assert out.count("pagedopt train: 5 steps on cpu x 2 ranks") == 1, out
    assert f"({mode}, gloo)" in out
    assert len(re.findall(r"^done: 5/5 steps", out, re.M)) == 1, out
    assert len(re.findall(r"^optimizer state \(AdamW8bit, all 2 ranks", out, re.M)) == 1, out
    losses = [float(m) for m in re.findall(r"^step \d+/5 loss=([0-9.]+)", out, re.M)]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses), out
    assert losses[-1] < losses[0] - 0.2, losses
    return losses


@pytest.mark.distributed
def test_torchrun_fsdp_metrics_per_rank_and_a_resharding_checkpoint(tmp_path):
    """2 ranks of FSDP2 on gloo: one metrics endpoint per rank (base + LOCAL_RANK), the job's
    state memory summed over ranks, and --save as a DCP directory that loads into one process
    and gives the run's final validation loss."""
    port = free_port(consecutive=2)
    summary_path, ckpt = tmp_path / "summary.json", tmp_path / "ckpt"
    # Each rank lingers 8 s after training on its own port: time to scrape both, then the job ends.
    proc = _torchrun(2, "--distributed", "fsdp", *TORCHRUN_FLAGS, "--metrics-port", str(port), "--linger", "8",
                     "--json", str(summary_path), "--save", str(ckpt))
    try:
        lines = _read_until(proc, r"^serving the final metrics")
        ranks = {}
        for local_rank in (0, 1):
            deadline = time.monotonic() + 8
            while True:
                try:
                    samples = scrape(port + local_rank)
                    if samples.get(next((k for k in samples if k.startswith("pagedopt_training_active{")), ""), 1) == 0:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, f"rank {local_rank} never served its final metrics"
                time.sleep(0.2)
            steps_key = next(k for k in samples if k.startswith("pagedopt_steps_total{"))
            ranks[local_rank] = (re.search(r'rank="(\d+)"', steps_key).group(1), samples[steps_key])
        assert ranks == {0: ("0", 5.0), 1: ("1", 5.0)}
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    out = "".join(lines) + out
    _check_torchrun_output(out, "fsdp")
    assert "each holds its shards" in out
    summary = json.loads(summary_path.read_text())
    assert (summary["world_size"], summary["distributed"]) == (2, "fsdp")
    state = summary["optimizer_state"]
    assert sum(state["parameters_by_precision"].values()) == summary["num_parameters"]
    assert state["ranks"] == 2 and not state["replicated"]

    # The DCP checkpoint, loaded into a single process, holds the trained model.
    from pagedopt.distributed import load_checkpoint

    assert (ckpt / ".metadata").is_file()
    model = DecoderLM(ModelConfig(d_model=64, layers=2, heads=2, max_seq_len=64))
    opt = build_optimizer(model, TrainConfig(**summary["config"]))
    extra = load_checkpoint(ckpt, model, opt)
    assert extra["step"] == 5 and extra["config"]["distributed"] == "fsdp"
    # Rows of 64 elements: blocks of the shards are not blocks of the tensor, so DCP stored this
    # state dequantized (docs/distributed.md) and it loads as fp32 into an unsharded optimizer.
    assert opt.state[model.blocks[0].mlp.up.weight]["state1"].shape == (256, 64)
    corpus = load_corpus(max_bytes=400_000)
    batches = eval_batches(corpus.val, 8, 64, 2)
    with torch.no_grad():
        val = torch.stack([model.loss(x, y) for x, y in batches]).mean().item()
    # fp32 tier: the same weights evaluated unsharded in another process.
    assert val == pytest.approx(summary["final_val_loss"], rel=1e-5)


@pytest.mark.distributed
def test_torchrun_ddp_trains_and_prints_once():
    proc = _torchrun(2, "--distributed", "ddp", *TORCHRUN_FLAGS)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-4000:]
    _check_torchrun_output(out, "ddp")
    assert "a full replica on each" in out


def test_distributed_none_under_a_multi_rank_launch_is_a_clear_error(monkeypatch, capsys):
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    assert cli_main(["train", "--steps", "1", *TINY_FLAGS]) == 2
    assert "--distributed none: started by torchrun with WORLD_SIZE=2" in capsys.readouterr().err
