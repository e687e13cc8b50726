"""Next-token cross-entropy per token, in fp32, with the LM head's matmul taken in: the training
loop's loss (the model's `forward(..., targets=)` calls `linear_cross_entropy`).

`F.cross_entropy(logits.float(), y)` is what the loop ran first, and what transformers' causal-LM
loss runs: it keeps an fp32 log-softmax for backward beside the logits, and its backward
zero-fills a one-hot gradient, then runs log-softmax's backward over it. Here the logits are the
function's own buffer (compute dtype): forward goes over it in chunks of rows small enough to
stay in cache, takes each token's log-sum-exp and, while the chunk is at hand, leaves e =
exp(z - max) in its place and keeps each row's sum s, so the exponentials are taken once. The
gradient g (softmax - onehot) is (g / s) (e - s onehot): backward changes only each row's target
entry, to e_t - s taken in fp32 and rounded once, and puts the row scale g / s on the [tokens, D]
side of the head's two backward matmuls. No pass over [tokens, vocab] is left in backward, and
in bf16 a confident token's target entry keeps its gradient, -(1 - p_t): leaving softmax(z) in
bf16 and subtracting 1 rounded p_t > 0.998 to 1 and that entry to 0. No other [tokens, vocab]
buffer is made, and none in fp32: fp32 work is one chunk at a time. tests/unit/test_loss.py
holds it to F.linear + F.cross_entropy's loss and gradients.

Measured on the CPU benchmark shape (1,024 tokens, vocab 8,000; docs/PERFORMANCE.md): the
unchunked loss over handed-out logits (lever 10) saved 12.8 ms a step against F.cross_entropy;
taking the head in (lever 13) saved 6-23 ms more, paired in one process; the softmax left by
forward (lever 22) 2.0-2.7 ms of the head and loss's 57, paired alone (faster in 50-52 of 60
rounds); the row scales moved off the buffer (lever 26) 1.7% of the head and loss alone (faster
in 28 of 40 rounds) and nothing measurable in a whole step: kept for the bf16 gradient. The idea
of fusing the head with the loss is Liger-Kernel's FusedLinearCrossEntropy (which computes the
gradient in forward instead) and Apple's cut-cross-entropy.

Our own autograd function rather than a library's: torch has no fused cross-entropy, and the
fused ones that exist elsewhere (Liger-Kernel, cut-cross-entropy) are Triton kernels for GPUs.
"""

from __future__ import annotations

import torch


# fp32 bytes of one chunk of rows: on CPU about a core's L2 (measured: 32-128 rows of 8,000 gave the
# same time, all rows at once 9 ms more); on CUDA the chunk only bounds the fp32 temporary.
_CHUNK_BYTES = {"cpu": 2 << 20, "cuda": 256 << 20}


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows of logits the loss works on at a time (parallel/memory.py plans its fp32 temporary)."""
    return max(1, _CHUNK_BYTES.get(device.type, 256 << 20) // (4 * vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TD: torch.Tensor, w_VD: torch.Tensor, target_T: torch.Tensor, for_backward: bool) -> torch.Tensor:
        z_TV = h_TD @ w_VD.t()
        rows = chunk_rows(z_TV.shape[1], z_TV.device)
        loss_T = z_TV.gather(-1, target_T.unsqueeze(-1)).squeeze(-1).float().neg_()  # -z[target] + lse below
        sum_T = loss_T.new_empty(loss_T.shape) if for_backward else None
        for i in range(0, z_TV.shape[0], rows):
            z = z_TV[i:i + rows]
            p = z.float() if z.dtype != torch.float32 else z
            # log-sum-exp = max + log(sum(exp(z - max))); the exponentials and their sums are what
            # backward needs (softmax = exp / sum): kept, in the logits' buffer, when a backward follows
            m = p.amax(-1, keepdim=True)
            total = p.sub_(m).exp_().sum(-1, keepdim=True)
            loss_T[i:i + rows] += (m + total.log()).squeeze(-1)
            if for_backward:
                sum_T[i:i + rows] = total.squeeze(-1)
                if p is not z:
                    z.copy_(p)
        if for_backward:
            ctx.save_for_backward(h_TD, w_VD, target_T, z_TV, sum_T)
        return loss_T

    @staticmethod
    def backward(ctx, grad_T: torch.Tensor):
        # Unpacking checks the saved buffer is unmodified, so a second backward through the same
        # graph (retain_graph) fails loudly instead of reading the gradient written below.
        h_TD, w_VD, target_T, e_TV, sum_T = ctx.saved_tensors
        # d loss / d z = g * (softmax(z) - onehot(target)) = (g / sum) * (e - sum * onehot), with e =
        # exp(z - max) as forward left it: only each row's target entry changes (taken in fp32,
        # rounded once), and the row scale g / sum goes onto the products' [T, D] sides, not over
        # the [T, V] buffer.
        t_T1 = target_T.unsqueeze(-1)
        e_TV.scatter_(-1, t_T1, (e_TV.gather(-1, t_T1).float() - sum_T.unsqueeze(-1)).to(e_TV.dtype))
        scale_T1 = (grad_T.float() / sum_T).unsqueeze(-1)
        grad_h = (e_TV @ w_VD).mul_(scale_T1) if ctx.needs_input_grad[0] else None
        grad_w = e_TV.t() @ (h_TD * scale_T1.to(h_TD.dtype)) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log softmax(hidden @ weight.T)[target] for every position, without handing the logits out.
    `hidden` [..., D], `weight` [V, D] (the LM head's), `target` long [...]; fp32 loss shaped like
    `target`. Under autocast the matmuls run in its dtype, as nn.Linear's would."""
    D = hidden.shape[-1]
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    # Evaluation (no gradient to take) keeps no exponentials or sums for a backward that never runs.
    for_backward = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(dev, enabled=False):
        loss = _LinearCrossEntropy.apply(hidden.reshape(-1, D), weight, target.reshape(-1), for_backward)
    return loss.view(target.shape)
