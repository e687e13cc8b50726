"""All-to-all token dispatch and combine for expert parallelism.

Each rank routes its own tokens over all E experts (the router is replicated), then:

  1. sorts its kept (token, expert) slots by global expert id            (permute, moe.py)
  2. exchanges per-expert counts with the expert group (one small all-to-all)
  3. sends each slot to the rank owning its expert (all-to-all, variable splits)
  4. regroups what it received by local expert, runs the grouped GEMM
  5. sends the results back the same way (the reverse all-to-all) and combines them
     with the routing weights into token order                          (unpermute, moe.py)

Both all-to-alls are autograd functions whose backward is the opposite exchange, so gradients
of remote tokens flow back to the ranks that own them and expert gradients accumulate on the
owning rank. Works with gloo (CPU) and NCCL (GPU).

Shape suffixes: T tokens, D model dim, E experts, e local experts, N slots sent, M slots received
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from raymoe.model.moe import MoE, Routing, permute, unpermute


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; backward sends gradients back along the same paths."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


def exchange_counts(counts_E: torch.Tensor, expert_degree: int, group) -> torch.Tensor:
    """How many slots each rank of the group sends to each of my local experts: [ranks, e]."""
    recv = torch.empty_like(counts_E)
    dist.all_to_all_single(recv, counts_E.contiguous(), group=group)
    return recv.view(expert_degree, -1)


class ExpertParallelRouted:
    """Replaces `MoE.routed` on a rank that owns a slice of the experts (see apply.py)."""

    def __init__(self, moe: MoE, expert_degree: int, group):
        self.moe = moe
        self.expert_degree = expert_degree
        self.group = group
        self.bytes_sent = 0  # both all-to-alls, forward only; read and reset by the loop

    def __call__(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        moe, ep = self.moe, self.expert_degree
        x_ND, counts_E, token_N, weight_N = permute(x_TD, routing, moe.num_experts)
        # Counts must be on the host to size the buffers: one sync per layer (both splits in one
        # copy), as in any dropless EP.
        recv_counts = exchange_counts(counts_E, ep, self.group)        # [ep, e]
        send_splits, recv_splits = torch.stack([counts_E.view(ep, -1).sum(1), recv_counts.sum(1)]).tolist()
        x_MD = all_to_all(x_ND, recv_splits, send_splits, self.group)

        # Received slots are ordered (source rank, local expert); the GEMM wants local-expert order.
        e = recv_counts.shape[1]
        local_id_M = torch.repeat_interleave(torch.arange(e, device=x_MD.device).repeat(ep), recv_counts.flatten(),
                                             output_size=sum(recv_splits))  # sized on the host: no second sync
        order = torch.argsort(local_id_M, stable=True)
        y_sorted = moe.experts(x_MD.index_select(0, order), recv_counts.sum(0))  # backward: index_add_ (see permute)
        y_MD = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)

        y_ND = all_to_all(y_MD, send_splits, recv_splits, self.group)
        self.bytes_sent += (x_ND.numel() + y_MD.numel()) * x_ND.element_size()
        return unpermute(y_ND, token_N, weight_N, x_TD.shape[0])
