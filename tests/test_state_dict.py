"""state_dict()/load_state_dict(): bit-exact continuation, weights_only loading, and importing
bitsandbytes state dicts (nested and flat layouts)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import pagedopt
from pagedopt.functional.quantization import dequantize
from pagedopt.optim.optimizer import QUANT_STATE_KEY

HP = {
    "Adam": {}, "AdamW": {}, "LAMB": {}, "AdEMAMix": dict(t_alpha=5, t_beta3=5),
    "SGD": dict(lr=0.01, momentum=0.9), "LARS": dict(lr=0.01, momentum=0.9), "Lion": {},
    "RMSprop": {}, "Adagrad": {},
}


def make(name, bits, params, **extra):
    cls = pagedopt.optim.get_optimizer_class(f"{name}{bits}bit")
    return cls(params, **HP[name], min_8bit_size=0, **extra)


def grads(n, shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(n)]


def train(opt, params, grad_seq):
    for step_grads in grad_seq:
        for p, gr in zip(params, step_grads):
            p.grad = gr.clone()
        opt.step()


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("block_wise", [True, False])
@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("name", list(HP))
def test_resume_is_bit_exact(name, bits, block_wise):
    """Tier EXACT: 6 steps, save (through torch.save / torch.load(weights_only=True)), load into a
    fresh optimizer, 6 more steps == 12 uninterrupted steps, parameters and states."""
    shapes = [(300, 9), (7,), (0,)]
    seq = grads(12, shapes, seed=11)
    init = [torch.randn(s, generator=torch.Generator().manual_seed(12)) for s in shapes]
    full = [torch.nn.Parameter(t.clone()) for t in init]
    o_full = make(name, bits, full, block_wise=block_wise, percentile_clipping=20)
    train(o_full, full, seq)

    first = [torch.nn.Parameter(t.clone()) for t in init]
    o_first = make(name, bits, first, block_wise=block_wise, percentile_clipping=20)
    train(o_first, first, seq[:6])
    saved = roundtrip(o_first.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    o_resumed = make(name, bits, resumed, block_wise=block_wise, percentile_clipping=20)
    o_resumed.load_state_dict(saved)
    train(o_resumed, resumed, seq[6:])

    for a, b in zip(full, resumed):
        assert torch.equal(a, b)
    for a, b in zip(full, resumed):
        sa, sb = o_full.state[a], o_resumed.state[b]
        assert sa["step"] == sb["step"] == 12
        for key in ("state1", "state2", "absmax1", "absmax2", "gnorm_vec"):
            if key in sa:
                assert torch.equal(sa[key], sb[key]), key
                assert sa[key].dtype == sb[key].dtype


def test_state_dict_uses_the_bitsandbytes_layout():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = pagedopt.AdamW8bit([p])
    p.grad = torch.randn(5000)
    opt.step()
    sd = opt.state_dict()
    entry = sd["state"][0]
    assert set(entry) == {"step", QUANT_STATE_KEY}
    assert set(entry[QUANT_STATE_KEY]) == {"state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2"}
    assert "state1" in opt.state[p], "state_dict() must not modify the live state"


def test_fp32_state_stays_fp32_for_half_parameters():
    p = torch.nn.Parameter(torch.randn(100, dtype=torch.bfloat16))
    opt = pagedopt.AdamW32bit([p])
    p.grad = torch.randn(100, dtype=torch.bfloat16)
    opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = pagedopt.AdamW32bit([q])
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    assert opt2.state[q]["state1"].dtype == torch.float32  # torch's loader would cast to bf16


def test_mismatched_state_dict_is_rejected_clearly():
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(10))
    opt = pagedopt.AdamW8bit([a, b])
    other = pagedopt.AdamW8bit([a])
    with pytest.raises(ValueError, match="parameter group 0 has 2 parameters"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="parameter groups"):
        pagedopt.AdamW8bit([{"params": [a]}, {"params": [b]}]).load_state_dict(other.state_dict())


# --- bitsandbytes import ---------------------------------------------------------------------

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the test extra")


def bnb_trained(cls_name, steps=5, numel=8192, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = torch.nn.Parameter(torch.randn(numel, generator=torch.Generator().manual_seed(13)) * 0.1)
        opt = getattr(bnb.optim, cls_name)([p], **kw)
        g = torch.Generator().manual_seed(14)
        for _ in range(steps):
            p.grad = torch.randn(numel, generator=g) * 0.01
            opt.step()
    return p, opt


def flat(sd):
    sd = {"state": {k: dict(v) for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}
    for entry in sd["state"].values():
        entry.update(entry.pop(QUANT_STATE_KEY, {}))
    return sd


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_import_bitsandbytes_adamw8bit(layout):
    p_bnb, o_bnb = bnb_trained("AdamW8bit")
    sd = o_bnb.state_dict()
    if layout == "flat":
        sd = flat(sd)
    p = torch.nn.Parameter(p_bnb.detach().clone())
    opt = pagedopt.AdamW8bit([p])
    opt.load_state_dict(roundtrip(sd))
    ours, theirs = opt.state[p], o_bnb.state[p_bnb]
    assert ours["step"] == 5
    # Same map and block layout: the codes and scales are taken over as they are.
    for key in ("state1", "state2", "absmax1", "absmax2"):
        assert torch.equal(ours[key], theirs[key]), key
    # Training continues; both continue from the same state with the same gradients.
    g = torch.Generator().manual_seed(15)
    start = p.detach().clone()
    for _ in range(5):
        grad = torch.randn(8192, generator=g) * 0.01
        p.grad, p_bnb.grad = grad.clone(), grad.clone()
        opt.step()
        o_bnb.step()
    moved = (p_bnb.detach() - start).abs().mean()
    # bitsandbytes applies decoupled decay after the Adam step and pagedopt before it (as
    # torch.optim.AdamW): a difference of order lr * wd * update, far below 1% of the motion.
    assert (p.detach() - p_bnb.detach()).abs().mean() < 0.01 * moved


def test_import_bitsandbytes_rmsprop_reencodes_the_signed_map():
    """bitsandbytes stores the non-negative RMSprop state with the signed map; pagedopt uses
    the unsigned map, so the state is re-encoded - within half a code gap of the new map."""
    p_bnb, o_bnb = bnb_trained("RMSprop8bit", lr=1e-3)
    theirs = o_bnb.state[p_bnb]
    values = dequantize(theirs["state1"], theirs["absmax1"], qmap=theirs["qmap1"])
    p = torch.nn.Parameter(p_bnb.detach().clone())
    opt = pagedopt.RMSprop8bit([p], lr=1e-3)
    opt.load_state_dict(o_bnb.state_dict())
    ours = opt.state[p]
    assert torch.equal(ours["qmap1"], pagedopt.functional.qmap.dynamic_map(False))
    decoded = dequantize(ours["state1"], ours["absmax1"], signed=False)
    scale = ours["absmax1"].repeat_interleave(256)[: decoded.numel()]
    assert torch.all((decoded - values).abs() <= 0.02 * scale + 1e-12)
    p.grad = torch.randn(8192) * 0.01
    opt.step()
    assert torch.isfinite(p).all()


def test_import_bitsandbytes_tensorwise_layout():
    """bitsandbytes' tensor-wise 8-bit state keeps max1/new_max1; they become absmax1."""
    p = torch.nn.Parameter(torch.randn(5000))
    opt = pagedopt.LAMB8bit([p])  # tensor-wise by default, like bitsandbytes' LAMB
    p.grad = torch.randn(5000)
    opt.step()
    sd = flat(opt.state_dict())
    entry = sd["state"][0]
    entry["max1"], entry["max2"] = entry.pop("absmax1"), entry.pop("absmax2")
    entry["new_max1"], entry["new_max2"] = torch.zeros(1), torch.zeros(1)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = pagedopt.LAMB8bit([q])
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.state[q]["absmax1"], opt.state[p]["absmax1"])
    assert "max1" not in opt2.state[q] and "new_max1" not in opt2.state[q]
    grad = torch.randn(5000)
    p.grad, q.grad = grad.clone(), grad.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


def test_block_layout_change_on_load_is_reencoded():
    """A block-wise state loaded into a tensor-wise optimizer is re-quantized, not misread."""
    p = torch.nn.Parameter(torch.randn(5000))
    opt = pagedopt.Adam8bit([p])
    p.grad = torch.randn(5000)
    opt.step()
    values = dequantize(opt.state[p]["state1"], opt.state[p]["absmax1"], signed=True)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = pagedopt.Adam8bit([q], block_wise=False)
    sd = opt.state_dict()
    sd["param_groups"][0]["block_wise"] = False
    opt2.load_state_dict(sd)
    st = opt2.state[q]
    assert st["absmax1"].shape == (1,)
    decoded = dequantize(st["state1"], st["absmax1"], signed=True, block_wise=False)
    assert (decoded - values).abs().max() <= 0.01 * values.abs().max()


@pytest.mark.parametrize("name", ["AdamW", "AdEMAMix", "Lion"])
def test_loaded_state_takes_the_precision_of_the_optimizer(name):
    """A 32-bit checkpoint loaded into an 8-bit optimizer is quantized (within half a code
    gap), an 8-bit one loaded into a 32-bit optimizer is decoded exactly; training goes on."""
    p = torch.nn.Parameter(torch.randn(5000))
    o32 = make(name, 32, [p])
    for _ in range(3):
        p.grad = torch.randn(5000)
        o32.step()
    q = torch.nn.Parameter(p.detach().clone())
    o8 = make(name, 8, [q])
    o8.load_state_dict(roundtrip(o32.state_dict()))
    st8, st32 = o8.state[q], o32.state[p]
    assert st8["state1"].dtype == torch.uint8 and st8["absmax1"].dtype == torch.float32
    moments = st8["state1"].shape[0] if st8["state1"].dim() == 2 else 1
    decoded = torch.stack([
        dequantize(c, a, signed=o8.kind.state_signed[0])
        for c, a in zip(st8["state1"].reshape(moments, -1), st8["absmax1"].reshape(moments, -1))
    ]).reshape(st32["state1"].shape)
    assert (decoded - st32["state1"]).abs().max() <= 0.01 * st32["state1"].abs().max()
    q.grad = torch.randn(5000)
    o8.step()
    assert torch.isfinite(q).all()
    back = torch.nn.Parameter(q.detach().clone())
    o32b = make(name, 32, [back])
    o32b.load_state_dict(o8.state_dict())
    assert o32b.state[back]["state1"].dtype == torch.float32 and "absmax1" not in o32b.state[back]
    decoded_now = torch.stack([
        dequantize(c, a, signed=o8.kind.state_signed[0])
        for c, a in zip(o8.state[q]["state1"].reshape(moments, -1), o8.state[q]["absmax1"].reshape(moments, -1))
    ]).reshape(o32b.state[back]["state1"].shape)
    assert torch.equal(o32b.state[back]["state1"], decoded_now)
