"""What the CUDA backend's host code prepares for the kernels, checked without a GPU: the
quantization lookup tables and the kernels' code search over them (tier exact: equal to
quant.h's count_below), and launch planning - descriptors, the vector-alignment flag, chunk
prefixes and the launch buffer, item checks, staging of non-contiguous tensors, grouping per
dtype and mode (CPU tensors stand in for device memory).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cuda_compile_helpers import _item

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python (pip install pagedopt[cuda]) is not installed")

from pagedopt.backends import cuda_layout, cuda_plan, cuda_tables  # noqa: E402


# --- the code search -----------------------------------------------------------------------------


def _probe_values(thresholds: np.ndarray, seed: int) -> np.ndarray:
    """Every threshold and its 3 float32 neighbours on each side (both signs), every LUT
    bucket edge, special values, and random normalized values of all magnitudes."""
    rng = np.random.default_rng(seed)
    bits = np.concatenate([thresholds, -thresholds]).view(np.uint32).astype(np.int64)
    near = np.concatenate([bits + k for k in range(-3, 4)])
    low, high = cuda_tables._bucket_bounds()
    edges = np.concatenate([low, high, low.astype(np.int64) - 1, high.astype(np.int64) + 1])
    edges = np.concatenate([edges, edges | 0x80000000])
    edges = edges[(edges >= 0) & (edges < 2**32)]
    special = np.array([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1e-38], np.float32)
    magnitudes = 10.0 ** rng.uniform(-9, 0.1, 200_000)
    random = (rng.choice([-1.0, 1.0], magnitudes.size) * magnitudes).astype(np.float32)
    return np.concatenate([
        near.astype(np.uint32).view(np.float32), edges.astype(np.uint32).view(np.float32), special, random,
    ])


@pytest.mark.parametrize("map_index,signed", cuda_tables.MAPS)
def test_lut_code_search_equals_count_below(map_index, signed):
    """Tier: exact. The kernel's table search (mirrored step for step) returns quant.h's
    count_below for every probe - thresholds, their neighbours and bucket edges are where
    a wrong table entry or a short span would show."""
    tables = cuda_tables.build_tables()
    thresholds = tables.thresholds[map_index]
    x = _probe_values(thresholds, seed=map_index)
    expected = cuda_tables.count_below(thresholds, x)
    got = cuda_tables.lut_count_below(tables, map_index, x)
    bad = np.nonzero(got != expected)[0]
    assert bad.size == 0, f"{bad.size} mismatches, first x={x[bad[0]]!r}: {got[bad[0]]} != {expected[bad[0]]}"
    assert tables.spans[map_index] <= (cuda_tables.SPAN_SIGNED if signed else cuda_tables.SPAN_UNSIGNED)


def test_lut_tables_match_the_reference_maps():
    from pagedopt.functional.qmap import decision_thresholds, dynamic_map

    t = cuda_tables.build_tables()
    for m, signed in cuda_tables.MAPS:
        assert np.array_equal(t.maps[m, 0], dynamic_map(signed).numpy())
        assert np.array_equal(t.maps[m, 1, :255], decision_thresholds(signed).numpy())
        assert t.maps[m, 1, 255] == np.inf


# --- launch planning (CPU tensors stand in for device memory) -------------------------------------


def test_update_descriptors_carry_pointers_sizes_flags_and_scalars():
    kind, item = _item("ademamix", 4100)
    descs = cuda_plan.pack_update_descs(kind, [item])
    d = descs[0]
    assert d["param"] == item.param.data_ptr() and d["grad"] == item.grad.data_ptr()
    assert d["state1"] == item.state1.data_ptr() and d["state2"] == item.state2.data_ptr()
    assert d["absmax1"] == item.absmax1.data_ptr() and d["absmax2"] == item.absmax2.data_ptr()
    assert d["gnorm_scale"] == 0 and d["update_scale"] == 0 and d["new_absmax1"] == 0
    assert d["numel"] == 4100
    assert d["scalars"].tobytes() == np.array([item.scalars.astuple()], dtype=cuda_layout.STEP_SCALARS).tobytes()
    assert tuple(d["scalars"].tolist()) == pytest.approx(item.scalars.astuple())


def test_vector_flag_follows_alignment():
    kind, aligned = _item("adamw", 4096)
    assert cuda_plan.vector_ok(kind, aligned)
    kind, shifted = _item("adamw", 4096, offset=1)  # param 4 bytes past a 16-byte boundary
    assert shifted.param.data_ptr() % 16 == 4 and not cuda_plan.vector_ok(kind, shifted)
    # AdEMAMix 32-bit state: the second moment starts numel floats into state1
    kind, odd = _item("ademamix", 4097, quantized=False)
    assert not cuda_plan.vector_ok(kind, odd)
    kind, even = _item("ademamix", 4100, quantized=False)
    assert cuda_plan.vector_ok(kind, even)
    # 16-bit parameters: groups of 8 elements, uint8 codes need 8-byte alignment
    kind, half = _item("ademamix", 4100, dtype=torch.bfloat16)
    assert not cuda_plan.vector_ok(kind, half)  # 4100 codes: moment 1 at +4100 bytes
    kind, half_ok = _item("ademamix", 4104, dtype=torch.bfloat16)
    assert cuda_plan.vector_ok(kind, half_ok)


def test_chunk_prefix_and_launch_buffer():
    prefix = cuda_plan.chunk_prefix([0, 1, 2048, 2049, 2**31 + 5], 2048)
    assert prefix.tolist() == [0, 0, 1, 2, 4, 4 + 2**20 + 1]
    descs = cuda_plan.pack_norm_descs([torch.zeros(3), torch.zeros(5)])
    buf, offset = cuda_plan.launch_buffer(descs, prefix)
    assert offset % 16 == 0 and offset >= descs.nbytes
    assert np.array_equal(buf[offset:].view(np.int64), prefix)
    assert buf[: descs.nbytes].tobytes() == descs.tobytes()


def test_check_item_names_the_bad_field():
    kind, item = _item("adamw", 300)
    cuda_plan.check_item(kind, item, 0)
    with pytest.raises(ValueError, match="update item 3: absmax1 has 1 elements, expected 2"):
        cuda_plan.check_item(kind, dataclasses.replace(item, absmax1=torch.zeros(1)), 3)
    with pytest.raises(ValueError, match="state2 has dtype torch.float32, expected torch.uint8"):
        cuda_plan.check_item(kind, dataclasses.replace(item, state2=torch.zeros(300)), 0)
    with pytest.raises(ValueError, match="gnorm_scale has dtype torch.float64"):
        cuda_plan.check_item(kind, dataclasses.replace(item, gnorm_scale=torch.ones((), dtype=torch.float64)), 0)
    kind, tw = _item("adamw", 300, block_wise=False)
    with pytest.raises(ValueError, match="new_absmax1 is None"):
        cuda_plan.check_item(kind, tw, 0, need_new_absmax=True)


def test_staging_copies_non_contiguous_tensors_back():
    kind, item = _item("lion", 64, quantized=False)
    wide = torch.zeros(64, 2)
    param = wide[:, 0]  # stride 2
    item = dataclasses.replace(item, param=param)
    staged = cuda_plan.stage([item], writes=True)
    assert staged.items[0].param.is_contiguous() and staged.items[0].param.data_ptr() != param.data_ptr()
    staged.items[0].param.fill_(3.0)
    staged.finish()
    assert torch.equal(wide[:, 0], torch.full((64,), 3.0)) and torch.equal(wide[:, 1], torch.zeros(64))


def test_items_are_grouped_per_dtype_and_mode():
    items = [
        _item("adamw", 10, quantized=False)[1],
        _item("adamw", 5000)[1],
        _item("adamw", 5000, dtype=torch.bfloat16)[1],
        _item("adamw", 5000, block_wise=False)[1],
        _item("adamw", 20, quantized=False)[1],
    ]
    groups = cuda_plan.group_items(items)
    cpu = torch.device("cpu")
    assert groups == {
        (cpu, "f32", "state32"): [0, 4], (cpu, "f32", "block8"): [1], (cpu, "bf16", "block8"): [2],
        (cpu, "f32", "tensor8"): [3],
    }
    mixed = dataclasses.replace(items[0], grad=items[0].grad.half())
    assert not cuda_plan.kernel_handles(mixed)
