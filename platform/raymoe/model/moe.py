"""DeepSeekMoE feed-forward: a top-k router, grouped routed experts and always-on shared experts.

Single-device code. Expert parallelism (parallel/) swaps how routed tokens reach the experts;
the routing math here is the same on every layout.

What is notable:
- The router runs in fp32 whatever the autocast dtype: scores, the selection bias and the
  weights are small tensors whose rounding would otherwise flip top-k choices between ranks.
- The auxiliary-loss-free bias (DeepSeek-V3) only *chooses* experts; the weights come from the
  unbiased scores. It is a buffer moved by `update_bias`, never by the optimizer.
- Routed experts are stacked weights [E, ...]; tokens are sorted by expert and each projection is
  one grouped GEMM (`torch._grouped_mm` on CUDA in bf16, contiguous segments elsewhere). Indexing
  `w[i]` per expert inside autograd would materialize a full-size [E, ...] gradient per expert.
- Inference on CPU has two more paths for the routed experts, chosen by `MoE.routed` from
  measured crossovers: every expert for every token at decode sizes (`forward_dense`), and each
  expert's tokens padded to the largest load, [E, C, D], through batched GEMMs where the padding
  is small (`forward_padded`).

Shape suffixes: B batch, S sequence, T tokens (B*S), D model dim, F expert hidden dim,
  E experts, G expert groups, K top-k, N routed (token, expert) slots kept (<= T*K)
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.config import ModelConfig


@dataclass
class Routing:
    """What the router decided for T tokens."""

    expert_TK: torch.Tensor
    """Chosen expert ids, long [T, K]."""
    weight_TK: torch.Tensor
    """Combine weights (route_scale applied), fp32 [T, K]; 0 where not kept."""
    keep_TK: torch.Tensor
    """bool [T, K]: False for slots skipped by gate_threshold or dropped by capacity."""
    tokens_per_expert_E: torch.Tensor
    """Slots each expert was chosen for before capacity drops, long [E] (what balancing sees)."""
    num_dropped: torch.Tensor
    """Slots dropped by capacity, long scalar."""
    aux_loss: torch.Tensor
    """Sum of the enabled balance losses (fp32 scalar, carries router gradients)."""
    all_kept: bool = False
    """Known without looking at the data: every slot is kept (no gate threshold, no capacity, no
    padding), so permute need not filter by keep_TK (a boolean index: a host sync on CUDA)."""

    def weights_per_expert(self, num_experts: int) -> torch.Tensor:
        """The combine weights as [T, E]: 0 where a token did not choose (or lost) an expert."""
        return self.weight_TK.new_zeros(self.weight_TK.shape[0], num_experts).scatter_add_(1, self.expert_TK, self.weight_TK)


def largest_load(weight_TE: torch.Tensor) -> int:
    """The most tokens any expert must take (a host read): the padded path's capacity C."""
    return int((weight_TE > 0).sum(0).max())


@dataclass
class MoEStats:
    """Per-layer statistics of one forward, for balancing and metrics."""

    tokens_per_expert: torch.Tensor
    """long [E]."""
    num_dropped: torch.Tensor
    """long scalar."""
    num_slots: int
    """T * K: slots the router filled."""
    expert_TK: torch.Tensor | None = None
    """The experts each token chose, long [T, K] (what a CUDA-graph decode step counts over its
    real rows only, serve/graphs.py)."""


class TopKRouter(nn.Module):
    """Scores E experts per token and picks K, with group limits, balancing and capacity."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.score_func = cfg.score_func
        self.norm_topk_prob = cfg.norm_topk_prob
        self.route_scale = cfg.route_scale
        self.num_groups = cfg.num_expert_groups
        self.top_k_groups = cfg.top_k_groups
        self.group_score = cfg.group_score
        self.gate_threshold = cfg.gate_threshold
        self.capacity_factor = cfg.capacity_factor
        self.balance = cfg.balance
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        # Selection bias of auxiliary-loss-free balancing. Persistent: it is model state.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def scores(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits and affinities in fp32, both [T, E]."""
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        if self.score_func == "softmax":
            return logits_TE, logits_TE.softmax(dim=-1)
        return logits_TE, logits_TE.sigmoid()

    def forward(self, x_TD: torch.Tensor, batch_size: int = 1, valid_T: torch.Tensor | None = None) -> Routing:
        """`valid_T` (bool [T], None = all): padding is routed (its outputs are discarded) but takes
        no expert capacity and counts in no load, balance loss or bias update."""
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        logits_TE, scores_TE = self.scores(x_TD)

        choice_TE = scores_TE.detach() + self.expert_bias  # bias picks experts, never weighs them
        if self.num_groups > 1:
            # Group limit: experts outside the best top_k_groups groups cannot be chosen. A group
            # scores the sum of its two best (biased) scores (DeepSeek-V3) or its best (V2).
            per_group_TGe = choice_TE.view(T, self.num_groups, -1)
            if self.group_score == "top2_sum":
                group_TG = per_group_TGe.topk(2, dim=-1).values.sum(-1)
            else:
                group_TG = per_group_TGe.amax(dim=-1)
            best_groups = group_TG.topk(self.top_k_groups, dim=-1).indices
            allowed_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, best_groups, True)
            allowed_TE = allowed_TG.repeat_interleave(E // self.num_groups, dim=1)
            choice_TE = choice_TE.masked_fill(~allowed_TE, float("-inf"))
        expert_TK = choice_TE.topk(K, dim=-1).indices

        weight_TK = scores_TE.gather(1, expert_TK)
        if self.norm_topk_prob:
            weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        keep_TK = weight_TK.detach() >= self.gate_threshold if self.gate_threshold > 0 else torch.ones_like(expert_TK, dtype=torch.bool)
        weight_TK = weight_TK * self.route_scale

        if valid_T is None:
            tokens_per_expert_E = count_per_expert(expert_TK.flatten(), E)
        else:
            keep_TK = keep_TK & valid_T[:, None]
            tokens_per_expert_E = count_per_expert(expert_TK.flatten(), E, valid_T[:, None].expand(T, K).flatten())
        num_dropped = torch.zeros((), dtype=torch.long, device=x_TD.device)
        if self.capacity_factor is not None:
            real = T if valid_T is None else int(valid_T.sum())  # padding does not earn capacity
            capacity = math.ceil(self.capacity_factor * real * K / E)
            keep_TK, num_dropped = _apply_capacity(expert_TK, keep_TK, capacity, E)
        weight_TK = weight_TK * keep_TK

        aux = self._balance_loss(logits_TE, scores_TE, expert_TK, batch_size, valid_T) if self.training else logits_TE.new_zeros(())
        all_kept = self.gate_threshold <= 0 and valid_T is None and self.capacity_factor is None
        return Routing(expert_TK, weight_TK, keep_TK, tokens_per_expert_E, num_dropped, aux, all_kept)

    def _balance_loss(self, logits_TE, scores_TE, expert_TK, batch_size: int, valid_T=None) -> torch.Tensor:
        b, E, K = self.balance, self.num_experts, self.top_k
        loss = logits_TE.new_zeros(())
        if valid_T is not None:
            # Means over real tokens only: padding's affinities and choices do not enter any loss.
            w_T1 = valid_T.to(logits_TE.dtype)[:, None]
            mean_T = lambda t: (t * w_T1).sum(0) / w_T1.sum().clamp(min=1)  # noqa: E731
        else:
            mean_T = lambda t: t.mean(0)  # noqa: E731
        if b.aux_loss_coef > 0 or b.seq_aux_loss_coef > 0:
            # Normalized affinities: softmax scores already sum to 1; sigmoid ones are normalized.
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
            chosen_TE = torch.zeros_like(probs_TE).scatter_(1, expert_TK, 1.0)
        if b.aux_loss_coef > 0:
            # Switch/GShard: E * sum_i f_i * P_i, f_i = share of the T*K slots routed to i.
            f_E = mean_T(chosen_TE) / K
            loss = loss + b.aux_loss_coef * E * (f_E * mean_T(probs_TE)).sum()
        if b.seq_aux_loss_coef > 0:
            # DeepSeek-V3 sequence-wise: per sequence, f_i = E / (K * S) * count_i, P_i = mean
            # normalized affinity; averaged over the batch's sequences.
            S = probs_TE.shape[0] // batch_size
            if valid_T is None:
                f_BE = chosen_TE.view(batch_size, S, E).sum(1) * (E / (K * S))
                P_BE = probs_TE.view(batch_size, S, E).mean(1)
                loss = loss + b.seq_aux_loss_coef * (f_BE * P_BE).sum(-1).mean()
            else:  # a row's S counts its real tokens; an all-padding row adds nothing
                w_BS1 = valid_T.to(probs_TE.dtype).view(batch_size, S, 1)
                S_B1 = w_BS1.sum(1)
                f_BE = (chosen_TE.view(batch_size, S, E) * w_BS1).sum(1) * E / (K * S_B1.clamp(min=1))
                P_BE = (probs_TE.view(batch_size, S, E) * w_BS1).sum(1) / S_B1.clamp(min=1)
                rows = (S_B1.squeeze(1) > 0).to(probs_TE.dtype)
                loss = loss + b.seq_aux_loss_coef * ((f_BE * P_BE).sum(-1) * rows).sum() / rows.sum().clamp(min=1)
        if b.z_loss_coef > 0:
            loss = loss + b.z_loss_coef * mean_T(torch.logsumexp(logits_TE, dim=-1)[:, None].square()).squeeze(0)
        return loss

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """b_i += rate * sign(mean_load - load_i), from the load of the whole global batch."""
        rate = self.balance.bias_update_rate
        if rate > 0:
            load = tokens_per_expert_E.float()
            self.expert_bias.add_(rate * torch.sign(load.mean() - load))


def count_per_expert(expert_N: torch.Tensor, num_experts: int, where_N: torch.Tensor | None = None) -> torch.Tensor:
    """How many slots chose each expert (only slots where `where_N`), long [E]. A scatter-add
    rather than torch.bincount, which reads the largest id back to the host (a sync on CUDA)."""
    ones = torch.ones_like(expert_N) if where_N is None else where_N.to(expert_N.dtype)
    return torch.zeros(num_experts, dtype=torch.long, device=expert_N.device).scatter_add_(0, expert_N, ones)


def _apply_capacity(expert_TK, keep_TK, capacity: int, num_experts: int):
    """Keep at most `capacity` slots per expert, earlier tokens first; returns (keep, dropped)."""
    flat_N = torch.where(keep_TK, expert_TK, num_experts).flatten()  # skipped slots -> sentinel E
    order = torch.argsort(flat_N, stable=True)
    counts = count_per_expert(flat_N, num_experts + 1)  # not bincount: no host read on CUDA
    starts = torch.cumsum(counts, 0) - counts
    sorted_experts = flat_N[order]
    rank_in_expert = torch.arange(flat_N.numel(), device=flat_N.device) - starts[sorted_experts]
    over = torch.zeros_like(flat_N, dtype=torch.bool)
    over[order] = (rank_in_expert >= capacity) & (sorted_experts < num_experts)
    over_TK = over.view_as(keep_TK)
    return keep_TK & ~over_TK, over_TK.sum()


def grouped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """out[rows of expert e] = x[rows of expert e] @ w[e]; rows sorted by expert, counts [E].

    One torch._grouped_mm call: bf16 on CUDA; fp32 or bf16 on CPU, where it gives the per-segment
    matmuls' results exactly and runs the expert GEMMs 1.1-1.3x faster (docs/PERFORMANCE.md).
    Under torch.compile (compile_decode, compile_blocks) it is one opaque op, with a backward."""
    if torch.compiler.is_compiling():
        return _grouped_mm_opaque(x_ND, w_EDF, counts)
    if _grouped_mm_kernel_takes(x_ND, w_EDF):
        out = torch._grouped_mm(x_ND, w_EDF, offs=torch.cumsum(counts, 0, dtype=torch.int32))
        if out.requires_grad:
            out.register_hook(torch.Tensor.contiguous)  # its backward refuses expanded (stride-0) gradients
        return out
    return grouped_mm_segments(x_ND, w_EDF, counts)


def _grouped_mm_kernel_takes(x_ND: torch.Tensor, w_EDF: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs this product: bf16 on CUDA, fp32 or bf16 on CPU, and
    16-byte-aligned rows (8 bf16 or 4 fp32 numbers; a LoRA rank of 2, say, takes the fallback).
    The backward's products (grad @ w^T, x^T @ grad) then qualify too."""
    aligned = (x_ND.shape[-1] * x_ND.element_size()) % 16 == 0 and (w_EDF.shape[-1] * w_EDF.element_size()) % 16 == 0
    dtypes = (torch.bfloat16,) if x_ND.is_cuda else (torch.float32, torch.bfloat16)
    return (hasattr(torch, "_grouped_mm") and x_ND.dtype == w_EDF.dtype and x_ND.dtype in dtypes and aligned
            and x_ND.device.type in ("cuda", "cpu"))


@torch.library.custom_op("raymoe::grouped_mm", mutates_args=())
def _grouped_mm_opaque(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """grouped_mm as an op torch.compile does not trace into: torch 2.13's fake kernel of
    _grouped_mm refuses fp32, and the segment loop reads counts on the host."""
    return grouped_mm(x_ND, w_EDF, counts)


@_grouped_mm_opaque.register_fake
def _(x_ND, w_EDF, counts):
    return x_ND.new_empty(x_ND.shape[0], w_EDF.shape[-1])


@torch.library.custom_op("raymoe::grouped_mm_backward", mutates_args=())
def _grouped_mm_backward(grad_NF: torch.Tensor, x_ND: torch.Tensor, w_EDF: torch.Tensor,
                         counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad x, grad w) of grouped_mm: grad @ w[e]^T per segment, and x_e^T @ grad_e per expert,
    the latter one _grouped_mm whose offsets split the contracted dimension (what autograd of
    torch._grouped_mm computes, exactly). Elsewhere the same products segment by segment."""
    grad_NF = grad_NF.contiguous()
    if _grouped_mm_kernel_takes(x_ND, w_EDF):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        return (torch._grouped_mm(grad_NF, w_EDF.transpose(-2, -1), offs=offs),
                torch._grouped_mm(x_ND.t(), grad_NF, offs=offs))
    sizes = counts.tolist()  # autograd does not run inside an op: the segment loop's backward, by hand
    g, x = grad_NF.split(sizes), x_ND.split(sizes)
    grad_x = torch.cat([ge @ we.t() for ge, we in zip(g, w_EDF.unbind(0))]) if sizes else torch.zeros_like(x_ND)
    return grad_x, torch.stack([xe.t() @ ge for xe, ge in zip(x, g)]) if sizes else torch.zeros_like(w_EDF)


@_grouped_mm_backward.register_fake
def _(grad_NF, x_ND, w_EDF, counts):
    return grad_NF.new_empty(x_ND.shape), grad_NF.new_empty(w_EDF.shape)


def _grouped_mm_setup_context(ctx, inputs, output):
    x_ND, w_EDF, counts = inputs
    ctx.save_for_backward(x_ND, w_EDF, counts)


def _grouped_mm_grad(ctx, grad_NF):
    x_ND, w_EDF, counts = ctx.saved_tensors
    grad_x, grad_w = _grouped_mm_backward(grad_NF, x_ND, w_EDF, counts)
    return grad_x, grad_w, None


_grouped_mm_opaque.register_autograd(_grouped_mm_grad, setup_context=_grouped_mm_setup_context)


def grouped_mm_segments(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """grouped_mm as one matmul per contiguous segment (CPU, fp32, unaligned shapes). unbind's
    backward stacks the per-expert gradients once, instead of each w[i] scattering into its own
    full-size zero tensor."""
    sizes = counts.tolist()
    outs = [xs @ w for xs, w in zip(x_ND.split(sizes), w_EDF.unbind(0))]
    return torch.cat(outs) if outs else x_ND.new_zeros(0, w_EDF.shape[-1])


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights, applied to tokens already sorted by expert.

    The gate and up projections are one stack, `w13` [E, D, 2F] (gate in [..., :F], up in
    [..., F:]; transformers 5 fuses them the same way), so each SwiGLU takes two grouped GEMMs
    instead of three, forward and backward alike: the input gradient is one GEMM over [N, 2F]
    instead of two products and their sum (docs/PERFORMANCE.md lever 20). `w2` [E, F, D] is the
    down projection. Model directories and checkpoints written with separate `w1`/`w3` still load
    (parallel/checkpoint.py with_fused_gate_up).

    With LoRA (model/lora.py), each projection k in (1, 3, 2) has stacked adapters `lora_Ak`
    [E, in, r] and `lora_Bk` [E, r, out], run through the same grouped GEMM: y_k += scale * (x A[e]) B[e],
    where y_1 and y_3 are the gate and up halves of x w13."""

    lora_scale: float | None = None
    lora_dropout: float = 0.0

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.num_experts = num_experts
        self.first_expert = 0  # global id of row 0: expert parallelism keeps a slice (parallel/apply.py)
        self.w13 = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))  # gate and up proj, side by side
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))  # down proj

    def _lora(self, x_ND: torch.Tensor, k: str, counts_E: torch.Tensor) -> torch.Tensor:
        a, b = getattr(self, f"lora_A{k}").to(x_ND.dtype), getattr(self, f"lora_B{k}").to(x_ND.dtype)
        return self.lora_scale * grouped_mm(grouped_mm(x_ND, a, counts_E), b, counts_E)

    def _gate_up(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate and up projections of the sorted slots, [N, F] each (halves of one [N, 2F] GEMM;
        split by chunk, whose backward writes both halves' gradients into one buffer)."""
        h_N2F = grouped_mm(x_ND, self.w13.to(x_ND.dtype), counts_E)
        if self.lora_scale is not None:
            x_ND = F.dropout(x_ND, self.lora_dropout, self.training)
            h_N2F = h_N2F + torch.cat([self._lora(x_ND, "1", counts_E), self._lora(x_ND, "3", counts_E)], dim=-1)
        return h_N2F.chunk(2, dim=-1)

    def _down(self, h_NF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        y = grouped_mm(h_NF, self.w2.to(h_NF.dtype), counts_E)
        if self.lora_scale is None:
            return y
        return y + self._lora(F.dropout(h_NF, self.lora_dropout, self.training), "2", counts_E)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, weight_N: torch.Tensor | None = None) -> torch.Tensor:
        """Expert outputs of the sorted slots; with `weight_N` each slot's output is scaled by its
        routing weight (applied to the hidden [N, F] before the down projection, the same product,
        on F numbers a slot instead of D: the combine's multiply and its backward shrink by D/F)."""
        x_ND = _autocast_input(x_ND)
        gate_NF, up_NF = self._gate_up(x_ND, counts_E)
        h_NF = F.silu(gate_NF) * up_NF
        if weight_N is not None:
            h_NF = h_NF * weight_N.to(h_NF.dtype).unsqueeze(-1)
        return self._down(h_NF, counts_E)

    def forward_dense(self, x_TD: torch.Tensor, weight_TE: torch.Tensor) -> torch.Tensor:
        """sum_e weight[t, e] * expert_e(x[t]) computed for every expert, unsorted: one batched
        GEMM over all experts for gate and up, and one [T, E*F] x [E*F, D] GEMM, weighted before
        the down projection (the same sum). For a handful of tokens (decode) this beats sorting
        them into E tiny segments; `MoE.routed` decides when. No LoRA (adapters take the grouped path)."""
        x_TD = _autocast_input(x_TD)
        w13, w2 = self.w13.to(x_TD.dtype), self.w2.to(x_TD.dtype)
        gate_ETF, up_ETF = torch.matmul(x_TD, w13).chunk(2, dim=-1)
        h_ETF = F.silu(gate_ETF) * up_ETF
        h_ETF = h_ETF * weight_TE.t().to(h_ETF.dtype).unsqueeze(-1)
        E, T, Fh = h_ETF.shape
        return h_ETF.transpose(0, 1).reshape(T, E * Fh) @ w2.reshape(E * Fh, -1)

    def forward_padded(self, x_TD: torch.Tensor, weight_TE: torch.Tensor, capacity: int) -> torch.Tensor:
        """sum_e weight[t, e] * expert_e(x[t]) with every expert's tokens gathered into `capacity`
        rows ([E, C, D]: the C highest-weighted tokens of each expert, which are all its chosen
        ones when C >= its load; the rest carry weight 0) and two batched GEMMs over the experts,
        weighted before the down projection. No sort, no per-expert loop: E * C rows of work
        against the grouped GEMM's T * K, one bmm call against E small ones. `MoE.routed` picks it
        for inference when the padding is small; no LoRA (adapters take the grouped path)."""
        x_TD = _autocast_input(x_TD)
        w13, w2 = self.w13.to(x_TD.dtype), self.w2.to(x_TD.dtype)
        weight_EC, token_EC = weight_TE.t().topk(capacity, dim=1)
        x_ECD = x_TD.index_select(0, token_EC.flatten()).view(*token_EC.shape, -1)
        gate_ECF, up_ECF = torch.bmm(x_ECD, w13).chunk(2, dim=-1)
        y_ECD = torch.bmm(F.silu(gate_ECF) * up_ECF * weight_EC.to(x_ECD.dtype).unsqueeze(-1), w2)
        return y_ECD.new_zeros(x_TD.shape[0], y_ECD.shape[-1]).index_add_(0, token_EC.flatten(), y_ECD.flatten(0, 1))


def _is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor, without importing torch.distributed.tensor (half a second) where
    nothing has: then no DTensor exists."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """Autocast does not see grouped_mm or matmul over stacked weights; cast explicitly so
    experts run in the autocast dtype too."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN: w2(silu(w1 x) * w3 x). Also the shared experts, fused into one."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SharedExperts(SwiGLU):
    """The always-on shared experts, fused into one SwiGLU; optionally gated per token by
    sigmoid(w . x) (Qwen2-MoE's shared_expert_gate)."""

    def __init__(self, dim: int, hidden: int, gated: bool = False):
        super().__init__(dim, hidden)
        self.gate = nn.Linear(dim, 1, bias=False) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if self.gate is None else torch.sigmoid(self.gate(x)) * y


def permute(x_TD: torch.Tensor, routing: Routing, num_experts: int):
    """Sort the kept (token, expert) slots by expert. Returns (x_ND, counts_E, token_N, weight_N)."""
    expert_N, weight_N = routing.expert_TK.flatten(), routing.weight_TK.flatten()
    token_N = torch.arange(x_TD.shape[0], device=x_TD.device).repeat_interleave(routing.expert_TK.shape[1])
    if not routing.all_kept:
        keep_N = routing.keep_TK.flatten()
        expert_N, token_N, weight_N = expert_N[keep_N], token_N[keep_N], weight_N[keep_N]
    order = torch.argsort(expert_N, stable=True)
    counts_E = count_per_expert(expert_N, num_experts)
    token_N = token_N[order]
    # index_select, not x_TD[token_N]: its backward is an index_add_, 6x faster on CPU than the
    # accumulating index_put_ that advanced indexing backpropagates through (docs/PERFORMANCE.md).
    return x_TD.index_select(0, token_N), counts_E, token_N, weight_N[order]


def unpermute(out_ND: torch.Tensor, token_N: torch.Tensor, weight_N: torch.Tensor | None, num_tokens: int) -> torch.Tensor:
    """Weighted sum of each token's expert outputs back into token order, [T, D]; `weight_N` None
    when the experts already weighted their outputs (GroupedExperts.forward's weight_N)."""
    weighted = out_ND if weight_N is None else out_ND * weight_N.to(out_ND.dtype).unsqueeze(-1)
    return out_ND.new_zeros(num_tokens, out_ND.shape[-1]).index_add_(0, token_N, weighted)


class MoE(nn.Module):
    """Routed experts plus shared experts; returns (y, aux_loss, stats)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.router = TopKRouter(cfg)
        self.experts = GroupedExperts(cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size)
        self.shared = SharedExperts(cfg.hidden_size, cfg.shared_width, cfg.shared_expert_gate) if cfg.shared_width else None

    dense_max_tokens: int = 16
    """Inference on CPU computes every expert for every token (GroupedExperts.forward_dense) for at
    most this many tokens, when they are expected to touch at least half of the experts anyway
    (1 - (1 - K/E)^T >= 1/2): E/K times the FLOPs, but a few GEMMs instead of E tiny ones and
    little more weight traffic. Measured 1.1-1.7x faster there and slower beyond 16 tokens on
    both decode shapes (bench/dense_experts.py, docs/PERFORMANCE.md); with fewer tokens the
    grouped GEMM reads only the experts chosen, which at real sizes is what decode costs. CUDA
    keeps the grouped GEMM until measured there."""

    padded: bool = True
    """Inference on CPU may gather each expert's tokens into a padded [E, C, D] batch
    (GroupedExperts.forward_padded) where `_padded_is_faster` says so; False keeps the dense and
    grouped paths only (the A/B switch of docs/PERFORMANCE.md and the tests)."""

    def _inference_on_cpu(self) -> bool:
        """No autograd, no adapters, every expert here as a plain CPU tensor: not sharded by FSDP
        (a DTensor, as in a training run's evaluation), nor split by expert parallelism."""
        experts = self.experts
        return (not torch.is_grad_enabled() and experts.lora_scale is None and experts.w13.device.type == "cpu"
                and experts.num_experts == self.num_experts and not _is_dtensor(experts.w13))

    def _covers_half(self, num_tokens: int) -> bool:
        """Inference on CPU over tokens expected to touch at least half of the experts: where
        reading every expert's weights costs about what the grouped GEMM's reading costs."""
        E, K = self.num_experts, self.top_k
        return 1 - (1 - K / E) ** num_tokens >= 0.5 and self._inference_on_cpu()

    def _dense_is_faster(self, num_tokens: int) -> bool:
        return num_tokens <= self.dense_max_tokens and self._covers_half(num_tokens)

    def _padded_is_faster(self, num_tokens: int, capacity: int) -> bool:
        """Whether E experts x `capacity` padded rows beat both other paths: at most 0.7 of the dense
        path's T * E rows, and at most T * K + 40 E, the grouped GEMM's rows plus its per-expert
        overhead (permute, one small GEMM per expert and projection) counted as 40 rows an expert.
        Per row both run at about the same rate here. Fitted to the 2-core CPU's timings of both
        decode shapes at 1-1,024 tokens, balanced and skewed loads (`python
        bench/dense_experts.py`, docs/PERFORMANCE.md lever 14); CUDA keeps the grouped GEMM."""
        T, E, K = num_tokens, self.num_experts, self.top_k
        return self.padded and E * capacity <= min(0.7 * T * E, T * K + 40 * E)

    def inference_path(self, num_tokens: int, routing: Routing) -> tuple[str, torch.Tensor | None, int]:
        """How `routed` runs these tokens: ("grouped" | "dense" | "padded", the routing weights as
        [T, E] for the latter two, the padded capacity). Compiled decode steps never pad: the
        capacity is a host read, which dynamo would specialize on."""
        T = num_tokens
        if not self._covers_half(T):
            return "grouped", None, 0
        weight_TE = routing.weights_per_expert(self.num_experts)
        if self.padded and not torch.compiler.is_compiling():
            capacity = largest_load(weight_TE)
            if capacity > 0 and self._padded_is_faster(T, capacity):
                return "padded", weight_TE, capacity
        return ("dense" if self._dense_is_faster(T) else "grouped"), weight_TE, 0

    def routed(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Run the routed experts; expert parallelism replaces this method (parallel/apply.py)."""
        path, weight_TE, capacity = self.inference_path(x_TD.shape[0], routing)
        if path == "padded":
            return self.experts.forward_padded(x_TD, weight_TE, capacity).to(x_TD.dtype)
        if path == "dense":
            return self.experts.forward_dense(x_TD, weight_TE).to(x_TD.dtype)
        x_ND, counts_E, token_N, weight_N = permute(x_TD, routing, self.num_experts)
        # Weighted inside the experts, before the down projection: D/F times fewer multiplies than
        # weighting the outputs (docs/PERFORMANCE.md lever 17).
        return unpermute(self.experts(x_ND, counts_E, weight_N), token_N, None, x_TD.shape[0])

    def forward(self, x_BSD: torch.Tensor, valid_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, MoEStats]:
        """`valid_BS`: False at padding (packed sft rows), which then loads no expert statistic."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        valid_T = valid_BS.reshape(B * S) if valid_BS is not None else None
        routing = self.router(x_TD, batch_size=B, valid_T=valid_T)
        y_TD = self.routed(x_TD, routing)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        slots = B * S * self.top_k if valid_T is None else int(valid_T.sum()) * self.top_k
        stats = MoEStats(routing.tokens_per_expert_E.detach(), routing.num_dropped.detach(), slots, routing.expert_TK)
        return y_TD.view(B, S, D), routing.aux_loss, stats
