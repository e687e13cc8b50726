"""RMSNorm whose CPU forward and backward are one autograd function (nn.RMSNorm's numbers).

torch 2.13 has a fused RMSNorm kernel on CUDA only; on CPU `F.rms_norm` runs its composite, and
autograd differentiates that op by op: about 6 passes over the activations forward and 10 backward,
most of them writing a fresh [T, D] tensor. Here the forward keeps only the per-row 1/rms and the
backward is written out: 7 passes, 3 of them allocating, and two of the reductions are
`torch.linalg.vecdot`/`vector_norm`, which read their inputs once without a temporary.

    y = x * rstd * w,        rstd = 1 / sqrt(mean(x^2) + eps)
    dL/dw = sum over rows of g * x * rstd
    dL/dx = rstd * (g w - x_hat * mean(g w * x_hat)),   x_hat = x * rstd

Measured on the 2-core CPU machine (docs/PERFORMANCE.md lever 19), fwd+bwd alone, paired: 0.9 against
1.9 ms per [1,024, 256] norm (2.0x), 1.05x at [1,024, 64]; in the benchmark's training step 5.1 ms a
step. tests/unit/test_norm.py holds it to nn.RMSNorm's outputs and gradients.
Without a gradient to take (inference, evaluation), and input and scale of one dtype, torch's
composite runs instead: there an autograd function's own cost, about 13 us a call at decode
shapes, is more than it saves (12-20 us against 23-34 us a norm at [1-64, 256], measured in
inference mode).
Reduced-precision inputs are normalized in fp32 and returned in their own dtype, as torch's are.
Our own function rather than a library's: the fused kernels that exist (torch's, Apex's,
Liger-Kernel's) are CUDA or Triton only.
"""

from __future__ import annotations

import torch
from torch import nn


class _RMSNormCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).mul_(weight).to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        g = g.float()
        x_hat = x.float() * rstd
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (g * x_hat).flatten(0, -2).sum(0).to(weight.dtype)
        gw = g * weight
        dot = torch.linalg.vecdot(gw, x_hat).unsqueeze(-1).div_(x.shape[-1])
        grad_x = gw.sub_(x_hat.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_w, None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameter, same numbers) with the CPU pass as one autograd function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.weight is None or len(self.normalized_shape) != 1:
            return super().forward(x)
        # Without a gradient to take, torch's composite is cheaper (module docstring); not with
        # mixed dtypes (bf16 autocast evaluation), where torch warns and runs the composite anyway.
        takes_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if not takes_grad and x.dtype == self.weight.dtype:
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return _RMSNormCPU.apply(x, self.weight, eps)
