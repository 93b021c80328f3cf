"""The native CPU library's instruction-set levels (avx512, avx2, baseline: native/cpu/isa.h).

One library holds the kernels compiled once per level; it runs the best level the CPU
supports, and ``PAGEDOPT_CPU_ISA`` selects a lower one. Every level this machine supports is
run here, in-process (``NativeLibrary.select_isa``) and through the environment variable in a
subprocess. Tolerance tiers (see tests/test_native_cpu.py):

* **exact** - every level gives the reference's parameters, states, codes and absmax bit for
  bit, over many steps without re-syncing, and therefore the same bits as every other level;
* **float64 order** - norms against torch within rtol 1e-12, and exactly equal across levels
  (the fixed-lane summation order does not depend on the vector width).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest
import torch

from pagedopt.backends import cpu
from pagedopt.functional import dispatch, nonfinite_tally
from pagedopt.functional.kinds import kind_for
from pagedopt.functional.scalars import step_scalars

from native_cpu_helpers import (
    BACKEND,
    DTYPES,
    HYPER,
    KINDS,
    LIB,
    MODES,
    REPO,
    Slot,
    assert_bitwise_equal,
    assert_slots_equal,
    check_code_search_dense_sample_and_bad_range,
    check_code_search_matches_python_reference_at_thresholds,
    check_dequantize_every_code,
    check_grad_norm_sq_matches_reference,
    check_tiny_and_huge_states_use_the_dividing_normalization,
    fresh_python,
    gradient,
    run_step,
)

SUPPORTED = LIB.supported_isas()


@pytest.fixture(autouse=True)
def _restore_code_search():
    """Tests that switch the VBMI dequantization off and on leave the library at its native
    default search; put back what this process chose (cpu_tuning) for the tests after them."""
    before = LIB.code_search
    yield
    LIB.select_code_search(before)


def _level_param(name):
    reason = None
    if name not in LIB.compiled_isas():
        reason = f"the library was built without the {name} level (PAGEDOPT_CPU_LEVELS)"
    elif name not in SUPPORTED:
        reason = f"this CPU lacks {name}: missing {' '.join(LIB.missing_cpu_features(name))}"
    return pytest.param(name, marks=pytest.mark.skip(reason=reason) if reason else (), id=name)


LEVELS = [_level_param(name) for name in ("avx512", "avx2", "baseline")]


@pytest.fixture
def level(request):
    """Run the test body at one instruction-set level, then restore the level in use."""
    before = LIB.isa
    LIB.select_isa(request.param)
    assert LIB.isa == request.param
    yield request.param
    LIB.select_isa(before)


@pytest.fixture(autouse=True)
def one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---- every level against the reference -------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", KINDS)
def test_every_level_matches_reference(level, name, mode):
    """Every update kind x state precision x dtype on odd sizes (4097, 257x3, 1, 0), with
    NaN/Inf/zero gradient elements, skip_zeros and gradient / update scales, 8 steps without
    re-syncing. Exact tier."""
    kind = kind_for(name)
    skip_zeros = KINDS.index(name) % 2 == 1
    scales = torch.tensor([0.25, 0.8, 1.0, 0.5])
    for dtype in DTYPES:
        for shape in ((4097,), (257, 3), (1,), (0,)):
            seed = hash((name, mode, str(dtype), shape, "isa")) % 10_000
            ref = Slot(kind, shape, dtype, mode, seed)
            nat = ref.clone()
            for step in range(1, 9):
                g = gradient(shape, dtype, step, seed)
                s = step_scalars(kind, HYPER[name], step, skip_zeros=skip_zeros)
                gs, us = scales[step % 4], scales[(step + 1) % 4]
                ref_max = run_step(dispatch.REFERENCE, kind, [ref.item(g, s, gs, us)])
                nat_max = run_step(BACKEND, kind, [nat.item(g, s, gs, us)])
                for (r1, r2), (n1, n2) in zip(ref_max, nat_max):
                    assert_bitwise_equal(r1, n1, f"{level} step {step}: prepare max1")
                    if r2 is not None:
                        assert_bitwise_equal(r2, n2, f"{level} step {step}: prepare max2")
            assert_slots_equal(ref, nat, f"{level} {dtype} {shape}")


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("name", ["adamw", "ademamix", "rmsprop"])
def test_every_level_handles_tiny_and_huge_block_scales(level, name):
    """The dividing normalization (subnormal and infinite block scales) at each level. Exact tier."""
    check_tiny_and_huge_states_use_the_dividing_normalization(name)


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_every_level_code_search_and_dequantize(level, signed):
    """The level's code search on a dense sample of all floats and on the thresholds' neighbours,
    and its dequantization of every code. Exact tier."""
    check_code_search_dense_sample_and_bad_range(signed)
    check_code_search_matches_python_reference_at_thresholds(signed)
    check_dequantize_every_code(signed)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_avx512_dequantize_without_vbmi(signed):
    """CPUs with AVX-512 F but no VBMI (Skylake/Cascade Lake) dequantize with vpermt2ps lookups
    instead of byte permutes: forced here, every code and scale. Exact tier."""
    if "avx512" not in SUPPORTED:
        pytest.skip("this CPU lacks the avx512 level")
    before = LIB.isa
    LIB.select_isa("avx512")
    LIB.check(LIB.po_set_dequantize_vbmi(0), "set_dequantize_vbmi")
    try:
        check_dequantize_every_code(signed)
        # and through a whole kernel, against the reference
        kind = kind_for("adamw")
        ref = Slot(kind, (3000,), torch.bfloat16, "8bit-blockwise", 3)
        nat = ref.clone()
        for step in range(1, 6):
            g = gradient((3000,), torch.bfloat16, step, 3)
            s = step_scalars(kind, HYPER["adamw"], step)
            run_step(dispatch.REFERENCE, kind, [ref.item(g, s)])
            run_step(BACKEND, kind, [nat.item(g, s)])
        assert_slots_equal(ref, nat, "avx512 without VBMI")
    finally:
        has_vbmi = "avx512vbmi" in (cpu._cpu_flags() or set())
        LIB.check(LIB.po_set_dequantize_vbmi(int(has_vbmi)), "set_dequantize_vbmi")
        LIB.select_isa(before)


def _kernel_matches_reference(name, shape, dtype, steps, label):
    """steps of the native 8-bit kernel against the Python reference, state and parameters equal."""
    kind = kind_for(name)
    ref = Slot(kind, shape, dtype, "8bit-blockwise", 3)
    nat = ref.clone()
    for step in range(1, steps + 1):
        g = gradient(shape, dtype, step, 3)
        s = step_scalars(kind, HYPER[name], step)
        run_step(dispatch.REFERENCE, kind, [ref.item(g, s)])
        run_step(BACKEND, kind, [nat.item(g, s)])
    assert_slots_equal(ref, nat, label)


SEARCH_MODES = {"table": 0, "arithmetic": 1, "lattice": 2, "lattice_table": 3}
NEEDS_VBMI = {"arithmetic", "lattice"}


@pytest.mark.parametrize("search", list(SEARCH_MODES))
@pytest.mark.parametrize("name", ["adamw", "lion", "ademamix", "rmsprop"])
def test_avx512_code_searches_match_the_reference(search, name):
    """VBMI CPUs quantize without gathers - the lattice fast path (code_lattice.h) falling back
    to the arithmetic search (code_arith.h) -, other AVX-512 CPUs with the lattice falling back
    to the bucket table (simd_lattice.h), and the bucket table alone: each forced in turn, over
    all floats' dense sample and through whole kernels (signed and unsigned states, odd sizes).
    Exact tier."""
    if "avx512" not in SUPPORTED:
        pytest.skip("this CPU lacks the avx512 level")
    has_vbmi = "avx512vbmi" in (cpu._cpu_flags() or set())
    if search in NEEDS_VBMI and not has_vbmi:
        pytest.skip("this CPU lacks avx512vbmi")
    before, before_search = LIB.isa, LIB.code_search
    LIB.select_isa("avx512")
    LIB.check(LIB.po_set_code_search(SEARCH_MODES[search]), "set_code_search")
    try:
        assert cpu.native_info()["code_search"] == search
        for signed in (True, False):
            check_code_search_dense_sample_and_bad_range(signed)
        for shape in [(4097,), (1,), (3, 300)]:
            _kernel_matches_reference(name, shape, torch.float32, 4, f"{search} search")
        _kernel_matches_reference(name, (777,), torch.bfloat16, 3, f"{search} search, bf16")
    finally:
        LIB.check(LIB.po_set_dequantize_vbmi(int(has_vbmi)), "set_dequantize_vbmi")
        LIB.select_code_search(before_search)  # (the line above reset it to the native default)
        LIB.select_isa(before)


def test_code_search_switch_rejects_a_cpu_without_vbmi():
    if "avx512vbmi" in (cpu._cpu_flags() or set()):
        pytest.skip("this CPU has VBMI")
    for mode in (1, 2):
        with pytest.raises(cpu.NativeError, match="avx512vbmi"):
            LIB.check(LIB.po_set_code_search(mode), "set_code_search")


def test_without_vbmi_the_avx512_level_defaults_to_the_lattice_with_the_table_fallback():
    """What a Skylake-SP / Cascade Lake CPU gets (forced here by switching VBMI off): the
    lattice search, its rare unsure groups through the bucket table; exact codes for a dense
    sample of all floats."""
    if "avx512" not in SUPPORTED:
        pytest.skip("this CPU lacks the avx512 level")
    has_vbmi = "avx512vbmi" in (cpu._cpu_flags() or set())
    before, before_search = LIB.isa, LIB.code_search
    LIB.select_isa("avx512")
    LIB.check(LIB.po_set_dequantize_vbmi(0), "set_dequantize_vbmi")
    try:
        assert cpu.native_info()["code_search"] == "lattice_table"
        for signed in (True, False):
            check_code_search_dense_sample_and_bad_range(signed)
    finally:
        LIB.check(LIB.po_set_dequantize_vbmi(int(has_vbmi)), "set_dequantize_vbmi")
        # The native default again (the gather-free search); then what this process chose.
        assert LIB.code_search == ("lattice" if has_vbmi else "lattice_table")
        LIB.select_code_search(before_search)
        LIB.select_isa(before)


def test_env_reports_the_code_search_in_use():
    """``pagedopt env`` names the code search the kernels run: at the avx512 level the one
    chosen for this CPU (cpu_tuning: the gather table where gathers are fast, else the proven
    lattice - without VBMI with the table fallback), the table search at the other levels."""
    from pagedopt.backends import cpu_tuning

    has_vbmi = "avx512vbmi" in (cpu._cpu_flags() or set())
    chosen = cpu_tuning.preferred_code_search(cpu_tuning.cpu_vendor(), cpu_tuning.gather_sampling_status(),
                                              native_default="lattice" if has_vbmi else "lattice_table")
    if cpu_tuning.requested_code_search():
        pytest.skip("PAGEDOPT_CPU_CODE_SEARCH is set")
    before = LIB.isa
    try:
        for name in SUPPORTED:
            LIB.select_isa(name)
            info = cpu.native_info()
            expected = chosen if name == "avx512" else "table"
            assert info["code_search"] == expected, (name, info)
            assert info["prefetch_chunks"] == LIB.po_get_prefetch()
    finally:
        LIB.select_isa(before)


def test_code_search_switch_rejects_an_unknown_mode():
    with pytest.raises(cpu.NativeError, match="mode must be 0, 1, 2 or 3, got 4"):
        LIB.check(LIB.po_set_code_search(4), "set_code_search")
    with pytest.raises(cpu.NativeError, match="got -1"):
        LIB.check(LIB.po_set_code_search_vbmi(-1), "set_code_search_vbmi")  # (the earlier name)


def test_prefetch_distance_is_validated_and_does_not_change_results():
    """The 8-bit kernels' software prefetch distance (chosen per CPU vendor at load) is a tuning
    knob only: any valid distance gives the reference's results; a bad one is refused by name."""
    before = LIB.po_get_prefetch()
    assert 0 <= before <= 16
    try:
        for chunks in (0, 1, 4):
            LIB.check(LIB.po_set_prefetch(chunks), "set_prefetch")
            assert LIB.po_get_prefetch() == chunks
            _kernel_matches_reference("adamw", (5000,), torch.float32, 2, f"prefetch {chunks}")
        for bad in (-1, 17):
            with pytest.raises(cpu.NativeError, match="prefetch distance"):
                LIB.check(LIB.po_set_prefetch(bad), "set_prefetch")
        assert LIB.po_get_prefetch() == 4
    finally:
        LIB.check(LIB.po_set_prefetch(before), "set_prefetch")


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("mode", ["8bit-blockwise", "8bit-tensorwise", "32bit"])
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_level_counts_nonfinite_gradient_elements(level, mode, gdtype):
    """po_update counts the NaN/+-Inf gradient elements it skips (the non-finite watch's CPU
    count): exactly, in every kernel, across units and threads, at the tails of chunks."""
    kind = kind_for("adamw")
    sizes = [(1,), (4097,), (40000,)]  # (40000: three units of the kernels' work split)
    slots = [Slot(kind, shape, torch.float32, mode, 5) for shape in sizes]
    grads, expected = [], 0
    for i, shape in enumerate(sizes):
        g = (torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.01).to(gdtype)
        flat = g.view(-1)
        bad = [k for k in (0, 255, 256, 4095, 4096, 16383, 16384, 39999) if k < flat.numel()]
        for j, k in enumerate(bad):
            flat[k] = (float("nan"), float("inf"), -float("inf"))[j % 3]
        expected += len(bad)
        grads.append(g)
    s = step_scalars(kind, HYPER["adamw"], 1)
    torch.set_num_threads(2)
    with nonfinite_tally.counting() as tally:
        run_step(BACKEND, kind, [slot.item(g, s) for slot, g in zip(slots, grads)])
    assert tally.count == expected
    # the prepared launches' path (one po_update over a fixed item list) counts the same
    if mode == "8bit-blockwise":
        from pagedopt.backends import cpu_plan

        launch = cpu_plan.CpuLaunch(LIB, kind, [slot.item(g, s) for slot, g in zip(slots, grads)])
        with nonfinite_tally.counting() as tally:
            launch.run(None, s)
        assert tally.count == expected


def test_update_without_a_count_pointer():
    """po_update's count pointer may be NULL (nothing counted or written)."""
    kind = kind_for("adamw")
    slot = Slot(kind, (300,), torch.float32, "8bit-blockwise", 1)
    g = torch.full((300,), float("nan"))
    staging = cpu._Staging()
    c_item = cpu._c_item(kind, slot.item(g, step_scalars(kind, HYPER["adamw"], 1)), staging, updating=True)
    LIB.check(LIB.po_update(int(kind.algorithm), ctypes.byref(c_item), 1, 1, None), "update")


# ---- levels against each other on large multi-threaded calls ---------------------------------


def _run_levels(fn):
    """fn() at every supported level; returns {level: result}."""
    before = LIB.isa
    results = {}
    try:
        for name in SUPPORTED:
            LIB.select_isa(name)
            results[name] = fn()
    finally:
        LIB.select_isa(before)
    return results


@pytest.mark.parametrize("name", ["adamw", "lamb", "ademamix", "lion", "adagrad"])
def test_levels_agree_bit_for_bit_on_multi_unit_calls(name):
    """Several parameters spanning many work units (16384 elements), all three state modes and
    dtypes, 2 threads, with the prepare norms of LAMB's trust ratio: every level gives
    identical parameters, states and float64 norms. Exact tier (and one level is checked
    against the reference by the other tests)."""
    if len(SUPPORTED) < 2:
        pytest.skip("only one level runs on this CPU")
    kind = kind_for(name)
    specs = [((200, 513), torch.float32, "8bit-blockwise"), ((70_001,), torch.bfloat16, "8bit-tensorwise"),
             ((33_000,), torch.float16, "32bit"), ((4097,), torch.float32, "8bit-blockwise")]

    def run():
        torch.set_num_threads(2)
        slots = [Slot(kind, shape, dtype, mode, 9 + i) for i, (shape, dtype, mode) in enumerate(specs)]
        norms = []
        for step in range(1, 5):
            grads = [gradient(shape, dtype, step, 9 + i) for i, (shape, dtype, _) in enumerate(specs)]
            s = step_scalars(kind, HYPER[name], step)
            items = [sl.item(g, s) for sl, g in zip(slots, grads)]
            norms += [(p.unorm_sq, p.pnorm_sq) for p in BACKEND.prepare(kind, items, want_norms=True)]
            norms.append(tuple(BACKEND.grad_norm_sq(grads)))
            run_step(BACKEND, kind, items)
        torch.set_num_threads(1)
        return slots, norms

    results = _run_levels(run)
    first_name, (first_slots, first_norms) = next(iter(results.items()))
    for other, (slots, norms) in results.items():
        for a, b in zip(first_slots, slots):
            assert_slots_equal(a, b, f"{first_name} vs {other}")
        for na, nb in zip(first_norms, norms):
            for x, y in zip(na, nb):
                assert torch.equal(x, y), f"{first_name} vs {other}: norms differ"


@pytest.mark.parametrize("level", LEVELS, indirect=True)
def test_every_level_grad_norm_matches_reference(level):
    """float64 sums of squares of finite gradient elements at each level. float64-order tier."""
    check_grad_norm_sq_matches_reference()


# ---- selection: API, environment variable, errors ---------------------------------------------


def test_native_info_reports_the_level_in_use():
    info = cpu.native_info()
    assert set(info) == {"isa", "native_library", "available", "reason", "threads", "code_search", "prefetch_chunks"}
    assert info["available"] is True and info["reason"] is None
    assert info["isa"] == LIB.isa and info["isa"] in SUPPORTED
    assert info["native_library"] == str(LIB.path)
    assert info["threads"] == torch.get_num_threads()
    # by default the best level this CPU supports runs
    if not os.environ.get(cpu.ISA_ENV):
        assert info["isa"] == SUPPORTED[0]


def test_native_info_without_a_library(monkeypatch, tmp_path):
    saved = (cpu._library, cpu._failure, cpu._warned)
    cpu._library, cpu._failure = None, None
    monkeypatch.setenv(cpu.LIBRARY_ENV, str(tmp_path / "missing.so"))
    try:
        info = cpu.native_info()
    finally:
        cpu._library, cpu._failure, cpu._warned = saved
    assert info["available"] is False and info["isa"] is None and info["native_library"] is None
    assert "missing.so does not exist" in info["reason"]


def test_select_isa_rejects_unknown_and_unsupported_levels(monkeypatch):
    with pytest.raises(cpu.CpuIsaError, match=r"PAGEDOPT_CPU_ISA='sse4': unknown instruction-set level.*avx512"):
        LIB.select_isa("sse4", source="PAGEDOPT_CPU_ISA")
    before = LIB.isa
    # A CPU without AVX-512 (simulated: the library answers for this CPU, which may have it).
    monkeypatch.setattr(type(LIB), "missing_cpu_features",
                        lambda self, level: ["avx512f", "avx512bw"] if level == "avx512" else [])
    with pytest.raises(cpu.CpuIsaError, match=r"PAGEDOPT_CPU_ISA=avx512: this CPU lacks the avx512 level "
                                              r"\(missing CPU features: avx512f, avx512bw\)"):
        LIB.select_isa("avx512", source="PAGEDOPT_CPU_ISA")
    assert LIB.isa == before  # unchanged


def test_the_library_itself_refuses_a_level_the_cpu_lacks():
    """po_select_isa checks CPUID itself too (not only the Python side)."""
    missing = [name for name in LIB.compiled_isas() if name not in SUPPORTED]
    if not missing:
        pytest.skip("this CPU supports every level")
    status = LIB.po_select_isa(cpu.ISA_LEVELS.index(missing[0]))
    with pytest.raises(cpu.NativeError, match="this CPU lacks"):
        LIB.check(status, "select_isa")


def _subprocess_info(env_value):
    code = ("import json, torch, pagedopt\n"
            "from pagedopt.backends import cpu\n"
            "print(json.dumps(cpu.native_info()))\n"
            "torch.manual_seed(0)\n"
            "p = torch.nn.Parameter(torch.randn(5000)); p.grad = torch.randn(5000)\n"
            "pagedopt.AdamW8bit([p]).step()\n"
            "print(json.dumps(p.detach()[:4].tolist()))\n")
    return fresh_python(code, cpu.ISA_ENV, env_value)


def test_environment_variable_selects_each_level_with_the_same_result():
    """PAGEDOPT_CPU_ISA in a fresh process: native_info() reports it, and one AdamW8bit step
    gives the same parameters at every level (exact tier)."""
    outputs = {}
    for name in SUPPORTED:
        run = _subprocess_info(name)
        assert run.returncode == 0, run.stderr
        info_line, params_line = run.stdout.strip().splitlines()[-2:]
        assert json.loads(info_line)["isa"] == name
        outputs[name] = params_line
    assert len(set(outputs.values())) == 1, outputs


def test_environment_variable_errors_name_the_variable():
    run = _subprocess_info("avx1024")
    assert run.returncode != 0
    assert "CpuIsaError" in run.stderr and "PAGEDOPT_CPU_ISA='avx1024': unknown instruction-set level" in run.stderr
    missing = [name for name in ("avx512", "avx2") if name not in SUPPORTED]
    if missing:  # a real CPU without the level (not this one, when it has them all)
        run = _subprocess_info(missing[0])
        assert run.returncode != 0 and f"PAGEDOPT_CPU_ISA={missing[0]}: this CPU lacks" in run.stderr
    # native_info() reports the error instead of raising
    env = dict(os.environ, PYTHONPATH=REPO, **{cpu.ISA_ENV: "avx1024"})
    code = "import json; from pagedopt.backends import cpu; print(json.dumps(cpu.native_info()))"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert info["available"] is False and "PAGEDOPT_CPU_ISA" in info["reason"]


def test_one_openmp_runtime_with_torch():
    """The kernels' OpenMP threads come from the same runtime (and pool) as torch's intra-op
    threads when torch ships libgomp: no second pool competing for the cores."""
    with open("/proc/self/maps", encoding="utf-8") as f:
        gomp = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(gomp) <= 1, f"two OpenMP runtimes loaded: {sorted(gomp)}"


def test_dequantize_vbmi_switch_rejects_a_cpu_without_vbmi():
    if "avx512vbmi" in (cpu._cpu_flags() or set()):
        pytest.skip("this CPU has VBMI")
    with pytest.raises(cpu.NativeError, match="avx512vbmi"):
        LIB.check(LIB.po_set_dequantize_vbmi(1), "set_dequantize_vbmi")


def test_level_names_match_the_library():
    assert cpu.ISA_LEVELS == ("baseline", "avx2", "avx512")
    assert ctypes.c_int32(LIB.po_isa()).value == cpu.ISA_LEVELS.index(LIB.isa)


def test_bench_isa_option_selects_the_level_and_reports_errors(monkeypatch, capsys):
    """``pagedopt bench --isa LEVEL`` runs the kernels at LEVEL (the table's header says so) and
    turns a level the CPU lacks into a one-line error naming --isa."""
    import argparse

    from pagedopt.commands import bench as bench_command

    parser = argparse.ArgumentParser()
    bench_command.add_parser(parser.add_subparsers())
    before = LIB.isa
    try:
        args = parser.parse_args(["bench", "--case", "a", "--numel", "5000", "--repeats", "1", "--warmup", "1",
                                  "--isa", SUPPORTED[-1], "--optimizers", "pagedopt-adamw8bit"])
        assert args.func(args) == 0
        assert f"at level {SUPPORTED[-1]}" in capsys.readouterr().out
        monkeypatch.setattr(type(LIB), "missing_cpu_features",
                            lambda self, level: ["avx512f"] if level == "avx512" else [])
        args = parser.parse_args(["bench", "--case", "a", "--numel", "5000", "--isa", "avx512"])
        with pytest.raises(SystemExit, match=r"--isa=avx512: this CPU lacks the avx512 level"):
            args.func(args)
    finally:
        monkeypatch.undo()
        LIB.select_isa(before)
