"""Per-rank training memory of a config at a layout, and the layout `raymoe plan` would choose.

    plan = plan_layout(cfg, gpus=8, gpu_memory=80e9)          # raymoe plan CONFIG --gpus 8 --gpu-memory 80GB
    print(format_plan(plan))

Parameters, gradients and optimizer state are exact: the model is built on the meta device (no
memory, milliseconds even for DeepSeek-V3) with the run's LoRA and freezing applied, and every
tensor is cut the way parallel/apply.py cuts it: routed experts by expert parallelism (rows of
the stacked [E, ...] weights), dense tensors either whole on every rank (parallel.dense:
replicate) or as FSDP2's dim-0 shard (fsdp: ceil(rows / world) rows, padded, as fully_shard
allocates them), and under fsdp the expert stacks also split over their replicas (ceil(local
experts / data degree) rows). Gradients exist for trainable tensors only, in the parameter's dtype; AdamW holds
two fp32 moments per trainable element. A test holds these figures equal to the bytes the
training loop reports holding (memory/*_bytes) in gloo runs of 1, 2 and 4 ranks.

Activations are an estimate, element by element from what the model's forward saves for
backward (attention.py, moe.py, transformer.py), per token of one micro-batch:

    block input, kept in fp32 (the residual stream)   D per norm (2 per block)
    every matmul's input                              D, kv_lora_rank, ..., in the compute dtype
    attention: q, k, v, output (and its copy for wo)  plus one fp32 log-sum-exp per head
    dense SwiGLU                                      4 F (w1 out, w3 out, silu out, w2 input)
    routed experts                                    2 K D (gathered input, output) + 4 K F
    router                                            E fp32 scores, K weights and indices
    LM head                                           the logits (compute dtype), kept by the fused head + loss (train/loss.py)

It assumes fused RMSNorm and a fused attention kernel (flash or memory-efficient: no S x S
matrix), which is what CUDA runs. With activation checkpointing (train.activation_checkpointing:
1) only each block's input is kept, plus one block's activations while it is recomputed. Tested
against the bytes torch's saved-tensor hooks see on CPU in fp32 (within 15%); on CUDA in bf16 the
GPU checks compare it with torch.cuda.max_memory_allocated when a device is lent.

Transient buffers are added on top: the loss's fp32 work on one chunk of logit rows (its
backward uses the logits' own buffer as their gradient, up to a row scale); with replicated dense parameters
the gradient all-reduce's
flat copy (parallel/apply.py); with FSDP two blocks' unsharded parameters (one computing, one
prefetched; their local experts too when those are FSDP-sharded) and one block's unsharded
gradients. What is not modelled: the CUDA context and
NCCL buffers, allocator fragmentation, all-to-all imbalance. `headroom` (default 10% of the
device) stands for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from raymoe.config import RunConfig
from raymoe.train.loss import chunk_rows

GB = 1e9


@dataclass(frozen=True)
class Layout:
    expert_degree: int
    dense: str  # "replicate" | "fsdp"
    activation_checkpointing: int  # 0 = off, 1 = every block recomputed

    def describe(self, world: int) -> str:
        data = world // self.expert_degree
        ac = "activation checkpointing" if self.activation_checkpointing else "no recomputation"
        return (f"expert degree {self.expert_degree} x data degree {data}, dense {self.dense}"
                + (f" (FSDP degree {world})" if self.dense == "fsdp" else "") + f", {ac}")


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds at peak (rank 0: FSDP's first shards are never smaller than the others)."""

    params: int
    grads: int
    optimizer: int
    activations: int
    transient: int
    buffers: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.transient + self.buffers


@dataclass
class Plan:
    cfg: RunConfig
    gpus: int
    gpu_memory: int
    headroom: float
    seq_len: int
    batch_size: int
    chosen: tuple[Layout, RankMemory] | None
    candidates: list[tuple[Layout, RankMemory]] = field(default_factory=list)
    device_type: str = "cuda"
    fits_at_batch: int | None = None
    """When nothing fits: the largest smaller train.batch_size at which some layout would."""

    @property
    def budget(self) -> int:
        return int(self.gpu_memory * (1 - self.headroom))


def meta_model(cfg: RunConfig):
    """The run's model on the meta device, with LoRA adapters and trainable flags as training sets them."""
    from raymoe.model.lora import apply_lora, set_trainable
    from raymoe.model.transformer import MoETransformer

    with torch.device("meta"):
        model = MoETransformer(cfg.model)
    apply_lora(model, cfg.lora)
    set_trainable(model, cfg)
    return model


def _shard_numel(shape: tuple[int, ...], ways: int) -> int:
    """Elements of rank 0's dim-0 shard, as FSDP2's fully_shard pads and allocates it."""
    if not shape:
        return 1
    rows = math.ceil(shape[0] / ways)
    return rows * math.prod(shape[1:])


def _compute_bytes(cfg: RunConfig, device_type: str) -> int:
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device_type == "cuda")
    return 2 if bf16 else 4


def state_bytes(cfg: RunConfig, world: int, layout: Layout, device_type: str = "cuda", model=None) -> dict[str, int]:
    """Exact per-rank bytes of parameters, gradients, AdamW moments and buffers; plus the largest
    block's dense parameter bytes (whole, in the compute dtype) and the dense gradient bytes the
    replicated all-reduce copies, for the transient term."""
    from raymoe.model.moe import MoE

    model = model if model is not None else meta_model(cfg)
    ep = layout.expert_degree
    fsdp = layout.dense == "fsdp" and world > 1
    expert_ids = {id(p) for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters()}
    c = _compute_bytes(cfg, device_type)
    # The loop keeps a LoRA run's frozen base in bf16 under bf16 compute (model/lora.cast_frozen_).
    frozen_bf16 = cfg.lora.enabled and c == 2 and not fsdp
    out = dict(params=0, grads=0, optimizer=0, buffers=0, dense_grads=0, expert_grads=0)
    expert_fsdp = fsdp and world // ep > 1  # experts FSDP-sharded over their replicas too
    for name, p in model.named_parameters():
        if id(p) in expert_ids:
            local_shape = (p.shape[0] // ep, *p.shape[1:])
            numel = _shard_numel(local_shape, world // ep) if expert_fsdp else math.prod(local_shape)
        elif fsdp:
            numel = _shard_numel(tuple(p.shape), world)
        else:
            numel = math.prod(p.shape)
        size = p.element_size()
        if frozen_bf16 and not p.requires_grad and p.dim() >= 2 and name != "embed.weight":
            size = 2
        out["params"] += numel * size
        if p.requires_grad:
            out["grads"] += numel * size
            out["optimizer"] += 2 * numel * 4
            out["expert_grads" if id(p) in expert_ids else "dense_grads"] += numel * size
    for b in model.buffers():
        out["buffers"] += math.prod(b.shape) * b.element_size()
    # FSDP unshards one block at a time (whole, compute dtype), and with expert FSDP its local
    # experts (this rank's expert slice, gathered over the replicas).
    def unsharded(block, trainable_only: bool) -> int:
        n = 0
        for p in block.parameters():
            if trainable_only and not p.requires_grad:
                continue
            if id(p) not in expert_ids:
                n += math.prod(p.shape)
            elif expert_fsdp:
                n += math.prod(p.shape) // ep
        return n

    out["block_unsharded"] = max(unsharded(b, False) for b in model.layers) * c
    out["block_unsharded_grads"] = max(unsharded(b, True) for b in model.layers) * 4
    out["expert_fsdp"] = expert_fsdp
    return out


def _block_activation_elements(cfg: RunConfig, layer: int, cpu: bool) -> tuple[float, float]:
    """(fp32 elements, compute-dtype elements) one block saves for backward, per token."""
    m = cfg.model
    D, H = m.hidden_size, m.num_heads
    # The residual stream enters each of the two norms in fp32; CPU's unfused RMSNorm keeps one more.
    f32 = 2 * D * (2 if cpu else 1)
    comp = D  # the attention matmuls' shared input (the normed block input)
    r_lora = cfg.lora.rank if cfg.lora.enabled else 0
    if m.attention == "mla":
        n, r, v, L, q = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank, m.q_lora_rank
        if q > 0:
            f32 += q * (2 if cpu else 1)
            comp += q + q  # wq_a output (the norm's input), wq_b input
        comp += (L + r) + L  # wkv_a output (latent + rotary key), wkv_b input (the normed latent)
        f32 += L if cpu else 0
        comp += 2 * H * (n + r)  # q and k as attention takes them (rotary part concatenated)
        comp += H * (n + v)  # the expanded kv, of which v is a view
        comp += 2 * H * v  # attention output, and its [B, S, H*v] copy for wo
        projections = 4 + (1 if q > 0 else 0)
    else:
        d, J = m.resolved_head_dim, m.resolved_kv_heads
        comp += 2 * H * d + 2 * J * d  # q and k after RoPE, v, attention output
        comp += H * d  # the [B, S, H*d] copy for wo
        if m.qk_norm != "none":
            comp += H * d + J * d
        projections = 4
    f32 += H  # the attention kernel's log-sum-exp
    comp += D  # the FFN's input (the normed residual)
    attention_lora = "attention" in cfg.lora.targets
    comp += r_lora * projections if attention_lora else 0
    if m.is_moe_layer(layer):
        E, K, F = m.num_experts, m.top_k, m.expert_intermediate_size
        f32 += E + 2 * K + 3 * K * 2  # router scores, kept weights and their sorted copy; 3 int64 indices per slot
        comp += 2 * K * D + 4 * K * F  # gathered expert input, expert output; w1/w3 out, silu out, w2 input
        if "routed_experts" in cfg.lora.targets:
            comp += 3 * K * r_lora
        Fs = m.shared_width
        if Fs:
            comp += 4 * Fs + (1 if m.shared_expert_gate else 0)
            comp += 3 * r_lora if "shared_experts" in cfg.lora.targets else 0
    else:
        comp += 4 * m.dense_intermediate_size
        comp += 3 * r_lora if "dense_ffn" in cfg.lora.targets else 0
    return f32, comp


def activation_parts(cfg: RunConfig, tokens: int, checkpointing: int = 0, device_type: str = "cuda") -> tuple[int, int]:
    """(bytes kept from forward to backward, bytes of one block rebuilt during backward) of one
    micro-batch of `tokens` tokens on one rank; the second is 0 without activation checkpointing.
    An estimate: see the module docstring."""
    cpu = device_type == "cpu"
    c = _compute_bytes(cfg, device_type)
    per_block = [f * 4 + e * c for f, e in (_block_activation_elements(cfg, i, cpu) for i in range(cfg.model.num_layers))]
    D, V = cfg.model.hidden_size, cfg.model.vocab_size
    head = D * 4 * (2 if cpu else 1) + D * c + V * c + 4 + 8  # final norm, head input, logits, log-sum-exp, token ids
    if checkpointing:
        # Each block keeps only its fp32 input; one block at a time is rebuilt for its backward.
        return int((cfg.model.num_layers * D * 4 + head) * tokens), int(max(per_block) * tokens)
    return int((sum(per_block) + head) * tokens), 0


def activation_bytes(cfg: RunConfig, tokens: int, checkpointing: int = 0, device_type: str = "cuda") -> int:
    return sum(activation_parts(cfg, tokens, checkpointing, device_type))


def rank_memory(cfg: RunConfig, world: int, layout: Layout, *, seq_len: int | None = None, batch_size: int | None = None,
                device_type: str = "cuda", model=None) -> RankMemory:
    s = state_bytes(cfg, world, layout, device_type, model)
    tokens = (seq_len or cfg.train.seq_len) * (batch_size or cfg.train.batch_size)
    fsdp = layout.dense == "fsdp" and world > 1
    if fsdp:
        transient = 2 * s["block_unsharded"] + s["block_unsharded_grads"]
    elif world > 1:
        transient = s["dense_grads"]  # the flat all-reduce buffer of parallel/apply.py
    else:
        transient = 0
    if world // layout.expert_degree > 1 and not s["expert_fsdp"]:
        transient = max(transient, s["expert_grads"])  # the replica groups' flat buffer (one at a time)
    # The fused head + loss (train/loss.py) works in fp32 on one chunk of logit rows at a time; its
    # backward uses the logits' buffer (kept in the activations) as their gradient, up to a row scale.
    V = cfg.model.vocab_size
    transient += min(tokens, chunk_rows(V, torch.device(device_type))) * V * 4
    return RankMemory(params=s["params"], grads=s["grads"], optimizer=s["optimizer"], buffers=s["buffers"],
                      activations=activation_bytes(cfg, tokens, layout.activation_checkpointing, device_type),
                      transient=transient)


def layouts(cfg: RunConfig, gpus: int) -> list[Layout]:
    """Every layout the trainer can run on `gpus` ranks, fastest-first: no recomputation before
    recomputation, replicated dense parameters (no per-block gathers; measured faster at small
    sizes, docs/PERFORMANCE.md) before FSDP, the widest expert degree (fewest expert bytes) first."""
    E = cfg.model.num_experts
    degrees = sorted((d for d in range(1, gpus + 1) if gpus % d == 0 and (E == 0 or E % d == 0)), reverse=True)
    if E == 0:
        degrees = [1]
    dense = ["replicate", "fsdp"] if gpus > 1 else ["replicate"]
    return [Layout(d, m, ac) for ac in (0, 1) for m in dense for d in degrees]


def plan_layout(cfg: RunConfig, gpus: int, gpu_memory: int, *, headroom: float = 0.1, seq_len: int | None = None,
                batch_size: int | None = None, device_type: str = "cuda") -> Plan:
    """The first layout (in `layouts` order) whose rank-0 bytes fit in gpu_memory * (1 - headroom)."""
    if gpus < 1:
        raise ValueError(f"--gpus {gpus} must be >= 1")
    model = meta_model(cfg)
    seq_len, batch_size = seq_len or cfg.train.seq_len, batch_size or cfg.train.batch_size
    plan = Plan(cfg, gpus, gpu_memory, headroom, seq_len, batch_size, None, device_type=device_type)
    for layout in layouts(cfg, gpus):
        mem = rank_memory(cfg, gpus, layout, seq_len=seq_len, batch_size=batch_size, model=model, device_type=device_type)
        plan.candidates.append((layout, mem))
        if plan.chosen is None and mem.total <= plan.budget:
            plan.chosen = (layout, mem)
    if plan.chosen is None:
        best = min(plan.candidates, key=lambda lm: lm[1].total)[0]
        plan.fits_at_batch = next((b for b in range(batch_size - 1, 0, -1) if rank_memory(
            cfg, gpus, best, seq_len=seq_len, batch_size=b, model=model, device_type=device_type).total <= plan.budget), None)
    return plan


def format_plan(plan: Plan, all_layouts: bool = False) -> str:
    """The plan as `raymoe plan` prints it: per (dense layout, recomputation) the widest expert
    degree, the chosen layout, and every layout with all_layouts."""
    from raymoe.model.params import count_params, human

    cfg = plan.cfg
    counts = count_params(cfg.model)
    lines = [
        f"{cfg.name}: {human(counts.total)} parameters ({human(counts.activated)} activated), "
        f"{plan.gpus} {'GPU' if plan.device_type == 'cuda' else 'CPU worker'}(s) of {plan.gpu_memory / GB:.1f} GB, {plan.headroom:.0%} headroom -> {plan.budget / GB:.1f} GB per rank",
        f"micro-batch {plan.batch_size} x {plan.seq_len} tokens per rank, "
        + ("bf16" if _compute_bytes(cfg, plan.device_type) == 2 else "fp32") + f" compute on {plan.device_type}, AdamW"
        + (f", LoRA rank {cfg.lora.rank}" if cfg.lora.enabled else ""),
        "",
        "",
    ]
    shown, groups = [], set()
    for layout, mem in plan.candidates:
        group = (layout.dense, layout.activation_checkpointing)
        if all_layouts or group not in groups or (plan.chosen is not None and plan.chosen[0] == layout):
            shown.append((layout, mem))
        groups.add(group)
    width = max(len(layout.describe(plan.gpus)) for layout, _ in shown)
    scale, unit = (GB, "GB") if max(m.total for _, m in shown) >= GB else (1e6, "MB")

    def _gb(n: int) -> str:
        return f"{n / scale:8.2f}"

    lines[-1] = f"  {'layout':<{width}} {'params':>8} {'grads':>8} {'adam':>8} {'activ.':>8} {'transient':>9} {'total ' + unit:>8}"
    for layout, mem in shown:
        mark = "*" if plan.chosen is not None and plan.chosen[0] == layout else " "
        lines.append(f"{mark} {layout.describe(plan.gpus):<{width}} {_gb(mem.params)} {_gb(mem.grads)} {_gb(mem.optimizer)} "
                     f"{_gb(mem.activations)} {_gb(mem.transient):>9} {_gb(mem.total)}")
    lines.append("")
    if plan.chosen is None:
        best = min(plan.candidates, key=lambda lm: lm[1].total)
        need = math.ceil(best[1].total / (1 - plan.headroom) / GB)
        lines.append(
            f"nothing fits: the smallest layout ({best[0].describe(plan.gpus)}) needs {best[1].total / GB:.1f} GB per rank "
            f"(a {need} GB device), {plan.budget / GB:.1f} GB are available. "
            + (f"It fits at --set train.batch_size={plan.fits_at_batch} (raise train.grad_accum to keep the global batch); "
               "otherwise use" if plan.fits_at_batch else "Use")
            + " more GPUs, a shorter train.seq_len or lora.rank > 0 (raymoe has no pipeline or tensor parallelism).")
    else:
        layout, mem = plan.chosen
        lines.append(f"chosen: {layout.describe(plan.gpus)}: {mem.total / scale:.1f} {unit} of {plan.budget / GB:.1f} GB per rank")
        lines.append("  --set parallel.expert_degree=%d --set parallel.dense=%s --set train.activation_checkpointing=%d"
                     % (layout.expert_degree, layout.dense, layout.activation_checkpointing))
    return "\n".join(lines)
