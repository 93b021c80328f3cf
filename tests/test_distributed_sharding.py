"""Unit tests of :mod:`pagedopt.distributed.sharding` in this process (a world of one rank).

The multi-rank behaviour is in test_distributed_fsdp.py / test_distributed_checkpoint.py;
here: the checkpoint layouts and their conversions, the stated re-quantization bound, and
the errors that name what is wrong.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import pagedopt
from pagedopt.distributed import sharding
from pagedopt.distributed.sharding import (
    ShardLayout,
    all_reduce_over_shards,
    checkpoint_state,
    flatten_absmax,
    local_state,
    requantization_bound,
)
from pagedopt.functional.kinds import kind_for
from pagedopt.functional.qmap import dynamic_map
from pagedopt.functional.quantization import dequantize, quantize, quantize_with_absmax


@pytest.fixture
def world_of_one(tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _dtensor(t: torch.Tensor, mesh) -> torch.nn.Parameter:
    from torch.distributed.tensor import Shard, distribute_tensor

    return torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(0)]))


# --- the re-quantization bound ----------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_requantization_bound_is_tight(signed):
    """Tier: exact bound. Every normalized value in the range re-quantizes to within the stated
    bound (plus float32 rounding), and some value comes within 1% of it (the bound is tight)."""
    low = -1.0 if signed else 0.0
    x = torch.linspace(low, 1.0, 400_001)
    one = torch.ones(1)
    codes = quantize_with_absmax(x, one, signed, block_wise=False)
    err = (dequantize(codes, one, signed=signed, block_wise=False) - x).abs()
    bound = requantization_bound(signed)
    assert float(err.max()) <= bound + 1e-7
    assert float(err.max()) >= 0.99 * bound
    q = dynamic_map(signed).double()
    assert bound == pytest.approx(float((q[1:] - q[:-1]).max()) / 2)


# --- reductions -------------------------------------------------------------------------------


def test_plain_tensors_are_not_reduced():
    values = [torch.tensor(1.0, dtype=torch.float64), torch.tensor([2.0])]
    out = all_reduce_over_shards([torch.zeros(2), torch.zeros(3)], values, "max")
    assert out[0] is values[0] and out[1] is values[1]


def test_reduction_arguments_are_checked():
    with pytest.raises(ValueError, match="op='mean'"):
        all_reduce_over_shards([], [], "mean")
    with pytest.raises(ValueError, match="2 parameters but 1 values"):
        all_reduce_over_shards([torch.zeros(1), torch.zeros(1)], [torch.zeros(())], "sum")


def test_sharded_reduction_on_one_rank_is_identity(world_of_one):
    p = _dtensor(torch.zeros(4, 3), world_of_one)
    out = all_reduce_over_shards([p, torch.zeros(1)], [torch.tensor(3.0), torch.tensor(5.0)], "sum")
    assert [float(v) for v in out] == [3.0, 5.0]


# --- layouts ----------------------------------------------------------------------------------


def _trained(opt_cls, param: torch.nn.Parameter, steps: int = 3, **kwargs):
    opt = opt_cls([param], **kwargs)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        param.grad = torch.randn(param.shape, generator=g).to(param.dtype)
        if sharding.is_sharded(param):
            from torch.distributed.tensor import distribute_tensor

            param.grad = distribute_tensor(param.grad, param.device_mesh, param.placements)
        opt.step()
    return opt


def test_layouts_in_state_dict(world_of_one):
    """Rows of 256: codes + [dim0, row/256] absmax DTensors; other 8-bit state: dequantized
    fp32 DTensor without absmax/qmap; 32-bit: fp32 DTensor; tensor-wise: codes + plain absmax."""
    from torch.distributed.tensor import DTensor, Shard

    rows = _dtensor(torch.randn(20, 512), world_of_one)
    odd = _dtensor(torch.randn(70, 65), world_of_one)
    small = _dtensor(torch.randn(7), world_of_one)
    opt = _trained(pagedopt.AdamW8bit, rows, min_8bit_size=1024)
    opt.add_param_group({"params": [odd, small]})
    for p in (rows, odd, small):
        p.grad = torch.distributed.tensor.distribute_tensor(torch.randn(p.shape), world_of_one, [Shard(0)])
    opt.step()
    sd = opt.state_dict()
    r, o, s = sd["state"][0], sd["state"][1], sd["state"][2]
    assert "__bnb_optimizer_quant_state__" not in r
    assert isinstance(r["state1"], DTensor) and r["state1"].dtype == torch.uint8
    assert r["absmax1"].shape == (20, 2) and isinstance(r["absmax1"], DTensor)
    assert r["absmax1"].placements == (Shard(0),)
    assert o["state1"].dtype == torch.float32 and o["state1"].shape == (70, 65)
    assert "absmax1" not in o and "qmap1" not in o
    assert s["state1"].dtype == torch.float32 and "absmax1" not in s
    # The live state stays local (the kernels' input).
    assert not sharding.is_sharded(opt.state[rows]["state1"])

    tw = _dtensor(torch.randn(30, 40), world_of_one)
    sd = _trained(pagedopt.AdamW8bit, tw, min_8bit_size=1024, block_wise=False).state_dict()
    assert sd["state"][0]["state1"].dtype == torch.uint8 and not sharding.is_sharded(sd["state"][0]["absmax1"])


def test_ademamix_state_follows_the_parameter_one_dimension_down(world_of_one):
    from torch.distributed.tensor import Shard

    p = _dtensor(torch.randn(10, 256), world_of_one)
    sd = _trained(pagedopt.AdEMAMix8bit, p, min_8bit_size=1024).state_dict()["state"][0]
    assert sd["state1"].shape == (2, 10, 256) and sd["state1"].placements == (Shard(1),)
    assert sd["absmax1"].shape == (2, 10, 1) and sd["absmax1"].placements == (Shard(1),)
    layout = ShardLayout(p)
    assert layout.rows_aligned and layout.state_placements(2) == (Shard(1),)


@pytest.mark.parametrize("shape,exact", [((12, 256), True), ((50, 33), False)])
def test_round_trip_through_state_dict(world_of_one, shape, exact):
    """Tier: exact for rows of 256; for other shapes within the stated bound of the saved
    values (re-quantized on the live blocks)."""
    p = _dtensor(torch.randn(shape), world_of_one)
    opt = _trained(pagedopt.AdamW8bit, p, min_8bit_size=256)
    before = {k: opt.state[p][k].clone() for k in ("state1", "state2", "absmax1", "absmax2")}
    saved = opt.state_dict()
    opt.load_state_dict(saved)
    after = opt.state[p]
    assert after["state1"].dtype == torch.uint8 and after["absmax1"].shape == before["absmax1"].shape
    for index, signed in ((1, True), (2, False)):
        old = dequantize(before[f"state{index}"], before[f"absmax{index}"], signed=signed)
        new = dequantize(after[f"state{index}"], after[f"absmax{index}"], signed=signed)
        if exact:
            assert torch.equal(after[f"state{index}"], before[f"state{index}"])
            assert torch.equal(after[f"absmax{index}"], before[f"absmax{index}"])
        else:
            block_absmax = after[f"absmax{index}"].repeat_interleave(256)[: old.numel()]
            limit = (requantization_bound(signed) + 1e-6) * block_absmax
            assert bool(((new - old).abs().reshape(-1) <= limit).all())


def test_single_process_layouts_load_into_a_sharded_parameter(world_of_one):
    """A bitsandbytes-layout state dict (nested, flat absmax) loads as is; a 32-bit
    checkpoint's fp32 values load into 8-bit state, quantized on the live blocks, because the
    optimizer's own settings (AdamW8bit), not the checkpoint's, decide the precision."""
    torch.manual_seed(0)
    plain = torch.nn.Parameter(torch.randn(16, 256))
    opt = _trained(pagedopt.AdamW8bit, plain, min_8bit_size=1024)
    p = _dtensor(plain.detach().clone(), world_of_one)
    sharded = pagedopt.AdamW8bit([p], min_8bit_size=1024)
    sharded.load_state_dict(opt.state_dict())
    assert torch.equal(sharded.state[p]["state1"], opt.state[plain]["state1"])
    assert torch.equal(sharded.state[p]["absmax2"], opt.state[plain]["absmax2"])

    opt32 = _trained(pagedopt.AdamW32bit, torch.nn.Parameter(torch.randn(16, 256)))
    saved32 = opt32.state_dict()
    m32 = saved32["state"][0]["__bnb_optimizer_quant_state__"]["state1"]
    assert saved32["param_groups"][0]["optim_bits"] == 32
    sharded.load_state_dict(saved32)
    state = sharded.state[p]
    assert state["state1"].dtype == torch.uint8
    codes, absmax = quantize(m32, signed=True)
    assert torch.equal(state["state1"], codes) and torch.equal(state["absmax1"], absmax)


def test_load_errors_name_the_problem(world_of_one):
    p = _dtensor(torch.randn(8, 40), world_of_one)
    kind = kind_for("adamw")
    codes = torch.zeros(8, 40, dtype=torch.uint8)
    with pytest.raises(ValueError, match="has no 'state2'"):
        local_state(p, {"step": 1, "state1": torch.zeros(8, 40)}, kind, True, False, "w")
    with pytest.raises(ValueError, match="8-bit 'state1' comes without 'absmax1'"):
        local_state(p, {"state1": codes, "state2": codes}, kind, True, True, "w")
    with pytest.raises(ValueError, match="w: saved absmax1 has 3 absmax values per state"):
        local_state(p, {"state1": codes, "absmax1": torch.ones(3), "state2": torch.zeros(8, 40)},
                    kind, True, True, "w")
    with pytest.raises(ValueError, match=r"w: saved state1 has shape \(4, 40\), expected .* \(8, 40\)"):
        local_state(p, {"state1": torch.zeros(4, 40), "state2": torch.zeros(8, 40)}, kind, True, False, "w")
    with pytest.raises(TypeError, match="w is not a DTensor"):
        ShardLayout(torch.zeros(3), "w")


def test_flatten_absmax_and_empty_entries():
    kind = kind_for("ademamix")
    value = {"absmax1": torch.ones(2, 4, 1), "absmax2": torch.ones(4, 1)}
    flatten_absmax(value, kind)
    assert value["absmax1"].shape == (2, 4) and value["absmax2"].shape == (4,)


def test_checkpoint_state_passes_other_entries_through(world_of_one):
    p = _dtensor(torch.randn(4, 8), world_of_one)
    state = {"step": 3, "state1": torch.zeros(4, 8), "gnorm_vec": torch.ones(100)}
    out = checkpoint_state(p, state, kind_for("lion"), True)
    assert out["step"] == 3 and out["gnorm_vec"] is state["gnorm_vec"]
    assert sharding.is_sharded(out["state1"]) and out["state1"].to_local().data_ptr() == state["state1"].data_ptr()
