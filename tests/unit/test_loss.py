"""The training loop's cross-entropy (train/loss.py, the LM head taken in) against torch's, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import raymoe.train.loss as loss_mod
from raymoe.train.loss import linear_cross_entropy


def token_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss of given logits: linear_cross_entropy through an identity head (frozen)."""
    return linear_cross_entropy(logits, torch.eye(logits.shape[-1], dtype=logits.dtype), target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_loss_of_given_logits_is_torchs_loss_and_gradient(dtype):
    """Through an identity head: hidden @ I.T is the logits exactly, and the hidden states'
    gradient is the logits'."""
    torch.manual_seed(0)
    logits = (4 * torch.randn(3, 17, 301)).to(dtype).requires_grad_()
    target = torch.randint(0, 301, (3, 17))
    mask = torch.rand(3, 17) < 0.7
    ref = logits.detach().clone().requires_grad_()
    # mean, and a masked sum: the two ways the loop reduces it
    for reduce in (lambda ce: ce.mean(), lambda ce: (ce * mask).sum() / 9.0):
        logits.grad = ref.grad = None
        ours = token_cross_entropy(logits, target)
        theirs = F.cross_entropy(ref.float().flatten(0, 1), target.flatten(), reduction="none").view(3, 17)
        assert ours.dtype == torch.float32 and ours.shape == (3, 17)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)
        reduce(ours).backward()
        reduce(theirs).backward()
        assert logits.grad.dtype == dtype
        tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
        torch.testing.assert_close(logits.grad, ref.grad, **tol)
    # the gradient rows sum to zero (softmax minus one-hot) and are zero where masked off
    assert logits.grad.float().sum(-1).abs().max() < (1e-6 if dtype == torch.float32 else 1e-2)
    assert (logits.grad[~mask] == 0).all()


def test_the_loss_is_stable_for_large_logits():
    logits = torch.tensor([[1e4, 0.0, -1e4], [50.0, 50.0, 50.0]], requires_grad=True)
    loss = token_cross_entropy(logits, torch.tensor([1, 2]))
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, torch.tensor([1e4, torch.log(torch.tensor(3.0)).item()]))
    loss.sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[1.0, -1.0, 0.0], [1 / 3, 1 / 3, -2 / 3]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_gives_the_head_and_torchs_loss_and_gradients(dtype, monkeypatch):
    # 7-row chunks: 51 rows end in a partial chunk
    monkeypatch.setitem(loss_mod._CHUNK_BYTES, "cpu", 7 * 4 * 301)
    torch.manual_seed(0)
    h = torch.randn(3, 17, 24).to(dtype).requires_grad_()
    w = (0.5 * torch.randn(301, 24)).to(dtype).requires_grad_()
    target = torch.randint(0, 301, (3, 17))
    mask = torch.rand(3, 17) < 0.7
    h_ref, w_ref = (t.detach().clone().requires_grad_() for t in (h, w))
    for reduce in (lambda ce: ce.mean(), lambda ce: (ce * mask).sum() / 9.0):
        for t in (h, w, h_ref, w_ref):
            t.grad = None
        ours = linear_cross_entropy(h, w, target)
        logits = F.linear(h_ref, w_ref)
        theirs = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none").view(3, 17)
        assert ours.dtype == torch.float32 and ours.shape == (3, 17)
        tol = dict(rtol=1e-6, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
        torch.testing.assert_close(ours, theirs, **tol)
        reduce(ours).backward()
        reduce(theirs).backward()
        assert h.grad.dtype == w.grad.dtype == dtype
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(h.grad, h_ref.grad, **tol)
        torch.testing.assert_close(w.grad, w_ref.grad, **tol)
    # a masked-off token contributes nothing: its hidden state gets no gradient
    assert (h.grad[~mask] == 0).all() and h.grad[mask].abs().sum() > 0


def test_linear_cross_entropy_under_autocast_runs_the_head_in_bf16():
    torch.manual_seed(0)
    h = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(97, 16, requires_grad=True)
    target = torch.randint(0, 97, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, target)
        theirs = F.cross_entropy(F.linear(h, w).float(), target, reduction="none")
    assert ours.dtype == torch.float32
    # both saw the same bf16 logits: equal up to the order of fp32 sums
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours.sum().backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32  # the casts' backward returns the masters' dtype


def test_linear_cross_entropy_refuses_a_second_backward_and_skips_frozen_weights():
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8)  # frozen head (requires_grad False): no weight gradient is made
    loss = linear_cross_entropy(h, w, torch.randint(0, 11, (5,))).sum()
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # the logits' buffer now holds their gradient
    torch.testing.assert_close(h.grad, first)


def test_a_confident_tokens_target_gradient_survives_bf16():
    # Targets from barely to almost surely predicted (p_t up to ~0.99999). In bf16 the gradient at
    # the target, -(1 - p_t), must stay within 2% of fp32's on the same bf16 logits: keeping
    # softmax(z) in bf16 and subtracting 1 afterwards rounded p_t > 0.998 to 1 and that entry to 0.
    torch.manual_seed(0)
    T, V = 512, 301
    logits = 0.5 * torch.randn(T, V)
    target = torch.randint(0, V, (T,))
    rows = torch.arange(T)
    logits[rows, target] += torch.linspace(2, 16, T)
    logits = logits.to(torch.bfloat16)
    ref = logits.float().requires_grad_()
    F.cross_entropy(ref, target, reduction="sum").backward()
    ours = logits.clone().requires_grad_()
    token_cross_entropy(ours, target).sum().backward()
    want, got = ref.grad[rows, target], ours.grad.float()[rows, target]
    assert (want > -0.002).sum() > 100  # many tokens past the old rounding point
    assert ((got - want).abs() / want.abs()).max() < 0.02
    # and the whole rows stay torch's: the softmax entries are as before
    torch.testing.assert_close(ours.grad.float(), ref.grad, rtol=1e-2, atol=1e-4)
