"""Bad input raises a clear error naming the argument and the value."""

from __future__ import annotations

import pytest
import torch

import pagedopt


def params(n=10):
    return [torch.nn.Parameter(torch.randn(n))]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), r"Invalid lr: -1.0"),
        (dict(lr=float("nan")), r"Invalid lr: nan"),
        (dict(eps=-1e-8), r"Invalid eps: -1e-08"),
        (dict(weight_decay=-0.1), r"Invalid weight_decay: -0.1"),
        (dict(betas=(1.0, 0.999)), r"beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, -0.1)), r"beta parameter at index 1: -0.1"),
        (dict(betas=(0.9,)), r"Invalid betas: \(0.9,\) \(expected 2 values\)"),
        (dict(betas="(0.9, x)"), r"Invalid betas: '\(0.9, x\)'"),
        (dict(optim_bits=4), r"Invalid optim_bits: 4 \(must be 8 or 32\)"),
        (dict(percentile_clipping=0), r"Invalid percentile_clipping: 0"),
        (dict(percentile_clipping=101), r"Invalid percentile_clipping: 101"),
        (dict(percentile_clipping=5.5), r"Invalid percentile_clipping: 5.5"),
        (dict(min_8bit_size=-1), r"Invalid min_8bit_size: -1"),
        (dict(max_unorm=-0.5), r"Invalid max_unorm: -0.5"),
        (dict(block_wise="yes"), r"Invalid block_wise: 'yes'"),
        (dict(amsgrad=True), r"amsgrad=True is not supported"),
    ],
)
def test_adam_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pagedopt.Adam(params(), **kwargs)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: pagedopt.SGD(params(), lr=0.1), r"Invalid momentum: 0 "),
        (lambda: pagedopt.SGD(params(), lr=0.1, momentum=0.9, dampening=0.5, nesterov=True), r"Nesterov"),
        (lambda: pagedopt.LARS8bit(params(), lr=0.1, momentum=1.5), r"Invalid momentum: 1.5"),
        (lambda: pagedopt.RMSprop(params(), momentum=0.9), r"Invalid momentum: 0.9 \(RMSprop momentum"),
        (lambda: pagedopt.RMSprop(params(), centered=True), r"Invalid centered: True"),
        (lambda: pagedopt.Adagrad(params(), lr_decay=-1), r"Invalid lr_decay: -1"),
        (lambda: pagedopt.AdEMAMix(params(), t_alpha=0), r"Invalid t_alpha: 0"),
        (lambda: pagedopt.AdEMAMix(params(), betas=(0.9, 0.999)), r"expected 3 values"),
        (lambda: pagedopt.AdEMAMix(params(), alpha=-1.0), r"Invalid alpha: -1.0"),
        (lambda: pagedopt.optim.Optimizer2State("adamx", params()), r"optimizer_name='adamx' is not a known"),
        (lambda: pagedopt.optim.Optimizer2State("lion", params()), r"1-state update"),
        (lambda: pagedopt.optim.Optimizer1State("adam", params()), r"2-state update"),
        (lambda: pagedopt.Adam8bit(params(), optim_bits=16), r"Adam8bit always uses optim_bits=8"),
        (lambda: pagedopt.PagedLion(params(), is_paged=False), r"PagedLion always uses is_paged=True"),
        (lambda: pagedopt.AdamW(params(), paging={"policy": "never"}), r"policy"),
        (lambda: pagedopt.AdamW([{"params": params(), "lr": -3.0}]), r"Invalid lr: -3.0"),
    ],
)
def test_other_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_group_added_later_is_rejected_and_not_kept():
    opt = pagedopt.AdamW8bit(params())
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        opt.add_param_group({"params": params(), "weight_decay": -1.0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.complex64])
def test_unsupported_parameter_dtypes(dtype):
    t = torch.zeros(4, dtype=dtype)
    with pytest.raises(TypeError, match=f"parameter dtype {dtype} is not supported"):
        pagedopt.AdamW([t])


def test_sparse_gradient_is_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = pagedopt.AdamW8bit(emb.named_parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="weight: sparse gradients are not supported"):
        opt.step()


def test_mismatched_gradient_is_rejected():
    p = torch.nn.Parameter(torch.randn(6))
    opt = pagedopt.AdamW8bit([p])
    p.grad = torch.zeros(6)
    p.grad.data = torch.zeros(3)  # bypasses torch's own check on assignment
    with pytest.raises(RuntimeError, match=r"gradient shape \(3,\) != parameter shape \(6,\)"):
        opt.step()
    p.grad = torch.zeros(6)
    p.grad.data = torch.zeros(6, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="gradient dtype torch.float16 != parameter dtype torch.float32"):
        opt.step()


def test_bad_override_is_reported_at_the_call():
    p = torch.nn.Parameter(torch.randn(5000))
    with pytest.raises(ValueError, match="optim_bits"):
        pagedopt.GlobalOptimManager.get_instance().override_config(p, "optim_bits", 7)


@pytest.mark.parametrize("name", ["AdamW8bit", "AdEMAMix8bit", "PagedAdamW8bit", "Lion32bit"])
def test_parameter_reshaped_under_its_state_raises_at_step(name):
    w = torch.nn.Parameter(torch.randn(64, 128))
    opt = getattr(pagedopt, name)([("blocks.0.w", w)], min_8bit_size=0)
    for _ in range(2):  # the second step runs the stable plan
        w.grad = torch.randn_like(w)
        opt.step()
    before = w.detach().clone()
    w.data = w.data.reshape(128, 64)  # same elements, same storage: only the shape changed
    w.grad = torch.randn(128, 64)
    with pytest.raises(RuntimeError, match=r"blocks.0.w: the parameter has shape \(128, 64\) but its optimizer state "
                                           r"was created for shape \(64, 128\)"):
        opt.step()
    assert torch.equal(w.detach().reshape(64, 128), before)  # nothing was updated
