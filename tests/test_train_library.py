"""The main job, ``pagedopt train``, through the library: its configuration, corpus and
batches, model and optimizer, and training runs (losses, state memory, seeds, callbacks,
interruption, every optimizer family, bf16, torch.compile).

Runs use the "tiny" model on a small slice of the standard library so the whole file stays
well under two minutes on two cores. Loss thresholds are chosen far from what a working run
reaches (ln 256 = 5.55 nats at initialisation; a working tiny run is near 3 after 30 steps)
and far from what a broken one does (a model that does not learn stays near 5.5).

Tolerance tiers are named by the tests that compare runs: statistical (8-bit against 32-bit
AdamW) and fp32 (the compiled model against the eager one).
"""

from __future__ import annotations

import io
import math

import pytest
import torch

import pagedopt
from pagedopt.optim import ALGORITHMS
from pagedopt.train import TrainConfig, TrainConfigError, train
from pagedopt.train.data import BatchSampler, DataError, eval_batches, list_files, load_corpus
from pagedopt.train.loop import Callback, lr_schedule
from pagedopt.train.model import DecoderLM, ModelConfig
from pagedopt.train.optimizers import build_optimizer, param_groups, state_memory

from train_helpers import tiny

INITIAL_LOSS = math.log(256)  # uniform prediction over bytes


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
