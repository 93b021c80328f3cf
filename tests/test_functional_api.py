"""pagedopt.functional's bitsandbytes-shaped API against brute-force references, the
optimizers' own path, and (when it imports) bitsandbytes' CPU functions.

Tolerance tiers: codes are compared exactly except at counted ties (a value exactly between
two codes in float32); float32 updates within a few float32 ulps of a float64 reference.
"""

from __future__ import annotations

import copy

import pytest
import torch

import pagedopt
import pagedopt.functional as F
from pagedopt.functional.qmap import dynamic_map

from bnb_helpers import bnb_or_skip


def brute_force_codes(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """argmin over the map, float64 (the obvious, slow definition)."""
    flat = x.reshape(-1).double()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, blocksize)
    absmax = blocks.abs().amax(1)
    scaled = (blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]).clamp(-1, 1).reshape(-1)[:n]
    dist = (scaled[:, None] - code.double()[None, :]).abs()
    best = dist.min(1, keepdim=True).values
    ties = ((dist - best).abs() <= 1e-7).sum(1) > 1
    return dist.argmin(1).to(torch.uint8).reshape(x.shape), absmax.float(), ties.reshape(x.shape)


@pytest.mark.parametrize("n", [0, 1, 255, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_quantize_blockwise_is_nearest_code(n, dtype, blocksize):
    torch.manual_seed(n + blocksize)
    x = (torch.randn(n) * 3).to(dtype)
    codes, state = F.quantize_blockwise(x, blocksize=blocksize)
    want, absmax, ties = brute_force_codes(x.float(), dynamic_map(True), blocksize)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert state.dtype == dtype and state.blocksize == blocksize and state.absmax.shape == absmax.shape
    torch.testing.assert_close(state.absmax, absmax, rtol=0, atol=0)
    assert torch.equal(codes[~ties], want[~ties])
    assert int(ties.sum()) <= max(4, n // 100)  # fp16/bf16 inputs sit on exact midpoints more often
    back = F.dequantize_blockwise(codes, state)
    assert back.dtype == dtype and back.shape == x.shape
    expected = (dynamic_map(True)[codes.long()] * absmax.repeat_interleave(blocksize)[:n]).to(dtype)
    assert torch.equal(back, expected)


def test_quantize_blockwise_other_maps_out_absmax_and_errors():
    x = torch.linspace(-2, 2, 1000)
    code = F.create_linear_map(signed=True, total_bits=4)
    codes, state = F.quantize_blockwise(x, code=code, blocksize=128)
    want, _, ties = brute_force_codes(x, code, 128)
    assert torch.equal(codes[~ties], want[~ties])
    out, absmax = torch.empty(1000, dtype=torch.uint8), torch.empty(8)
    codes2, state2 = F.quantize_blockwise(x, code=code, absmax=absmax, out=out, blocksize=128)
    assert codes2 is out and state2.absmax is absmax and torch.equal(out, codes)
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        F.quantize_blockwise(x, blocksize=0)
    with pytest.raises(ValueError, match="A must be a float"):
        F.quantize_blockwise(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="quant_state= or absmax="):
        F.dequantize_blockwise(codes)
    with pytest.raises(ValueError, match="absmax has 3 entries, 1000 codes in blocks of 128 need 8"):
        F.dequantize_blockwise(codes, absmax=torch.ones(3), blocksize=128)
    # one scale: the whole tensor (pagedopt's tensor-wise LAMB/LARS state)
    whole = F.dequantize_blockwise(codes, absmax=torch.tensor([2.0]), code=code, blocksize=128)
    assert torch.equal(whole, code[codes.long()] * 2.0)


def test_nested_quant_state_and_absmax_form():
    torch.manual_seed(1)
    x = torch.randn(64 * 300) * torch.linspace(0.1, 10, 64 * 300)
    codes, state = F.quantize_blockwise(x, blocksize=64, nested=True)
    assert state.nested and state.absmax.dtype == torch.uint8 and state.state2.blocksize == 64
    plain_codes, plain = F.quantize_blockwise(x, blocksize=64)
    assert torch.equal(codes, plain_codes)
    back = F.dequantize_blockwise(codes, state)
    # the nested scales are 8-bit themselves: a few percent of the largest block scale
    assert (back - x).abs().max() <= 0.05 * x.abs().max()
    assert state[3] == 64 and state[4][1] is state.state2
    direct = F.dequantize_blockwise(plain_codes, absmax=plain.absmax, blocksize=64)
    assert torch.equal(direct, F.dequantize_blockwise(plain_codes, plain))


def test_dynamic_maps_are_the_optimizers_maps():
    assert torch.equal(F.create_dynamic_map(True), dynamic_map(True))
    assert torch.equal(F.create_dynamic_map(False), dynamic_map(False))
    for signed, bits in ((True, 4), (False, 5), (True, 1)):
        m = F.create_dynamic_map(signed, bits, 8)
        assert m.shape == (256,) and float(m.max()) == 1.0 and bool((m[1:] >= m[:-1]).all())
    with pytest.raises(ValueError, match="max_exponent_bits"):
        F.create_dynamic_map(True, 8, 8)


def test_percentile_clipping_against_history_reference():
    torch.manual_seed(2)
    hist = torch.zeros(100)
    norms = []
    for step in range(1, 131):
        g = torch.randn(4097) * (1 + (step % 7))
        if step == 50:
            g[3] = float("nan")
        norm, clip, scale = F.percentile_clipping(g, hist, step, percentile=10)
        finite = torch.where(torch.isfinite(g), g, 0.0).double()
        norms.append(float(finite.square().sum()))
        window = [norms[0]] * 100 if step == 1 else None
        if window is None:
            ref_hist = ref_hist_prev.clone()
            ref_hist[step % 100] = norms[-1]
        else:
            ref_hist = torch.tensor(window, dtype=torch.float64)
        ref_hist_prev = ref_hist
        ref_clip = ref_hist.sort().values[10].sqrt()
        ref_norm = norms[-1] ** 0.5
        ref_scale = float(ref_clip / ref_norm) if ref_norm > ref_clip else 1.0
        assert norm.shape == () and scale.dtype == torch.float32
        assert float(norm) == pytest.approx(ref_norm, rel=1e-6)
        assert float(clip) == pytest.approx(float(ref_clip), rel=1e-6)
        assert float(scale) == pytest.approx(ref_scale, rel=1e-6)
    with pytest.raises(ValueError, match="step must be an int >= 1"):
        F.percentile_clipping(g, hist, 0)


def _adam64(p, g, m, v, step, lr, b1, b2, eps, wd, decoupled):
    p, g = p.double(), g.double()
    if not decoupled:
        g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    upd = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
    if decoupled:
        p = p * (1 - lr * wd)
    return p - lr * upd, m, v


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_optimizer_update_32bit_matches_float64_adam(name):
    torch.manual_seed(3)
    p = torch.randn(4097)
    m, v = torch.zeros(4097), torch.zeros(4097)
    ref = (p.double(), m.double(), v.double())
    for step in range(1, 6):
        g = torch.randn(4097) * 0.1
        F.optimizer_update_32bit(name, g, p, m, 0.9, 1e-8, step, 1e-2, v, 0.99, weight_decay=0.1)
        ref = _adam64(ref[0], g, ref[1], ref[2], step, 1e-2, 0.9, 0.99, 1e-8, 0.1, name == "adamw")
    torch.testing.assert_close(p.double(), ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v.double(), ref[2], rtol=1e-5, atol=1e-9)


def test_optimizer_update_32bit_trust_ratio_and_gnorm_scale():
    p = torch.full((100,), 0.01)
    buf = torch.zeros(100)
    unorm = torch.zeros(1)
    F.optimizer_update_32bit("lars", torch.ones(100), p, buf, 0.9, 0.0, 1, 1.0, unorm_vec=unorm, max_unorm=0.02,
                             gnorm_scale=torch.tensor(0.5))
    # update = 0.5 * g (clipped gradient); ||update|| = 5 > 0.02 * ||p|| = 0.002 -> scaled to 0.002
    assert float(unorm) == pytest.approx(25.0)
    torch.testing.assert_close(p, torch.full((100,), 0.01 - 0.0002), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls, name", [(pagedopt.AdamW8bit, "adamw"), (pagedopt.AdEMAMix8bit, "ademamix"),
                                       (pagedopt.Lion8bit, "lion"), (pagedopt.RMSprop8bit, "rmsprop")])
def test_optimizer_update_8bit_blockwise_is_the_optimizers_step(cls, name):
    """Same kernel, same state: calling the functional form reproduces the class bit for bit."""
    torch.manual_seed(4)
    w = torch.nn.Parameter(torch.randn(4097) * 0.1)
    opt = cls([w], min_8bit_size=0) if name != "ademamix" else cls([w], min_8bit_size=0, t_alpha=None)
    w.grad = torch.randn(4097) * 0.01
    opt.step()
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[w].items()}
    p = w.detach().clone()
    g = torch.randn(4097) * 0.01
    w.grad = g.clone()
    opt.step()
    group = opt.param_groups[0]
    betas = list(group["betas"]) + [0.0] * (3 - len(group["betas"]))
    F.optimizer_update_8bit_blockwise(
        name, g, p, state["state1"], state.get("state2"), betas[0], betas[1], betas[2], group.get("alpha", 0.0) or 0.0,
        group["eps"], 2, group["lr"], state["qmap1"], state.get("qmap2"), state["absmax1"], state.get("absmax2"),
        weight_decay=group["weight_decay"],
    )
    assert torch.equal(p, w.detach())
    assert torch.equal(state["state1"], opt.state[w]["state1"])
    assert torch.equal(state["absmax1"], opt.state[w]["absmax1"])


def test_optimizer_update_8bit_tensorwise_keeps_max_and_new_max_apart():
    torch.manual_seed(5)
    w = torch.nn.Parameter(torch.randn(5000) * 0.1)
    opt = pagedopt.LAMB8bit([w], min_8bit_size=0)
    w.grad = torch.randn(5000) * 0.01
    opt.step()
    s = copy.deepcopy(opt.state[w])
    p, g = w.detach().clone(), torch.randn(5000) * 0.01
    w.grad = g.clone()
    opt.step()
    gr = opt.param_groups[0]
    new1, new2, unorm = torch.zeros(1), torch.zeros(1), torch.zeros(1)
    old1 = s["absmax1"].clone()
    F.optimizer_update_8bit("lamb", g, p, s["state1"], s["state2"], *gr["betas"], gr["eps"], 2, gr["lr"], s["qmap1"],
                            s["qmap2"], s["absmax1"], s["absmax2"], new1, new2, weight_decay=gr["weight_decay"],
                            unorm_vec=unorm, max_unorm=gr["max_unorm"])
    assert torch.equal(s["absmax1"], old1)
    assert torch.equal(new1, opt.state[w]["absmax1"].reshape(1))
    assert torch.equal(s["state1"], opt.state[w]["state1"])
    torch.testing.assert_close(p, w.detach(), rtol=0, atol=1e-7)  # trust ratio from float64 norms
    assert float(unorm) > 0


def test_8bit_entry_points_reject_wrong_maps_and_shapes():
    p, g = torch.zeros(300), torch.ones(300)
    s1, s2 = torch.zeros(300, dtype=torch.uint8), torch.zeros(300, dtype=torch.uint8)
    q1, q2 = F.create_dynamic_map(True), F.create_dynamic_map(False)
    with pytest.raises(ValueError, match="qmap1 is not the unsigned dynamic map"):
        F.optimizer_update_8bit_blockwise("rmsprop", g, p, s1, None, 0.9, 0, 0, 0, 1e-8, 1, 0.1, q1, None,
                                          torch.zeros(2), None)
    with pytest.raises(ValueError, match="absmax1 must be float32 with 2 entries"):
        F.optimizer_update_8bit_blockwise("adamw", g, p, s1, s2, 0.9, 0.99, 0, 0, 1e-8, 1, 0.1, q1, q2,
                                          torch.zeros(1), torch.zeros(2))
    with pytest.raises(ValueError, match="keeps two states"):
        F.optimizer_update_32bit("adam", g, p, torch.zeros(300), 0.9, 1e-8, 1, 0.1)


# -- side by side with bitsandbytes' own CPU functions ----------------------------------------------


@pytest.mark.parametrize("n, blocksize", [(4097, 256), (1, 64), (10000, 4096)])
def test_quantize_blockwise_matches_bitsandbytes(n, blocksize):
    bnb = bnb_or_skip()
    torch.manual_seed(n)
    x = torch.randn(n)
    ours, our_state = F.quantize_blockwise(x, blocksize=blocksize)
    theirs, their_state = bnb.functional.quantize_blockwise(x, blocksize=blocksize)
    torch.testing.assert_close(our_state.absmax, their_state.absmax, rtol=0, atol=0)
    want, _, _ = brute_force_codes(x, dynamic_map(True), blocksize)
    assert torch.equal(ours, want)
    # bitsandbytes' CPU kernel searches the map approximately: a few of its codes are the
    # neighbour of the nearest one (7 of 4097 with this seed)
    differ = ours != theirs
    assert int(differ.sum()) <= max(2, n // 200)
    assert int((ours.int() - theirs.int()).abs().max()) <= 1
    # each side decodes the other's codes identically
    assert torch.equal(F.dequantize_blockwise(theirs, absmax=their_state.absmax, blocksize=blocksize),
                       bnb.functional.dequantize_blockwise(theirs, their_state))


def test_maps_match_bitsandbytes():
    bnb = bnb_or_skip()
    for args in ((True,), (False,), (True, 4, 8), (True, 3, 8), (True, 6, 7), (True, 4, 6)):
        assert torch.equal(F.create_dynamic_map(*args), bnb.functional.create_dynamic_map(*args)), args
    for args in ((True, 8, True), (False, 8, True), (True, 4, True), (True, 3, False), (False, 2, False)):
        assert torch.equal(F.create_linear_map(*args), bnb.functional.create_linear_map(*args)), args


def test_8bit_blockwise_update_matches_bitsandbytes():
    """bitsandbytes' "adam" decays decoupled, pagedopt's "adamw" does; codes may differ at ties
    and where pagedopt's sign/collapse guards act, so compare decoded states and parameters."""
    bnb = bnb_or_skip()
    torch.manual_seed(6)
    n = 4097
    p0 = torch.randn(n) * 0.1
    tensors = {}
    for who in ("ours", "theirs"):
        tensors[who] = [p0.clone(), torch.full((n,), 127, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8),
                        torch.zeros(17), torch.zeros(17)]
    q1, q2 = F.create_dynamic_map(True), F.create_dynamic_map(False)
    for step in range(1, 11):
        g = torch.randn(n) * 0.01
        for who, fn, name in (("ours", F.optimizer_update_8bit_blockwise, "adamw"),
                              ("theirs", bnb.functional.optimizer_update_8bit_blockwise, "adam")):
            p, s1, s2, a1, a2 = tensors[who]
            fn(name, g, p, s1, s2, 0.9, 0.999, 0.0, 0.0, 1e-8, step, 1e-3, q1, q2, a1, a2, weight_decay=0.01)
    (p, s1, _, a1, _), (bp, bs1, _, ba1, _) = tensors["ours"], tensors["theirs"]
    m = F.dequantize_blockwise(s1, absmax=a1, blocksize=256)
    bm = F.dequantize_blockwise(bs1, absmax=ba1, blocksize=256)
    assert (m - bm).abs().mean() < 5e-2 * bm.abs().mean()  # two 8-bit encoders, 10 steps apart
    assert (p - bp).abs().mean() < 6e-5  # bitsandbytes own 8-bit parity bound (mean abs error); moved ~1e-2
