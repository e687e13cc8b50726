"""The training loop's cross-entropy (train/loss.py) against torch's, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raymoe.train.loss import token_cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_cross_entropy_gives_torchs_loss_and_gradient(dtype):
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


def test_token_cross_entropy_is_stable_for_large_logits():
    logits = torch.tensor([[1e4, 0.0, -1e4], [50.0, 50.0, 50.0]], requires_grad=True)
    loss = token_cross_entropy(logits, torch.tensor([1, 2]))
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, torch.tensor([1e4, torch.log(torch.tensor(3.0)).item()]))
    loss.sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[1.0, -1.0, 0.0], [1 / 3, 1 / 3, -2 / 3]]))
