"""model/norm.py: raymoe's RMSNorm gives nn.RMSNorm's outputs and gradients (input and scale) on
CPU, for the shapes the model runs (tokens x hidden, batch x sequence x hidden, per-head norms),
for bf16 inputs, and without an explicit eps; it is still an nn.RMSNorm (same parameter name)."""

from __future__ import annotations

import pytest
import torch

from raymoe.model.norm import RMSNorm


def _pair(dim: int, eps: float | None):
    torch.manual_seed(0)
    ours, theirs = RMSNorm(dim, eps=eps), torch.nn.RMSNorm(dim, eps=eps)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    return ours, theirs


@pytest.mark.parametrize("shape", [(64, 32), (2, 16, 32), (2, 16, 4, 32)], ids=["2d", "3d", "per_head"])
@pytest.mark.parametrize("eps", [1e-6, None], ids=["eps", "default_eps"])
def test_outputs_and_gradients_equal_nn_rmsnorm(shape, eps):
    ours, theirs = _pair(shape[-1], eps)
    x = (torch.randn(shape) * 3).requires_grad_()
    g = torch.randn(shape)
    y1 = ours(x)
    gx1, gw1 = torch.autograd.grad(y1, (x, ours.weight), g)
    y2 = theirs(x)
    gx2, gw2 = torch.autograd.grad(y2, (x, theirs.weight), g)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw1, gw2, rtol=1e-5, atol=1e-4)


def test_bf16_inputs_are_normalized_in_fp32_and_returned_in_bf16():
    ours, theirs = _pair(32, 1e-6)
    x = torch.randn(8, 32).bfloat16().requires_grad_()
    y1, y2 = ours(x), theirs(x)
    assert y1.dtype == y2.dtype == torch.bfloat16
    torch.testing.assert_close(y1.float(), y2.float(), rtol=1e-2, atol=1e-2)
    exact = theirs(x.detach().float())  # the fp32 result: ours is that, rounded once
    assert (y1.float() - exact).abs().max() <= (y2.float() - exact).abs().max() + 1e-2
    gx1, = torch.autograd.grad(y1.float().sum(), x)
    assert gx1.dtype == torch.bfloat16 and torch.isfinite(gx1.float()).all()


def test_frozen_scale_gets_no_gradient_and_is_still_a_parameter_named_weight():
    ours, _ = _pair(16, 1e-6)
    assert isinstance(ours, torch.nn.RMSNorm) and [n for n, _ in ours.named_parameters()] == ["weight"]
    ours.weight.requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    ours(x).sum().backward()
    assert ours.weight.grad is None and x.grad is not None


def test_the_autograd_function_runs_only_where_there_is_a_gradient_to_take():
    """Inference (no_grad, inference_mode, or nothing requiring grad) runs torch's composite,
    where the function's own per-call cost outweighs its saving; training runs the function."""
    ours, theirs = _pair(32, 1e-6)
    x = torch.randn(2, 16, 32)
    assert type(ours(x.requires_grad_()).grad_fn).__name__ == "_RMSNormCPUBackward"
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    ours.weight.requires_grad_(False)
    y = ours(x.detach())
    assert y.grad_fn is None
    torch.testing.assert_close(y, theirs(x).detach(), rtol=0, atol=0)
    # bf16 activations with an fp32 scale (autocast evaluation): torch's composite would warn that
    # it "cannot dispatch to fused implementation" (once a process), so the function runs there.
    calls = []
    composite = torch.nn.functional.rms_norm
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "rms_norm", lambda *a, **k: calls.append(a[0].dtype) or composite(*a, **k))
        same, mixed = ours(x), ours(x.bfloat16())
    assert calls == [torch.float32] and mixed.dtype == torch.bfloat16
    torch.testing.assert_close(same, theirs(x).detach(), rtol=0, atol=0)
    torch.testing.assert_close(mixed.float(), theirs(x.bfloat16().float()).bfloat16().float(), rtol=0, atol=1e-2)
