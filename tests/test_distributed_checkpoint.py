"""Resharding checkpoints through torch.distributed.checkpoint (DCP): 2 -> 3 -> 2 ranks.

Segment A trains 6 steps on 2 ranks and saves with :func:`pagedopt.distributed.save_checkpoint`;
segment B loads that on 3 ranks (:func:`load_checkpoint`), trains 6 more and saves with the
raw torch APIs and ``flatten_optimizer_state_dict=True``; segment C loads on 2 ranks the same
way, trains 6 more, and exports a full (gathered) optimizer state dict that a single process
loads. Rank 0 carries the whole loss and FSDP sums gradients (divide factor 1), so the
reduced gradient is bit-identical to the single-process one at any world size (an average
over 3 ranks would round) and every difference comes from the optimizer state.
"""

from __future__ import annotations

import os

import pytest
import torch

import dist_helpers
from dist_helpers import full_params, make_model, make_optimizer, single_thread, spawn, train_steps
from pagedopt.distributed import load_checkpoint, requantization_bound, save_checkpoint
from pagedopt.distributed.sharding import ShardLayout, _dequantize_moments, is_sharded
from pagedopt.functional.quantization import expand_absmax

pytestmark = pytest.mark.distributed

SEGMENT = 6  # steps per segment
CONFIGS = {
    # 8-bit only for l1.weight (rows of 256: exact layout) + percentile clipping history.
    "rows": ("AdamW8bit", None, dict(lr=1e-2, min_8bit_size=8448, percentile_clipping=90)),
    # Tensor-wise 8-bit (exact layout) + trust-ratio history.
    "tensorwise": ("LARS8bit", None, dict(lr=0.1, momentum=0.9)),
    # Block-wise 8-bit: l1.weight exact, l2.weight re-quantized on load (fallback layout).
    "blockwise": ("AdamW8bit", "AdamW32bit", dict(lr=1e-2)),
    # AdEMAMix: state1 is (2, *shape), so its placements shift by one dimension.
    "ademamix": ("AdEMAMix8bit", "AdEMAMix32bit", dict(lr=1e-2)),
}
EXACT_CONFIGS = ("rows", "tensorwise")


def _shard_exact_sum(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in (model.l1, model.l2, model.l3):
        fully_shard(layer)
    fully_shard(model)
    for module in (model.l1, model.l2, model.l3, model):
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    dist_helpers.LOSS_SCALE = 1.0 if rank == 0 else 0.0
    return model


def _state_values(model: torch.nn.Module, opt) -> dict:
    """Every state as full float32 values (8-bit dequantized), plus, for 8-bit states, the
    absmax of each element's block in the live (local) layout, gathered."""
    sd = opt.state_dict()
    names = [n for n, _ in model.named_parameters()]
    out = {}
    for index, (name, p) in enumerate(model.named_parameters()):
        saved = sd["state"][index]
        live = opt.state[p]
        layout = ShardLayout(p, name)
        entry = {}
        for k in (1, 2):
            key = f"state{k}"
            if key not in saved:
                continue
            moments = opt.kind.state1_moments if k == 1 else 1
            signed = opt.kind.state_signed[k - 1]
            t = saved[key].full_tensor()
            if t.dtype == torch.uint8:
                absmax = saved[f"absmax{k}"]
                absmax = absmax.full_tensor() if is_sharded(absmax) else absmax
                per_moment = absmax.numel() // moments
                t = _dequantize_moments(t, absmax, signed, per_moment != 1, moments)
            entry[key] = t.float().cpu()
            if live[key].dtype == torch.uint8:
                block_wise = live[f"absmax{k}"].numel() // moments != 1
                local = live[f"absmax{k}"].reshape(moments, -1)
                numel = live[key].numel() // moments
                per_element = torch.stack([expand_absmax(a, numel, block_wise) for a in local])
                wrapped = layout.wrap(per_element.reshape(live[key].shape).contiguous(), moments)
                entry[f"block_absmax{k}"] = wrapped.full_tensor().cpu()
        entry["step"] = saved["step"]
        out[name] = entry
    assert len(out) == len(names)
    return out


def _build(config: str, rank: int):
    name, _, kwargs = CONFIGS[config]
    model = _shard_exact_sum(make_model(), rank)
    return model, make_optimizer(name, model.parameters(), **kwargs)


def _segment_a(rank: int, world_size: int, workdir: str) -> dict:
    out = {}
    for config in CONFIGS:
        model, opt = _build(config, rank)
        train_steps(model, opt, 0, SEGMENT)
        out[config] = _state_values(model, opt)
        save_checkpoint(os.path.join(workdir, "a", config), model, opt, extra={"step": SEGMENT})
    return out


def _flat_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _segment_b(rank: int, world_size: int, workdir: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out = {}
    for config in CONFIGS:
        model, opt = _build(config, rank)
        extra = load_checkpoint(os.path.join(workdir, "a", config), model, opt)
        loaded = _state_values(model, opt)
        train_steps(model, opt, SEGMENT, 2 * SEGMENT)
        model_sd, optim_sd = get_state_dict(model, opt, options=_flat_options())
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(workdir, "b", config))
        out[config] = dict(extra=extra, loaded=loaded)
    return out


def _segment_c(rank: int, world_size: int, workdir: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        get_state_dict,
        set_state_dict,
    )

    out = {}
    for config in CONFIGS:
        model, opt = _build(config, rank)
        model_sd, optim_sd = get_state_dict(model, opt, options=_flat_options())
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(workdir, "b", config))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=_flat_options())
        train_steps(model, opt, 2 * SEGMENT, 3 * SEGMENT)
        full_osd = get_optimizer_state_dict(
            model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        out[config] = dict(params=full_params(model), full_osd=full_osd if rank == 0 else None)
        if config == "blockwise":
            out["broadcast"] = _load_full_broadcast(model, opt, config, rank)
    return out


def _load_full_broadcast(model, opt, config: str, rank: int) -> dict:
    """``set_optimizer_state_dict(full_state_dict=True, broadcast_from_rank0=True)`` of a full
    state dict that only rank 0 holds, into a fresh sharded optimizer: the loaded state vs the
    original (dequantized, gathered)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    fresh, fresh_opt = _build(config, rank)
    set_optimizer_state_dict(
        fresh, fresh_opt, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    return dict(original=_state_values(model, opt), loaded=_state_values(fresh, fresh_opt))


@pytest.fixture(scope="module")
def segments(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dcp")  # checkpoints a/, b/ of every config live here
    a = spawn(_segment_a, 2, workdir)
    b = spawn(_segment_b, 3, workdir)
    c = spawn(_segment_c, 2, workdir)
    return a[0], b, c


def _uninterrupted(config: str, steps: int, bits: int = 8):
    name8, name32, kwargs = CONFIGS[config]
    with single_thread():
        model = make_model()
        train_steps(model, make_optimizer(name8 if bits == 8 else name32, model.parameters(), **kwargs), 0, steps)
    return full_params(model)


def _total_abs_diff(a: dict, b: dict) -> float:
    return float(sum((a[k] - b[k]).abs().sum() for k in a))


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_state_after_2_to_3_reshard(segments, config):
    """Tier: exact for 32-bit state, tensor-wise 8-bit and 8-bit with rows of 256 elements
    (l1.weight); for other 8-bit state (l2.weight, re-quantized on the 3-rank blocks) every
    element within the stated bound: half the widest code gap times its new block's absmax."""
    saved, b_results = segments[0][config], segments[1]
    for rank, result in enumerate(b_results):
        assert result[config]["extra"] == {"step": SEGMENT}
        loaded = result[config]["loaded"]
        for name, states in saved.items():
            assert loaded[name]["step"] == states["step"] == SEGMENT
        requantized = {"l2.weight"} if config in ("blockwise", "ademamix") else set()
        _assert_within_bound(saved, loaded, requantized, f"rank {rank}")
        if requantized:
            assert not torch.equal(loaded["l2.weight"]["state1"], saved["l2.weight"]["state1"]), (
                "expected some re-quantization on the 3-rank blocks"
            )


def _assert_within_bound(before: dict, after: dict, requantized: set, where: str) -> None:
    """Exact for every state, except the names in ``requantized``: within the stated bound."""
    for name, states in before.items():
        for key in ("state1", "state2"):
            if key not in states:
                continue
            old, new = states[key], after[name][key]
            if name not in requantized:
                assert torch.equal(new, old), f"{where}: {name}.{key}"
                continue
            # + 1e-6: float32 rounding of the normalization and of the decoded value.
            bound = (requantization_bound(key == "state1") + 1e-6) * after[name][f"block_absmax{key[-1]}"]
            assert float(((new - old).abs() - bound).max()) <= 0.0, f"{where}: {name}.{key} beyond the bound"


def test_full_state_dict_broadcast_from_rank0(segments):
    """Tier: exact except the re-quantized l2.weight (within the stated bound)."""
    for rank, result in enumerate(segments[2]):
        got = result["broadcast"]
        _assert_within_bound(got["original"], got["loaded"], {"l2.weight"}, f"rank {rank}")


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_resume_2_to_3_to_2_matches_uninterrupted(segments, config):
    """Exact configs: bit-identical to 18 uninterrupted single-process steps. Block-wise 8-bit
    with re-quantized state: within the quantized tier of test_distributed_fsdp (distance at
    most 1.5x the 8-bit vs 32-bit distance of the single-process runs)."""
    got = [r[config]["params"] for r in segments[2]]
    ref = _uninterrupted(config, 3 * SEGMENT)
    if config in EXACT_CONFIGS:
        for rank, params in enumerate(got):
            for key, value in ref.items():
                assert torch.equal(params[key], value), f"rank {rank}: {key}"
        return
    noise = _total_abs_diff(ref, _uninterrupted(config, 3 * SEGMENT, bits=32))
    for params in got:
        assert _total_abs_diff(params, ref) <= 1.5 * noise


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_full_state_dict_continues_in_one_process(segments, config):
    """``get_optimizer_state_dict(full_state_dict=True)`` of the 2-rank job loads into a
    single-process optimizer with plain ``load_state_dict`` and training continues: exact
    configs stay bit-identical to the uninterrupted run (4 more steps); others within the
    quantized tier."""
    result = segments[2][0][config]
    name8, name32, kwargs = CONFIGS[config]
    with single_thread():
        model = make_model()
        model.load_state_dict(result["params"])
        opt = make_optimizer(name8, model.parameters(), **kwargs)
        opt.load_state_dict(result["full_osd"])
        assert opt.state[model.l1.weight]["state1"].dtype == torch.uint8
        if opt.kind.state1_moments == 1:
            assert opt.state[model.l1.weight]["absmax1"].dim() == 1
        train_steps(model, opt, 3 * SEGMENT, 3 * SEGMENT + 4)
    got = full_params(model)
    ref = _uninterrupted(config, 3 * SEGMENT + 4)
    if config in EXACT_CONFIGS:
        for key, value in ref.items():
            assert torch.equal(got[key], value), key
        return
    noise = _total_abs_diff(ref, _uninterrupted(config, 3 * SEGMENT + 4, bits=32))
    assert _total_abs_diff(got, ref) <= 1.5 * noise
