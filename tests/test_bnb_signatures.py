"""Every public class of bitsandbytes 0.49's ``bnb.optim`` has the same positional parameters,
order and defaults in pagedopt; pagedopt's additions are keyword-only after them.

The table in ``tests/data/bitsandbytes_0.49_signatures.json`` was read from bitsandbytes'
source at tag 0.49.0 (its ``source`` entry names the commit).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

import pagedopt
from pagedopt import optim

TABLE = json.loads((Path(__file__).parent / "data" / "bitsandbytes_0.49_signatures.json").read_text())
CLASSES = TABLE["classes"]
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _positional(cls):
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return [p for p in params if p.kind in POSITIONAL], [p for p in params if p.kind not in POSITIONAL]


def test_table_names_its_source():
    assert TABLE["source"]["version"] == "0.49.0" and len(TABLE["source"]["commit"]) == 40
    assert len(TABLE["exported_from_bitsandbytes_optim"]) == 40


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_positional_parameters_match_bitsandbytes_049(name):
    expected = CLASSES[name]["params"]
    positional, rest = _positional(getattr(optim, name))
    assert [p.name for p in positional] == [e["name"] for e in expected], name
    for p, e in zip(positional, expected):
        if "default" in e:
            assert _plain(p.default) == e["default"], (name, p.name)
        else:
            assert p.default is inspect.Parameter.empty, (name, p.name)
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in rest)
    assert not {p.name for p in rest} & {e["name"] for e in expected}


@pytest.mark.parametrize("name", sorted(n for n in optim.OPTIMIZER_NAMES if n not in CLASSES))
def test_pagedopt_only_paged_variants_follow_their_unpaged_class(name):
    """PagedSGD8bit etc. are not in 0.49: positional parameters as SGD8bit, minus is_paged."""
    unpaged = name.removeprefix("Paged")
    want = [e["name"] for e in CLASSES[unpaged]["params"] if e["name"] != "is_paged"]
    assert [p.name for p in _positional(getattr(optim, name))[0]] == want


def _p(n=4096):
    return [torch.nn.Parameter(torch.zeros(n))]


def test_positional_calls_bind_like_bitsandbytes():
    """The calls from issue 17 that shifted by one argument before."""
    args = {"optim_bits": 8}
    opt = pagedopt.Lion8bit(_p(), 1e-3, (0.8, 0.9), 0.1, args)
    assert opt.optim_bits == 8 and opt.param_groups[0]["weight_decay"] == 0.1
    opt = pagedopt.SGD8bit(_p(), 0.1, 0.9, 0, 0.01, False, None, 1024)
    assert opt.optim_bits == 8 and opt.args.min_8bit_size == 1024
    opt = pagedopt.AdEMAMix8bit(_p(), 1e-3, (0.9, 0.99, 0.999), 4.0, None, None, 1e-8, 0.0, 2048, False)
    assert opt.optim_bits == 8 and opt.args.min_8bit_size == 2048 and not opt.is_paged
    opt = pagedopt.LAMB32bit(_p(), 1e-3, True, (0.9, 0.999), 1e-8, 0, False, True, None, 4096, 100, False, 0.5)
    assert opt.optim_bits == 32 and opt.args.max_unorm == 0.5
    opt = pagedopt.PagedAdamW8bit(_p(), 1e-3, (0.9, 0.999), 1e-8, 0.01, False, 32, None, 512)
    assert opt.optim_bits == 8 and opt.is_paged and opt.args.min_8bit_size == 512
    opt = pagedopt.Adagrad8bit(_p(), 0.01, 0, 0, 0, 1e-10, 8)
    assert opt.optim_bits == 8


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: pagedopt.Adam8bit(_p(), optim_bits=16), r"Adam8bit always uses optim_bits=8; got optim_bits=16 \(optim_bits must be 8 or 32"),
        (lambda: pagedopt.AdamW32bit(_p(), optim_bits=8), r"AdamW32bit always uses optim_bits=32; got optim_bits=8 \(use AdamW8bit instead\)"),
        (lambda: pagedopt.SGD8bit(_p(), 0.1, 0.9, optim_bits=32), r"use SGD32bit instead"),
        (lambda: pagedopt.PagedLion8bit(_p(), optim_bits=32), r"use PagedLion32bit instead"),
        (lambda: pagedopt.PagedLion(_p(), is_paged=False), r"PagedLion always uses is_paged=True; got is_paged=False \(use Lion instead\)"),
        (lambda: pagedopt.PagedAdamW8bit(_p(), is_paged=False), r"use AdamW8bit instead"),
    ],
)
def test_conflicting_pinned_arguments_suggest_a_class_that_exists(call, message):
    with pytest.raises(ValueError, match=message):
        call()
    suggested = message.split("use ")[-1].split(" instead")[0]
    if suggested.isidentifier():
        assert suggested in optim.OPTIMIZER_NAMES


def test_placeholder_defaults_keep_the_variant_meaning():
    assert pagedopt.Adam8bit(_p(), optim_bits=32).optim_bits == 8  # 0.49's placeholder
    assert pagedopt.PagedAdam(_p(), is_paged=False).is_paged  # 0.49 ignores it too
    assert pagedopt.Adagrad32bit(_p(), optim_bits=32).optim_bits == 32


def test_pytorch_lars_matches_float64_reference():
    torch.manual_seed(0)
    for nesterov, wd, shape in ((False, 0.0, (4097,)), (True, 1e-2, (33, 7)), (False, 1e-2, (1,))):
        w = torch.nn.Parameter(torch.randn(shape))
        ref = w.detach().double().clone()
        opt = optim.PytorchLARS([w], lr=0.1, momentum=0.9, weight_decay=wd, nesterov=nesterov, max_unorm=0.02)
        buf = None
        for step in range(5):
            g = torch.randn(shape)
            w.grad = g.clone()
            opt.step()
            d = g.double() + wd * ref
            buf = d.clone() if buf is None else 0.9 * buf + d
            upd = d + 0.9 * buf if nesterov else buf
            bound = 0.02 * ref.norm()
            if upd.norm() > bound:
                upd = upd * bound / upd.norm()
            ref = ref - 0.1 * upd
        torch.testing.assert_close(w.detach().double(), ref, rtol=1e-5, atol=1e-6)  # fp32 math vs float64


def test_pytorch_lars_skips_grad_none_and_updates_bf16():
    a = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.ones(8))
    opt = optim.PytorchLARS([a, b], lr=0.5, momentum=0.5, max_unorm=0.0)
    a.grad = torch.ones(8, dtype=torch.bfloat16)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(8)) and b not in opt.state
    assert a.dtype == torch.bfloat16 and torch.equal(a.detach().float(), torch.full((8,), 0.5))
    with pytest.raises(ValueError, match="Nesterov"):
        optim.PytorchLARS([b], nesterov=True)
