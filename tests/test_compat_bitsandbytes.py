"""``pagedopt.compat.bitsandbytes``: code written for bitsandbytes runs with only its import
changed, or unchanged behind the opt-in ``install_alias``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pagedopt
import pagedopt.compat.bitsandbytes as compat
from pagedopt.compat.bitsandbytes.optim.ademamix import _ReferenceAdEMAMix

ROOT = Path(__file__).resolve().parents[1]

# A small training program written against bitsandbytes 0.49's documented API (positional
# arguments in its order, GlobalOptimManager overrides, StableEmbedding, functional calls).
BNB_PROGRAM = textwrap.dedent("""
    import torch
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from bitsandbytes.optim import GlobalOptimManager
    from bitsandbytes.optim.adamw import PagedAdamW8bit

    torch.manual_seed(0)
    model = torch.nn.Sequential(bnb.nn.StableEmbedding(100, 64), torch.nn.Flatten(), torch.nn.Linear(4 * 64, 4096))
    mng = GlobalOptimManager.get_instance()
    mng.register_parameters(model.parameters())
    mng.override_config(model[2].bias, "optim_bits", 32)
    opts = [
        bnb.optim.Adam8bit(model.parameters(), 1e-3, (0.9, 0.995), 1e-8, 0.0, False, 32, None, 4096, 100, True),
        bnb.optim.Lion8bit(model.parameters(), 1e-4, (0.9, 0.99), 0.0, None, 4096),
        bnb.optim.SGD8bit(model.parameters(), 0.01, 0.9, 0, 0, False, None, 4096),
        bnb.optim.LAMB8bit(model.parameters(), 1e-3, True, (0.9, 0.999), 1e-8, 0, False, True, None, 4096, 100,
                           False, 1.0),
        PagedAdamW8bit(model.parameters(), lr=1e-3),
        bnb.optim.PytorchLARS(model.parameters(), 0.01, 0.9),
    ]
    x = torch.randint(0, 100, (8, 4))
    for opt in opts:
        for _ in range(3):
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        state = opt.state[model[2].weight]
        if "absmax1" in state:
            m = F.dequantize_blockwise(state["state1"], absmax=state["absmax1"], code=state["qmap1"], blocksize=256)
            assert torch.isfinite(m).all()
        sd = opt.state_dict()
        opt.load_state_dict(sd)
    assert opts[0].state[model[2].bias]["state1"].dtype == torch.float32  # the override
    assert opts[0].state[model[0].weight]["state1"].dtype == torch.float32  # StableEmbedding: 32-bit
    assert opts[0].state[model[2].weight]["state1"].dtype == torch.uint8
    codes, qs = F.quantize_blockwise(torch.randn(1000))
    assert F.dequantize_blockwise(codes, qs).shape == (1000,)
    print("ok", type(opts[0]).__module__, bnb.__version__)
""")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_bitsandbytes_program_runs_with_the_import_changed():
    code = BNB_PROGRAM.replace("import bitsandbytes as bnb", "import pagedopt.compat.bitsandbytes as bnb")
    code = code.replace("import bitsandbytes.functional as F", "import pagedopt.compat.bitsandbytes.functional as F")
    code = code.replace("from bitsandbytes.", "from pagedopt.compat.bitsandbytes.")
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok pagedopt.optim.adam 0.49.0")


def test_bitsandbytes_program_runs_unchanged_behind_the_alias():
    code = "import pagedopt.compat.bitsandbytes as c; c.install_alias(replace=True)\n" + BNB_PROGRAM
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok pagedopt.optim.adam")


def test_alias_is_opt_in_reversible_and_refuses_to_shadow_a_loaded_bitsandbytes():
    result = _run(textwrap.dedent("""
        import sys, types
        import pagedopt.compat.bitsandbytes as c
        real = types.ModuleType("bitsandbytes"); real.__file__ = "/site-packages/bitsandbytes/__init__.py"
        sys.modules["bitsandbytes"] = real
        try:
            c.install_alias()
        except RuntimeError as e:
            assert "already imported" in str(e), e
        else:
            raise AssertionError("no error")
        c.install_alias(replace=True)
        c.install_alias()  # twice is harmless
        import bitsandbytes.optim.optimizer as o, bitsandbytes.nn
        assert sys.modules["bitsandbytes"] is c and o.GlobalOptimManager is c.optim.GlobalOptimManager
        c.uninstall_alias()
        assert sys.modules["bitsandbytes"] is real and "bitsandbytes.optim" not in sys.modules
        print("ok")
    """))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_module_shape_matches_bitsandbytes_optim_names():
    import json

    table = json.loads((ROOT / "tests" / "data" / "bitsandbytes_0.49_signatures.json").read_text())
    for name in table["exported_from_bitsandbytes_optim"] + ["GlobalOptimManager"]:
        assert hasattr(compat.optim, name), name
    assert compat.optim.AdamW8bit is pagedopt.AdamW8bit
    for name in ("quantize_blockwise", "dequantize_blockwise", "create_dynamic_map", "percentile_clipping",
                 "optimizer_update_8bit_blockwise", "optimizer_update_32bit", "QuantState"):
        assert callable(getattr(compat.functional, name)), name
    assert compat.nn.StableEmbedding is pagedopt.StableEmbedding


def test_embedding_keeps_32bit_state_under_8bit_optimizers():
    emb = compat.nn.Embedding(5000, 8)
    lin = torch.nn.Linear(64, 64)
    opt = compat.optim.AdamW8bit([*emb.parameters(), *lin.parameters()], min_8bit_size=1)
    emb(torch.tensor([1, 2])).sum().backward()
    lin(torch.randn(2, 64)).sum().backward()
    opt.step()
    assert opt.state[emb.weight]["state1"].dtype == torch.float32
    assert opt.state[lin.weight]["state1"].dtype == torch.uint8


def test_reference_ademamix_matches_pagedopt_32bit():
    torch.manual_seed(7)
    a, b = torch.nn.Parameter(torch.randn(4097)), None
    b = torch.nn.Parameter(a.detach().clone())
    ref = _ReferenceAdEMAMix([a], lr=1e-2, t_alpha=5, t_beta3=5)
    ours = pagedopt.AdEMAMix32bit([b], lr=1e-2, t_alpha=5, t_beta3=5)
    for _ in range(8):
        g = torch.randn(4097)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)  # fp32, different op order
