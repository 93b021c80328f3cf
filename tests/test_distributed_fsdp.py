"""FSDP2 (``fully_shard``) training with pagedopt optimizers equals single-process training.

Two gloo ranks train :class:`dist_helpers.TinyNet` (uneven shards, a parameter whose global
size reaches ``min_8bit_size`` while its shards do not, shards of a size that is no multiple
of the 256-element block, an empty shard) for 20 steps on the same data the single-process
reference sees. Every rank uses the whole batch, so FSDP's averaged gradient is bit-identical
to the single-process gradient and every difference comes from the optimizer.
"""

from __future__ import annotations

import pytest
import torch

from dist_helpers import STEPS, full_params, make_model, make_optimizer, single_thread, spawn, train_steps
from pagedopt.paging import PagingConfig
from pagedopt.telemetry.quant_error import QuantErrorSampler
from pagedopt.telemetry.sink import RecordingSink

pytestmark = pytest.mark.distributed

# Runs whose numerics must be bit-identical to one process (see test_exact_tier).
EXACT = {
    # Block-wise 8-bit only for l1.weight (rows of 256: every shard's blocks are global
    # blocks), percentile clipping on the global gradient norms.
    "adamw8bit_rows": ("AdamW8bit", dict(lr=1e-2, min_8bit_size=8448, percentile_clipping=90)),
    # The same without clipping: the shards join the step plan's prepared launches.
    "adamw8bit_rows_launched": ("AdamW8bit", dict(lr=1e-2, min_8bit_size=8448)),
    # Tensor-wise 8-bit: one absmax per tensor, the max over all shards (both states).
    "adamw8bit_tensorwise": ("AdamW8bit", dict(lr=1e-2, block_wise=False, percentile_clipping=90)),
    # 1-state, tensor-wise 8-bit, trust ratio from the global update and parameter norms.
    "lars8bit": ("LARS8bit", dict(lr=0.1, momentum=0.9)),
    # The same and clipped, with non-contiguous gradient shards on rank 1 only: every rank
    # must still run the same collectives (the launches take contiguous copies; falling back
    # to the per-item passes on one rank would reduce other tensors than on the other).
    "lars8bit_clipped_strided_rank1": ("LARS8bit", dict(lr=0.1, momentum=0.9, percentile_clipping=90)),
    # The same with a sink that samples quantization error every 2nd step on rank 0 only (a
    # rank-0-only metrics exporter): the sampling steps keep the launches on both ranks.
    "lars8bit_clipped_sampled_rank0": ("LARS8bit", dict(lr=0.1, momentum=0.9, percentile_clipping=90)),
    # Paged state (simulated device), clipped, where rank 1 alone cannot allocate l1.weight's
    # paged state (it stays unpaged there): both ranks still page-visit it, same collectives.
    "paged_clipped_alloc_fails_rank1": ("AdamW8bit", dict(lr=1e-2, min_8bit_size=8448, percentile_clipping=90,
                                                           paging=dict(backend="simulated", policy="offload",
                                                                       min_paged_numel=1))),
}
ALLOC_FAILS_ON_RANK_1 = {"paged_clipped_alloc_fails_rank1"}
STRIDED_ON_RANK_1 = {"lars8bit_clipped_strided_rank1"}
SAMPLED_ON_RANK_0 = {"lars8bit_clipped_sampled_rank0"}
# Block-wise 8-bit on blocks that differ from the single-process ones (l2.weight).
QUANTIZED = {
    "adamw8bit": ("AdamW8bit", "AdamW32bit", dict(lr=1e-2)),
    "lion8bit": ("Lion8bit", "Lion32bit", dict(lr=1e-3)),
}


def _shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in (model.l1, model.l2, model.l3):
        fully_shard(layer)
    fully_shard(model)
    return model


def _strided(grad: torch.Tensor) -> torch.Tensor:
    """The same gradient with a non-contiguous local shard (every other element of a buffer)."""
    from torch.distributed.tensor import DTensor

    local = grad.to_local()
    buf = torch.empty((*local.shape[:-1], local.shape[-1] * 2), dtype=local.dtype)[..., ::2]
    buf.copy_(local)
    return DTensor.from_local(buf, grad.device_mesh, grad.placements, run_check=False, shape=grad.shape,
                              stride=grad.stride())


def _strided_grads_before_step(opt) -> list[int]:
    """Make ``opt.step`` first swap each gradient for a :func:`_strided` copy; returns the
    list that counts, per step, the gradient shards that were made non-contiguous."""
    step, counts = opt.step, []

    def strided_step(*args, **kwargs):
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        for p in params:
            p.grad = _strided(p.grad)
        counts.append(sum(not p.grad.to_local().is_contiguous() for p in params))
        return step(*args, **kwargs)

    opt.step = strided_step
    return counts


def _run(name: str, kwargs: dict, model: torch.nn.Module, strided: bool = False, sampled: bool = False,
         alloc_fails: bool = False) -> dict:
    if "paging" in kwargs:
        kwargs = {**kwargs, "paging": PagingConfig(**kwargs["paging"])}
    opt = make_optimizer(name, model.parameters(), **kwargs)
    if alloc_fails:  # l1.weight's two paged states (the first allocations) stay unpaged
        opt.pager.host_memory.fail_next_allocations(2)
    opt.sink = RecordingSink(QuantErrorSampler(every=2)) if sampled else RecordingSink()
    strided_counts = _strided_grads_before_step(opt) if strided else []
    losses = train_steps(model, opt, 0, STEPS)
    norms = [[r.grad_norm for r in rep.params] for rep in opt.sink.reports]
    scales = [[r.clip_scale for r in rep.params] for rep in opt.sink.reports]
    return dict(
        params=full_params(model),
        losses=losses,
        norms=[[None if n is None else n.clone() for n in step] for step in norms],
        scales=[[None if s is None else s.clone() for s in step] for step in scales],
        state_dtypes={n: opt.state[p]["state1"].dtype for n, p in model.named_parameters()},
        state_shapes={n: tuple(opt.state[p]["state1"].shape) for n, p in model.named_parameters()},
        memory=opt.memory_report(),
        launched=sum(len(lg.entries) for lg in opt._plan.launch_groups),
        strided_counts=strided_counts,
        quant_samples=[len(rep.quant_errors) for rep in opt.sink.reports],
        paging=opt.pager.stats() if "paging" in kwargs else None,
        moves=[opt.pager.moves(p) for p in model.parameters()] if "paging" in kwargs else None,
    )


# A single-process state dict (bitsandbytes layout: nested quantization state, one flat
# absmax over the whole tensor) resumed on 2 ranks after IMPORT_AT steps.
IMPORT_AT = 8
IMPORTS = {"adamw8bit_rows": EXACT["adamw8bit_rows"], "adamw8bit": QUANTIZED["adamw8bit"][::2]}


def _import_single_process_state(name: str, kwargs: dict) -> dict:
    """Train IMPORT_AT steps in this process alone, then continue sharded from its state dict."""
    model = make_model()
    opt = make_optimizer(name, model.parameters(), **kwargs)
    train_steps(model, opt, 0, IMPORT_AT)
    model_sd, optim_sd = model.state_dict(), opt.state_dict()
    assert "__bnb_optimizer_quant_state__" in optim_sd["state"][0]
    sharded = make_model(seed=123)
    sharded.load_state_dict(model_sd)
    sharded = _shard(sharded)
    opt = make_optimizer(name, sharded.parameters(), **kwargs)
    opt.load_state_dict(optim_sd)
    train_steps(sharded, opt, IMPORT_AT, STEPS)
    return full_params(sharded)


def _fsdp_worker(rank: int, world_size: int, workdir: str) -> dict:
    out = {}
    for run, (name, kwargs) in EXACT.items():
        out[run] = _run(name, kwargs, _shard(make_model()), strided=run in STRIDED_ON_RANK_1 and rank == 1,
                        sampled=run in SAMPLED_ON_RANK_0 and rank == 0,
                        alloc_fails=run in ALLOC_FAILS_ON_RANK_1 and rank == 1)
    for run, (name, _, kwargs) in QUANTIZED.items():
        out[run] = _run(name, kwargs, _shard(make_model()))
    for run, (name, kwargs) in IMPORTS.items():
        out[f"import-{run}"] = _import_single_process_state(name, kwargs)
    return out


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    return spawn(_fsdp_worker, 2, tmp_path_factory.mktemp("fsdp"))


def _single(name: str, kwargs: dict) -> dict:
    with single_thread():
        return _run(name, kwargs, make_model())


@pytest.mark.parametrize("run", sorted(EXACT))
def test_exact_tier(fsdp_results, run):
    """Tier: exact. Identical gradients, element-wise math, and global sums/maxima: the only
    reordering is float64 norm sums (per shard, then across ranks), whose float32 rounding
    matches; and the 8-bit blocks used are the single-process blocks."""
    name, kwargs = EXACT[run]
    ref = _single(name, kwargs)
    for rank, result in enumerate(fsdp_results):
        got = result[run]
        assert got["losses"] == ref["losses"], f"rank {rank}"
        for key, value in ref["params"].items():
            assert torch.equal(got["params"][key], value), f"{run} rank {rank}: {key} differs"


def test_shards_without_clipping_are_launched(fsdp_results):
    """DTensor parameters join the prepared launches - every one of the model's 6 - and
    still match one process exactly (test_exact_tier): block-wise and 32-bit state, with and
    without percentile clipping (global norms, ``adamw8bit_rows``), and tensor-wise state and
    trust ratios, whose prepare pass runs on the shards and is reduced over them (sums and
    maxima) before the update (``adamw8bit_tensorwise``, ``lars8bit``)."""
    for result in fsdp_results:
        assert result["adamw8bit_rows_launched"]["launched"] == 6
        assert result["adamw8bit"]["launched"] == 6
        assert result["adamw8bit_rows"]["launched"] == 6  # clipped in the launches
        assert result["adamw8bit_tensorwise"]["launched"] == 6  # tensor-wise: maxima over the shards
        assert result["lars8bit"]["launched"] == 6  # trust ratio: norms over the shards
        assert result["lars8bit_clipped_strided_rank1"]["launched"] == 6
        assert result["lars8bit_clipped_sampled_rank0"]["launched"] == 6


def test_non_contiguous_gradients_on_one_rank_stay_in_the_launches(fsdp_results):
    """Rank 1's gradient shards were non-contiguous at every step (all 4 that are not empty:
    l3's weight and bias shards are, on rank 1). The run still equals one process
    (test_exact_tier) and did not abort on a collective mismatch, as it did when rank 1
    alone fell back to the per-item passes."""
    strided = [r["lars8bit_clipped_strided_rank1"]["strided_counts"] for r in fsdp_results]
    assert strided[0] == [] and strided[1] == [4] * STEPS


def test_clipping_uses_global_norms(fsdp_results):
    """Tier: fp32 rounding of float64 sums. The per-parameter gradient norm that percentile
    clipping records on every rank is the single-process (global) norm, not the shard's;
    and clipping did engage, so a wrong norm would have changed the parameters above."""
    name, kwargs = EXACT["adamw8bit_rows"]
    ref = _single(name, kwargs)
    clipped = 0
    for result in fsdp_results:
        got = result["adamw8bit_rows"]
        for step, (got_norms, ref_norms) in enumerate(zip(got["norms"], ref["norms"])):
            for g, r in zip(got_norms, ref_norms):
                torch.testing.assert_close(g, r, rtol=1e-6, atol=0.0, msg=f"step {step + 1}")
        clipped += sum(int(s < 1.0) for step in got["scales"] for s in step)
    assert clipped > 0, "percentile clipping never engaged; the test would not see a wrong norm"


def test_precision_follows_global_size(fsdp_results):
    """l2.weight has 129 x 33 = 4257 >= 4096 elements, its shards 65 x 33 = 2145 and 64 x 33:
    8-bit state on every rank. Biases stay 32-bit. Shapes are the local shards (uneven),
    including the empty shard of l3.weight on rank 1."""
    shapes = [r["adamw8bit"]["state_shapes"] for r in fsdp_results]
    dtypes = [r["adamw8bit"]["state_dtypes"] for r in fsdp_results]
    assert [s["l2.weight"] for s in shapes] == [(65, 33), (64, 33)]
    assert [s["l1.weight"] for s in shapes] == [(17, 256), (16, 256)]
    assert [s["l3.weight"] for s in shapes] == [(1, 129), (0, 129)]
    for d in dtypes:
        assert d["l1.weight"] == d["l2.weight"] == torch.uint8
        assert d["l1.bias"] == d["l2.bias"] == d["l3.weight"] == torch.float32


def test_memory_report_counts_local_shards(fsdp_results):
    """Each rank reports its shards; over the ranks the element counts and the fp32-equivalent
    bytes add up to the single-process report, and 32-bit state bytes too."""
    name, _, kwargs = QUANTIZED["adamw8bit"]
    single = _single(name, kwargs)["memory"]
    reports = [r["adamw8bit"]["memory"] for r in fsdp_results]
    assert sum(r.fp32_equivalent_bytes for r in reports) == single.fp32_equivalent_bytes
    numel = {row.name: row.numel for row in single.rows}
    for name_ in numel:
        assert sum(row.numel for r in reports for row in r.rows if row.name == name_) == numel[name_]
    assert sum(r.bytes_by_precision["32bit"] for r in reports) == single.bytes_by_precision["32bit"]


def _total_abs_diff(a: dict, b: dict) -> float:
    return float(sum((a[k] - b[k]).abs().sum() for k in a))


@pytest.mark.parametrize("run", sorted(QUANTIZED))
def test_quantized_tier(fsdp_results, run):
    """Tier: 8-bit on other blocks (statistical). l2.weight's shards cut other 256-element
    blocks than one process does, so both runs are equally valid 8-bit quantizations of the
    same 32-bit trajectory and drift apart by quantization noise over 20 steps (no re-sync).
    Bound: their distance is at most 1.5x the distance that 8-bit quantization itself puts
    between the single-process 8-bit and 32-bit runs (measured ~0.5-0.9x), and the final loss
    is within 2%. Broken shard-local quantization (wrong absmax slice, lost state) breaks it."""
    name8, name32, kwargs = QUANTIZED[run]
    ref8, ref32 = _single(name8, kwargs), _single(name32, kwargs)
    noise = _total_abs_diff(ref8["params"], ref32["params"])
    assert noise > 0
    for rank, result in enumerate(fsdp_results):
        got = result[run]
        assert got["params"].keys() == ref8["params"].keys()
        assert _total_abs_diff(got["params"], ref8["params"]) <= 1.5 * noise, f"rank {rank}"
        assert abs(got["losses"][-1] - ref8["losses"][-1]) <= 0.02 * abs(ref8["losses"][-1])
    # All ranks hold the same (gathered) parameters.
    for key in fsdp_results[0][run]["params"]:
        assert torch.equal(fsdp_results[0][run]["params"][key], fsdp_results[1][run]["params"][key])


@pytest.mark.parametrize("run", sorted(IMPORTS))
def test_single_process_state_dict_resumes_sharded(fsdp_results, run):
    """A single-process (bitsandbytes-layout) state dict loads into the sharded optimizer with
    plain ``load_state_dict``: each rank cuts its part of the full tensors. Rows-of-256 8-bit
    state keeps its blocks (tier: exact vs the uninterrupted single-process run); l2.weight is
    re-quantized on the shard's blocks (tier: quantized, as above)."""
    name, kwargs = IMPORTS[run]
    ref = _single(name, kwargs)["params"]
    for rank, result in enumerate(fsdp_results):
        got = result[f"import-{run}"]
        if run in EXACT:
            for key, value in ref.items():
                assert torch.equal(got[key], value), f"rank {rank}: {key}"
        else:
            noise = _total_abs_diff(ref, _single(QUANTIZED[run][1], kwargs)["params"])
            assert _total_abs_diff(got, ref) <= 1.5 * noise


def test_quantization_error_sampled_on_one_rank_only(fsdp_results):
    """Rank 0 alone sampled quantization error (every 2nd step, 8-bit l1/l2 weights' state1
    - LARS has one state) while both ranks kept their launches: the run equals one process
    (test_exact_tier) and did not abort on a collective mismatch, as it did when a sampling
    step sent rank 0 alone through the per-item passes."""
    samples = [r["lars8bit_clipped_sampled_rank0"]["quant_samples"] for r in fsdp_results]
    assert samples[1] == [0] * STEPS
    assert samples[0] == [0, 2] * (STEPS // 2)


def test_paged_state_unpaged_on_one_rank_still_takes_the_visits(fsdp_results):
    """Rank 1 could not allocate l1.weight's paged state (both states fell back to unpaged
    tensors) while rank 0 did: whether a parameter takes the pager's visits follows the
    configuration, not the allocation's outcome, so both ranks visit every parameter and run
    the same clipping collective (test_exact_tier: equal to one process)."""
    stats = [r["paged_clipped_alloc_fails_rank1"]["paging"] for r in fsdp_results]
    assert [s["allocation_fallbacks_total"] for s in stats] == [0, 2]
    assert [r["paged_clipped_alloc_fails_rank1"]["moves"] for r in fsdp_results] == [[True] * 6] * 2
    assert [r["paged_clipped_alloc_fails_rank1"]["launched"] for r in fsdp_results] == [0, 0]
