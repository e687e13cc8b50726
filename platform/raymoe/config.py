"""One typed, frozen config tree per run, loaded from YAML by a strict loader.

    cfg = load_config("jobs/configs/demo.yaml", overrides=["train.lr=3e-4"])

Every section is a keyword-only frozen dataclass with a docstring per field. The loader refuses
unknown keys and wrong types, and each section checks its own impossible combinations, so a bad
config fails before Ray starts, in one line that names the file and the dotted key to fix:

    jobs/configs/demo.yaml: model.top_k=9 must be <= model.num_experts=8

Nothing here imports torch or ray: the CLI validates configs in milliseconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config a user wrote is wrong; the message names the key and says what to change."""


def _fail(msg: str) -> None:
    raise ConfigError(msg)


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True, kw_only=True)
class BalanceConfig:
    """How routed-expert load is kept even. The four mechanisms combine freely; 0 disables one."""

    bias_update_rate: float = 0.001
    """Auxiliary-loss-free balancing (DeepSeek-V3): per-expert selection bias moved by this much per
    step towards under-loaded experts, `b_i += rate * sign(mean_load - load_i)`."""
    aux_loss_coef: float = 0.0
    """Classic batch-level auxiliary loss (Switch/GShard): coef * E * sum_i f_i * P_i."""
    seq_aux_loss_coef: float = 0.0
    """Sequence-wise balance loss alpha (DeepSeek-V3 uses 1e-4)."""
    z_loss_coef: float = 0.0
    """Router z-loss (ST-MoE): coef * mean(logsumexp(logits)^2)."""

    def __post_init__(self) -> None:
        for name in ("bias_update_rate", "aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                _fail(f"model.balance.{name}={getattr(self, name)} must be >= 0")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """YaRN context extension (Peng et al. 2023, arXiv 2309.00071), as Hugging Face's
    `rope_scaling: {type: yarn, ...}`: corrected rotary frequencies, cos/sin scaled by an attention
    factor, and (MLA only) a softmax-scale correction. The real DeepSeek-V3 and V2-Lite use it."""

    type: Literal["yarn"] = "yarn"
    """Only YaRN is supported."""
    factor: float = 0.0
    """Context extension factor (DeepSeek-V3: 40)."""
    original_max_position_embeddings: int = 0
    """Context length the model was pre-trained at (DeepSeek-V3: 4096)."""
    beta_fast: float = 32.0
    """Rotations above which a frequency is kept (extrapolated)."""
    beta_slow: float = 1.0
    """Rotations below which a frequency is fully interpolated."""
    mscale: Optional[float] = None
    """With mscale_all_dim: cos/sin are scaled by mscale(factor, mscale) / mscale(factor, mscale_all_dim)."""
    mscale_all_dim: Optional[float] = None
    """MLA's softmax scale is multiplied by mscale(factor, mscale_all_dim)^2 (DeepSeek-V3: 1.0)."""
    attention_factor: Optional[float] = None
    """Explicit cos/sin scale (null = derived from factor, mscale and mscale_all_dim as above)."""
    truncate: bool = True
    """Round the correction range to whole dimensions (Hugging Face's default)."""

    def __post_init__(self) -> None:
        if self.factor < 1:
            _fail(f"model.rope_scaling.factor={self.factor} must be >= 1")
        if self.original_max_position_embeddings <= 0:
            _fail(f"model.rope_scaling.original_max_position_embeddings={self.original_max_position_embeddings} must be > 0")
        if self.beta_fast <= 0 or self.beta_slow <= 0:
            _fail("model.rope_scaling.beta_fast and beta_slow must be > 0")

    @property
    def cos_sin_scale(self) -> float:
        """Hugging Face's `attention_factor`, multiplied into cos and sin."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    @property
    def mla_softmax_multiplier(self) -> float:
        """What MLA multiplies its softmax scale by (DeepSeek's `yarn_get_mscale(factor, mscale_all_dim)**2`)."""
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0


# Model keys a run may set on top of `model.init_from` (the architecture itself comes from the source).
INIT_FROM_OVERRIDABLE = frozenset({"init_from", "max_seq_len", "balance", "capacity_factor", "init_std", "gate_threshold"})


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only causal LM with DeepSeekMoE feed-forward layers."""

    vocab_size: int = 260
    """Token vocabulary; 260 = 256 bytes + 4 specials for the default byte tokenizer."""
    hidden_size: int = 128
    """Model width D."""
    num_layers: int = 4
    """Transformer blocks."""
    max_seq_len: int = 256
    """Longest sequence the RoPE tables and KV cache are built for."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding matrix with the LM head."""
    init_std: float = 0.02
    """Std of the normal init of every weight matrix."""
    init_from: Optional[str] = None
    """Start from these weights instead of a random init: a Hugging Face model directory, a model
    directory from `raymoe import` or training, a training checkpoint, or an MLflow model URI. The
    architecture keys then come from the source; only max_seq_len, balance, capacity_factor,
    gate_threshold and init_std may be set beside it."""
    rope_scaling: Optional[RopeScaling] = None
    """YaRN context extension, e.g. {factor: 40, original_max_position_embeddings: 4096} (null = plain RoPE)."""

    # --- attention
    attention: Literal["mha", "mla"] = "mha"
    """'mha' (multi-head, or grouped-query when num_kv_heads < num_heads) or 'mla' (DeepSeek latent)."""
    num_heads: int = 4
    """Query heads."""
    num_kv_heads: Optional[int] = None
    """Key/value heads for GQA (null = num_heads). mha only."""
    head_dim: Optional[int] = None
    """Per-head dim for mha (null = hidden_size / num_heads)."""
    q_lora_rank: int = 0
    """MLA: rank of the query compression (0 = no compression, as in DeepSeek-V2-Lite)."""
    kv_lora_rank: int = 512
    """MLA: rank of the compressed key/value latent (what the KV cache stores)."""
    qk_nope_head_dim: int = 128
    """MLA: per-head query/key dims without rotary embedding."""
    qk_rope_head_dim: int = 64
    """MLA: per-head query/key dims with rotary embedding (the key part is shared by all heads)."""
    v_head_dim: int = 128
    """MLA: per-head value dim."""
    mla_norm_eps: Optional[float] = None
    """MLA: epsilon of the latent (and query-latent) RMSNorms (null = rms_norm_eps)."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2-MoE). mha only."""
    attn_out_bias: bool = False
    """Bias on the attention output projection. mha only."""
    qk_norm: Literal["none", "head", "full"] = "none"
    """RMSNorm on queries and keys before RoPE: 'head' over each head's dims, one scale shared by the
    heads (Qwen3-MoE); 'full' over the whole projection (OLMoE). mha only."""
    sliding_window: Optional[int] = None
    """Tokens a local-attention layer sees (null = every layer attends globally)."""
    global_every: int = 1
    """With sliding_window set: every global_every-th layer (1-based) stays global, the rest are local."""

    # --- feed-forward
    first_k_dense_layers: int = 0
    """The first k layers use a dense SwiGLU FFN instead of MoE (DeepSeek-V3: 3)."""
    moe_layer_step: int = 1
    """Only layers with (layer + 1) % moe_layer_step == 0 are MoE (Qwen's decoder_sparse_step)."""
    dense_layers: tuple[int, ...] = ()
    """These layers (0-based) are dense whatever the other rules say (Qwen's mlp_only_layers)."""
    dense_intermediate_size: int = 512
    """Hidden size of the dense SwiGLU FFN."""
    num_experts: int = 8
    """Routed experts per MoE layer E (0 = every layer dense)."""
    num_shared_experts: int = 1
    """Always-on shared experts per MoE layer (computed as one SwiGLU of this many times the width)."""
    shared_expert_intermediate_size: Optional[int] = None
    """Width of that fused shared SwiGLU, when it is not num_shared_experts * expert_intermediate_size
    (Qwen2-MoE); needs num_shared_experts: 1."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by sigmoid(w . x), one learned gate per token (Qwen2-MoE)."""
    expert_intermediate_size: int = 128
    """Hidden size F of each routed (and shared) expert."""
    top_k: int = 2
    """Routed experts chosen per token K."""
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores: softmax over experts, or independent sigmoids (DeepSeek-V3)."""
    norm_topk_prob: bool = True
    """Renormalize the chosen K weights to sum to 1."""
    route_scale: float = 1.0
    """Multiplier on the routing weights (DeepSeek-V3: 2.5)."""
    num_expert_groups: int = 1
    """Experts are split into this many groups for group-limited routing."""
    top_k_groups: int = 1
    """A token's experts come from at most this many groups."""
    group_score: Literal["top2_sum", "max"] = "top2_sum"
    """How a group is scored for group-limited routing: the sum of its two best (biased) scores
    (DeepSeek-V3, `noaux_tc`) or its best score (DeepSeek-V2, `group_limited_greedy`)."""
    gate_threshold: float = 0.0
    """Chosen experts whose (normalized) weight is below this are skipped."""
    capacity_factor: Optional[float] = None
    """Per-expert capacity = ceil(factor * T * K / E); tokens over it are dropped (null = dropless)."""
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    """Load balancing mechanisms."""

    def __post_init__(self) -> None:
        m = "model."
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                _fail(f"{m}{name}={getattr(self, name)} must be > 0")
        if self.attention == "mha":
            if self.head_dim is None and self.hidden_size % self.num_heads:
                _fail(f"{m}hidden_size={self.hidden_size} must be divisible by {m}num_heads={self.num_heads} (or set {m}head_dim)")
            kv = self.num_kv_heads if self.num_kv_heads is not None else self.num_heads
            if kv <= 0 or self.num_heads % kv:
                _fail(f"{m}num_heads={self.num_heads} must be a multiple of {m}num_kv_heads={kv}")
            if self.resolved_head_dim % 2:
                _fail(f"{m}head_dim={self.resolved_head_dim} must be even for RoPE")
        else:
            if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
                _fail(f"{m}qk_rope_head_dim={self.qk_rope_head_dim} must be a positive even number")
            for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
                if getattr(self, name) <= 0:
                    _fail(f"{m}{name}={getattr(self, name)} must be > 0 with {m}attention=mla")
            if self.q_lora_rank < 0:
                _fail(f"{m}q_lora_rank={self.q_lora_rank} must be >= 0 (0 = no query compression)")
            if self.num_kv_heads is not None:
                _fail(f"{m}num_kv_heads applies to attention=mha only; remove it for mla")
        if self.attention == "mla":
            for name in ("qkv_bias", "attn_out_bias"):
                if getattr(self, name):
                    _fail(f"{m}{name} applies to attention=mha only; MLA has no projection biases")
            if self.qk_norm != "none":
                _fail(f"{m}qk_norm={self.qk_norm} applies to attention=mha only")
        elif self.mla_norm_eps is not None:
            _fail(f"{m}mla_norm_eps applies to attention=mla only; remove it")
        if self.mla_norm_eps is not None and self.mla_norm_eps <= 0:
            _fail(f"{m}mla_norm_eps={self.mla_norm_eps} must be > 0")
        if self.moe_layer_step < 1:
            _fail(f"{m}moe_layer_step={self.moe_layer_step} must be >= 1")
        for i in self.dense_layers:
            if not 0 <= i < self.num_layers:
                _fail(f"{m}dense_layers has {i}, outside the {self.num_layers} layers (0-based)")
        if self.shared_expert_intermediate_size is not None:
            if self.shared_expert_intermediate_size <= 0:
                _fail(f"{m}shared_expert_intermediate_size={self.shared_expert_intermediate_size} must be > 0 or null")
            if self.num_shared_experts != 1:
                _fail(f"{m}shared_expert_intermediate_size is the width of one fused shared expert; set {m}num_shared_experts: 1 (got {self.num_shared_experts})")
        if self.shared_expert_gate and self.shared_width == 0:
            _fail(f"{m}shared_expert_gate needs shared experts ({m}num_shared_experts >= 1)")
        if self.sliding_window is not None and self.sliding_window <= 0:
            _fail(f"{m}sliding_window={self.sliding_window} must be > 0 or null")
        if self.global_every < 1:
            _fail(f"{m}global_every={self.global_every} must be >= 1")
        if not 0 <= self.first_k_dense_layers <= self.num_layers:
            _fail(f"{m}first_k_dense_layers={self.first_k_dense_layers} must be in [0, {m}num_layers={self.num_layers}]")
        if self.num_experts < 0:
            _fail(f"{m}num_experts={self.num_experts} must be >= 0")
        if self.num_experts > 0:
            if not 1 <= self.top_k <= self.num_experts:
                _fail(f"{m}top_k={self.top_k} must be in [1, {m}num_experts={self.num_experts}]")
            if self.num_expert_groups < 1 or self.num_experts % self.num_expert_groups:
                _fail(f"{m}num_expert_groups={self.num_expert_groups} must divide {m}num_experts={self.num_experts}")
            if not 1 <= self.top_k_groups <= self.num_expert_groups:
                _fail(f"{m}top_k_groups={self.top_k_groups} must be in [1, {m}num_expert_groups={self.num_expert_groups}]")
            if self.num_expert_groups > 1:
                per_group = self.num_experts // self.num_expert_groups
                if per_group < 2 and self.group_score == "top2_sum":
                    _fail(f"{m}num_expert_groups={self.num_expert_groups} leaves {per_group} expert per group; "
                          f"{m}group_score=top2_sum needs 2")
                if self.top_k > self.top_k_groups * per_group:
                    _fail(f"{m}top_k={self.top_k} exceeds the {self.top_k_groups * per_group} experts in {m}top_k_groups={self.top_k_groups} groups")
            if self.expert_intermediate_size <= 0:
                _fail(f"{m}expert_intermediate_size={self.expert_intermediate_size} must be > 0")
        if self.num_shared_experts < 0:
            _fail(f"{m}num_shared_experts={self.num_shared_experts} must be >= 0")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            _fail(f"{m}capacity_factor={self.capacity_factor} must be > 0 or null (dropless)")
        if not 0 <= self.gate_threshold < 1:
            _fail(f"{m}gate_threshold={self.gate_threshold} must be in [0, 1)")
        if self.route_scale <= 0:
            _fail(f"{m}route_scale={self.route_scale} must be > 0")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def shared_width(self) -> int:
        """Hidden size of the fused shared-expert SwiGLU (0 = no shared experts)."""
        if self.shared_expert_intermediate_size is not None:
            return self.shared_expert_intermediate_size
        return self.num_shared_experts * self.expert_intermediate_size

    def is_moe_layer(self, layer: int) -> bool:
        return (self.num_experts > 0 and layer >= self.first_k_dense_layers
                and (layer + 1) % self.moe_layer_step == 0 and layer not in self.dense_layers)

    def is_local_layer(self, layer: int) -> bool:
        """Sliding-window layer? Every global_every-th layer (1-based) stays global."""
        return self.sliding_window is not None and (layer + 1) % self.global_every != 0


@dataclass(frozen=True, kw_only=True)
class ScalingConfig:
    """Where the workers run. Only this and `tracking` change between a laptop and a cluster."""

    num_workers: Union[int, tuple[int, int]] = 2
    """Ray Train workers: a number, or [min, max] for an elastic group."""
    use_gpu: bool = False
    """One GPU per worker (NCCL) instead of CPU (gloo)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    max_failures: int = 0
    """Worker-group restarts allowed before the run fails (-1 = unlimited)."""
    resource_wait_s: float = 900.0
    """On an autoscaling cluster, how long to wait for the nodes the workers need before failing
    (a cluster that cannot autoscale and lacks them fails at once)."""

    def __post_init__(self) -> None:
        lo, hi = self.worker_range
        if lo < 1 or hi < lo:
            shown = list(self.num_workers) if isinstance(self.num_workers, tuple) else self.num_workers
            _fail(f"scaling.num_workers={shown} must be >= 1 (or [min, max] with 1 <= min <= max)")
        if self.cpus_per_worker <= 0:
            _fail(f"scaling.cpus_per_worker={self.cpus_per_worker} must be > 0")
        if self.max_failures < -1:
            _fail(f"scaling.max_failures={self.max_failures} must be >= -1")
        if self.resource_wait_s <= 0:
            _fail(f"scaling.resource_wait_s={self.resource_wait_s} must be > 0")

    @property
    def worker_range(self) -> tuple[int, int]:
        n = self.num_workers
        return (n, n) if isinstance(n, int) else (n[0], n[1])


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How the worker group is split into (data, expert) axes (parallel/mesh.py)."""

    expert_degree: Union[int, Literal["auto"]] = "auto"
    """Ranks sharing one layer's routed experts (each owns num_experts / expert_degree of them).
    'auto': the largest divisor of the world size that also divides num_experts, so an elastic
    resize needs no config edit. 1 = pure data parallel."""
    dense: Literal["replicate", "fsdp"] = "replicate"
    """Dense parameters (attention, dense FFN, shared experts, routers, embeddings, norms) and their
    gradients and AdamW state: a full copy on every rank, or sharded over all ranks with PyTorch's
    FSDP2 (fully_shard per transformer block). Under fsdp, routed experts (already split by expert
    parallelism) are also FSDP-sharded over their replicas when the data degree is > 1. Under bf16
    compute FSDP gathers bf16 parameters and reduces gradients in fp32. `raymoe plan` says which fits."""

    def __post_init__(self) -> None:
        if self.expert_degree != "auto" and self.expert_degree < 1:
            _fail(f"parallel.expert_degree={self.expert_degree} must be >= 1 or 'auto'")


@dataclass(frozen=True, kw_only=True)
class FaultInjection:
    """Make one worker SIGKILL itself once per run (tests and demos of recovery)."""

    kill_rank: int = 1
    """World rank that kills itself."""
    at_step: int = 40
    """After finishing this optimizer step."""

    def __post_init__(self) -> None:
        if self.kill_rank < 0 or self.at_step < 1:
            _fail(f"train.fault_injection needs kill_rank >= 0 and at_step >= 1 (got {self.kill_rank}, {self.at_step})")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The optimization loop (train/loop.py)."""

    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per worker per micro-batch."""
    seq_len: int = 128
    """Tokens per sequence."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (matrices only; norms, biases and embeddings are exempt)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """'auto': bf16 autocast on CUDA, fp32 on CPU."""
    activation_checkpointing: int = 0
    """Recompute activations of every k-th block in backward (0 = off)."""
    seed: int = 0
    """Seed for weights, data order and sampling."""
    log_every: int = 10
    """Steps between metric logs and progress lines."""
    val_every: int = 50
    """Steps between validation-loss evaluations (also at the last step)."""
    val_batches: int = 4
    """Micro-batches per validation evaluation."""
    checkpoint_every: int = 50
    """Steps between checkpoints (also at the last step)."""
    keep_checkpoints: int = 2
    """Checkpoints Ray Train keeps."""
    sample_prompt: str = "def "
    """Prompt of the sample printed after training ('' = no sample)."""
    sample_tokens: int = 80
    """Tokens generated for that sample."""
    fault_injection: Optional[FaultInjection] = None
    """Kill one worker once mid-run, e.g. {kill_rank: 1, at_step: 40} (null = never)."""
    freeze: tuple[Literal["embeddings", "router", "norms", "attention", "dense_ffn", "shared_experts", "routed_experts"], ...] = ()
    """Parts that get no gradient and no optimizer state, e.g. [embeddings, router] when
    fine-tuning the rest (with lora: the base is frozen anyway)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "val_every", "val_batches", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                _fail(f"train.{name}={getattr(self, name)} must be > 0")
        if self.lr <= 0:
            _fail(f"train.lr={self.lr} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0 <= self.warmup_steps <= self.steps:
            _fail(f"train.warmup_steps={self.warmup_steps} must be in [0, train.steps={self.steps}]")
        if not all(0 <= b < 1 for b in self.betas):
            _fail(f"train.betas={list(self.betas)} must both be in [0, 1)")
        for name in ("weight_decay", "grad_clip", "activation_checkpointing", "sample_tokens"):
            if getattr(self, name) < 0:
                _fail(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.eps <= 0:
            _fail(f"train.eps={self.eps} must be > 0")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The corpus and its tokenized shards (train/data.py)."""

    source: Optional[str] = None
    """A file, directory or URI of .txt / .jsonl / .parquet (null = the Python stdlib's .py source)."""
    text_field: str = "text"
    """Field holding the text in .jsonl records and .parquet columns."""
    tokenizer: Optional[str] = None
    """'byte' (256 bytes + 4 specials), or a Hugging Face tokenizer: a directory holding
    tokenizer.json (and tokenizer_config.json) or the tokenizer.json itself. null = the tokenizer
    that comes with model.init_from if it has one, else 'byte'."""
    val_fraction: float = 0.02
    """Share of documents held out for validation."""
    max_bytes: Optional[int] = None
    """Read at most this many bytes of the corpus (null = all)."""
    shard_tokens: int = 1 << 22
    """Tokens per parquet shard."""
    cache_dir: Optional[str] = None
    """Where tokenized shards go (null = <output_dir>/data)."""
    format: Literal["text", "sft"] = "text"
    """'text': documents for (continued) pre-training, every token carries loss. 'sft': instruction
    examples in .jsonl, each a `messages` list (chat turns, rendered with the chat template) or
    `prompt`/`completion` strings; only completion / assistant tokens carry loss (train/sft.py)."""
    packing: bool = True
    """sft: pack several examples into one sequence (each attends only to itself, positions restart);
    false = one example per sequence, padded (the padding share is logged as data/padding_fraction)."""
    chat_template: Optional[str] = None
    """sft: a Jinja chat template file for `messages` (null = the tokenizer's own: chat_template in
    tokenizer_config.json or chat_template.jinja beside it)."""
    skip_bad_examples: bool = False
    """sft: count and skip examples that are malformed or longer than train.seq_len+1 tokens instead of
    stopping at the first one (the counts are printed and kept in the cache manifest)."""

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            _fail(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        if self.max_bytes is not None and self.max_bytes <= 0:
            _fail(f"data.max_bytes={self.max_bytes} must be > 0 or null")
        if self.shard_tokens <= 0:
            _fail(f"data.shard_tokens={self.shard_tokens} must be > 0")
        if self.format == "text" and (self.chat_template is not None or self.skip_bad_examples or not self.packing):
            _fail("data.chat_template, data.skip_bad_examples and data.packing apply to data.format=sft only")
        if self.tokenizer is not None and not self.tokenizer.strip():
            _fail("data.tokenizer must be 'byte', a path to a Hugging Face tokenizer, or null")


LORA_TARGETS = ("attention", "dense_ffn", "shared_experts", "routed_experts")
FREEZABLE = ("embeddings", "router", "norms") + LORA_TARGETS


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Low-rank adapters (model/lora.py): the model.init_from weights stay frozen and only the
    adapters (and, if asked, the routers) train; checkpoints hold just those."""

    rank: int = 0
    """Adapter rank r (0 = no adapters: full training)."""
    alpha: float = 16.0
    """Scale: an adapter adds (alpha / rank) * B A x."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training."""
    targets: tuple[Literal["attention", "dense_ffn", "shared_experts", "routed_experts"], ...] = ("attention", "routed_experts")
    """Which weights get adapters: every attention projection, the dense FFN layers, the shared
    experts, the routed experts (stacked per expert, run by the grouped GEMM, sharded with them)."""
    train_router: bool = False
    """Also train the routers' weights (full rank; small: experts x hidden per MoE layer)."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            _fail(f"lora.rank={self.rank} must be >= 0 (0 = off)")
        if self.alpha <= 0:
            _fail(f"lora.alpha={self.alpha} must be > 0")
        if not 0 <= self.dropout < 1:
            _fail(f"lora.dropout={self.dropout} must be in [0, 1)")
        if self.rank and not self.targets:
            _fail(f"lora.targets is empty; name at least one of {', '.join(LORA_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            _fail(f"lora.targets={list(self.targets)} names a target twice")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """MLflow (tracking.py)."""

    uri: Optional[str] = None
    """Tracking URI (null = $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db)."""
    experiment: str = "raymoe"
    """MLflow experiment name."""
    run_name: Optional[str] = None
    """MLflow run name (null = the config's name)."""
    log_checkpoint: bool = True
    """Log the final weights (safetensors) and config as artifacts."""
    registered_model: Optional[str] = None
    """Register the final model in the MLflow model registry under this name (null = don't);
    serve it with `raymoe serve models:/<name>/<version>`."""


SEARCH_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    """`raymoe tune`: a hyperparameter search whose trials are short training runs (tune.py)."""

    space: dict = field(default_factory=dict)
    """Dotted config key -> one of {choice: [...]}, {grid: [...]}, {uniform: [lo, hi]},
    {loguniform: [lo, hi]}, {randint: [lo, hi]} (hi exclusive)."""
    metric: str = "val/loss"
    """Metric the search optimizes (reported every train.log_every steps)."""
    mode: Literal["min", "max"] = "min"
    """Minimize or maximize the metric."""
    num_samples: int = 4
    """Trials to sample (with grid entries: samples of every grid point)."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """'asha' stops weak trials early; 'fifo' runs every trial to train.steps."""
    grace_period: int = 20
    """ASHA: steps every trial runs before it can be stopped."""
    reduction_factor: float = 2.0
    """ASHA: 1/reduction_factor of the trials continue at each rung."""
    search: Literal["random", "optuna"] = "random"
    """How non-grid values are drawn: random sampling, or Optuna's TPE (pip install optuna)."""
    max_concurrent_trials: int = 2
    """Trials running at once (each uses scaling.num_workers workers)."""
    seed: Optional[int] = 0
    """Seed of the search's sampling (null = nondeterministic)."""

    def __post_init__(self) -> None:
        # PyYAML reads 1e-4 (no dot) as a string: make range bounds numbers where they spell one.
        normalized = {}
        for key, spec in self.space.items():
            if isinstance(spec, dict) and len(spec) == 1:
                kind, values = next(iter(spec.items()))
                if kind in ("uniform", "loguniform", "randint") and isinstance(values, list):
                    values = [_maybe_number(v) for v in values]
                spec = {kind: values}
            normalized[key] = spec
        object.__setattr__(self, "space", normalized)
        for key, spec in self.space.items():
            where = f"tune.space.{key}"
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
                _fail(f"{where} must be a mapping with one of {', '.join(SEARCH_KINDS)}, e.g. {{choice: [8, 16]}}")
            kind, values = next(iter(spec.items()))
            if not isinstance(values, list) or not values:
                _fail(f"{where}.{kind} must be a non-empty list")
            if kind in ("uniform", "loguniform", "randint"):
                if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) or values[0] >= values[1]:
                    _fail(f"{where}.{kind} must be [lo, hi] numbers with lo < hi")
                if kind == "loguniform" and values[0] <= 0:
                    _fail(f"{where}.loguniform needs lo > 0")
            path = key.split(".")
            if path[0] in ("name", "output_dir", "tune", "serve") or not _is_config_key(RunConfig, path):
                _fail(f"{where}: {key!r} is not a config key a trial can vary (e.g. model.num_experts, train.lr)")
        if self.num_samples < 1 or self.grace_period < 1 or self.max_concurrent_trials < 1:
            _fail("tune.num_samples, tune.grace_period and tune.max_concurrent_trials must be >= 1")
        if self.reduction_factor <= 1:
            _fail(f"tune.reduction_factor={self.reduction_factor} must be > 1")


def _replica_range(value: Union[int, tuple[int, int]]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """`raymoe serve`, `serve deploy serve_apps/config.yaml` and k8s/rayservice.yaml (serve/).
    Settings that need the model (groups that hold its experts, a placement that fits it) are
    checked by serve.settings before Ray starts."""

    model: Optional[str] = None
    """MODEL to serve: a Hugging Face or raymoe model directory, a training checkpoint or run
    directory, runs:/<id>/model or models:/<name>/<version|latest> (null = what this config's
    training made: models:/<tracking.registered_model>/latest if set, else its run directory)."""
    mode: Literal["routed", "monolithic"] = "routed"
    """'routed': the routed experts live in ExpertGroup deployments; 'monolithic': every expert
    inside the router (the baseline)."""
    num_groups: int = 2
    """Expert groups in routed mode (without a placement each hosts num_experts / num_groups)."""
    placement: Optional[str] = None
    """Expert placement JSON from `raymoe placement` (null = contiguous groups)."""
    router_replicas: Union[int, tuple[int, int]] = 1
    """Router replicas: a number, or [min, max] to autoscale on ongoing requests."""
    group_replicas: Union[int, tuple[int, int]] = 1
    """Replicas of each ExpertGroup: a number, or [min, max] to autoscale each group on the tokens/s
    the routers send it."""
    target_tokens_per_s: float = 2000.0
    """Routed tokens per second one ExpertGroup replica should handle (the autoscaling target)."""
    downscale_delay_s: float = 30.0
    """How long a group's load must stay below its replicas' capacity before one is removed."""
    router_cpus: float = 1.0
    """CPUs reserved per Router replica."""
    group_cpus: float = 0.5
    """CPUs reserved per ExpertGroup replica."""
    max_batch: int = 16
    """Sequences one Router replica decodes together (continuous batching)."""
    max_tokens: int = 256
    """Largest max_tokens a request may ask for."""
    max_len: int = 4096
    """Longest prompt + completion served: every KV-cache row holds this many positions (capped at
    model.max_seq_len; imported models often allow 100K+)."""
    micro_batches: int = 1
    """Decode micro-batches run in parallel threads so expert calls overlap router compute."""
    compile_decode: bool = False
    """Monolithic mode: run decode steps through torch.compile (1.2-1.5x decode tokens/s on CPU,
    docs/PERFORMANCE.md). Each Router replica compiles them before it reports ready (about 35 s
    more on 2 CPU cores)."""
    stream_interval_s: float = 0.2
    """A stream's tokens after its first are sent from the Router to the Ingress at most this often,
    merged (each message costs the Ingress CPU time; 0 = every token at once)."""
    host: str = "127.0.0.1"
    """HTTP listen address (0.0.0.0 for every interface)."""
    port: int = 8000
    """HTTP port."""
    api_key_env: Optional[str] = "RAYMOE_API_KEY"
    """Environment variable holding the API key clients must send as 'Authorization: Bearer KEY'
    (unset or empty = an open server; null = never read one)."""
    data_path: Literal["direct", "handle"] = "direct"
    """Router -> expert group calls: 'direct' (a TCP channel; Serve still starts, scales and
    replaces the replicas) or 'handle' (Serve handle calls)."""

    def __post_init__(self) -> None:
        if self.model is not None and not self.model.strip():
            _fail("serve.model must be a MODEL source or null")
        if self.num_groups < 1:
            _fail(f"serve.num_groups={self.num_groups} must be >= 1")
        for key in ("router_replicas", "group_replicas"):
            lo, hi = _replica_range(getattr(self, key))
            if lo < 1 or hi < lo:
                shown = list(getattr(self, key)) if isinstance(getattr(self, key), tuple) else getattr(self, key)
                _fail(f"serve.{key}={shown} must be >= 1 (or [min, max] with 1 <= min <= max)")
        for key in ("target_tokens_per_s", "router_cpus", "group_cpus"):
            if getattr(self, key) <= 0:
                _fail(f"serve.{key}={getattr(self, key)} must be > 0")
        if self.downscale_delay_s < 0:
            _fail(f"serve.downscale_delay_s={self.downscale_delay_s} must be >= 0")
        if not 0 <= self.stream_interval_s <= 1:
            _fail(f"serve.stream_interval_s={self.stream_interval_s} must be in [0, 1] seconds")
        for key, lo in (("max_batch", 1), ("max_tokens", 1), ("max_len", 2), ("micro_batches", 1)):
            if getattr(self, key) < lo:
                _fail(f"serve.{key}={getattr(self, key)} must be >= {lo}")
        if self.micro_batches > self.max_batch:
            _fail(f"serve.micro_batches={self.micro_batches} must be <= serve.max_batch={self.max_batch}")
        if self.compile_decode and self.mode != "monolithic":
            _fail(f"serve.compile_decode needs serve.mode=monolithic (a routed router's experts run in the groups), not {self.mode!r}")
        if self.compile_decode and self.micro_batches != 1:
            _fail(f"serve.compile_decode needs serve.micro_batches=1, not {self.micro_batches} (one decode thread)")
        if self.max_tokens >= self.max_len:
            _fail(f"serve.max_tokens={self.max_tokens} must be < serve.max_len={self.max_len} (prompt + completion)")
        if not 1 <= self.port <= 65535:
            _fail(f"serve.port={self.port} must be in [1, 65535]")
        if not self.host.strip():
            _fail("serve.host must be an address such as 127.0.0.1 or 0.0.0.0")
        if self.api_key_env is not None and not self.api_key_env.strip():
            _fail("serve.api_key_env must name an environment variable, or be null")

    @property
    def router_range(self) -> tuple[int, int]:
        return _replica_range(self.router_replicas)

    @property
    def group_range(self) -> tuple[int, int]:
        return _replica_range(self.group_replicas)


def _maybe_number(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _is_config_key(cls: type, path: list[str]) -> bool:
    hints = typing.get_type_hints(cls)
    if path[0] not in hints:
        return False
    tp = hints[path[0]]
    if len(path) == 1:
        return not dataclasses.is_dataclass(tp)
    return dataclasses.is_dataclass(tp) and _is_config_key(tp, path[1:])


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one `raymoe train` needs."""

    name: str = "raymoe"
    """Run name: names the Ray Train run (resume key) and the MLflow run."""
    output_dir: str = ".raymoe"
    """Root for checkpoints, tokenized data and the default MLflow store (made absolute at load)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            _fail(f"name={self.name!r} must be a non-empty name without '/'")
        if self.lora.enabled and not self.model.init_from:
            _fail("lora.rank > 0 fine-tunes a trained model: set model.init_from (a model directory, checkpoint, "
                  "Hugging Face directory or MLflow URI)")
        if self.lora.enabled and self.train.freeze:
            _fail(f"train.freeze={list(self.train.freeze)} applies to full fine-tuning; with lora the whole base is frozen "
                  "(set lora.train_router: true to train the routers)")
        if len(set(self.train.freeze)) != len(self.train.freeze):
            _fail(f"train.freeze={list(self.train.freeze)} names a part twice")
        if self.train.seq_len > self.model.max_seq_len:
            _fail(f"train.seq_len={self.train.seq_len} must be <= model.max_seq_len={self.model.max_seq_len}")
        ep = self.parallel.expert_degree
        if ep != "auto" and self.model.num_experts and self.model.num_experts % ep:
            _fail(f"parallel.expert_degree={ep} must divide model.num_experts={self.model.num_experts}")
        lo, hi = self.scaling.worker_range
        if ep != "auto" and lo != hi:
            _fail(f"parallel.expert_degree={ep} is fixed but scaling.num_workers={[lo, hi]} is elastic; use expert_degree: auto")
        if ep != "auto" and lo % ep:
            _fail(f"parallel.expert_degree={ep} must divide scaling.num_workers={lo}")
        if self.train.fault_injection is not None and self.train.fault_injection.kill_rank >= hi:
            _fail(f"train.fault_injection.kill_rank={self.train.fault_injection.kill_rank} must be < the number of workers ({hi})")
        if self.tracking.registered_model is not None and not self.tracking.registered_model.strip():
            _fail("tracking.registered_model must be a non-empty name or null")
        byte = self.data.tokenizer == "byte" or (self.data.tokenizer is None and self.model.init_from is None)
        if byte and self.model.vocab_size < 260:
            _fail(f"model.vocab_size={self.model.vocab_size} must be >= 260 for data.tokenizer=byte")

    # --- derived paths; output_dir is absolute once loaded (Ray workers change directory)
    @property
    def storage_path(self) -> str:
        return os.path.join(self.output_dir, "runs")

    @property
    def data_cache_dir(self) -> str:
        return self.data.cache_dir or os.path.join(self.output_dir, "data")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, as logged to MLflow params."""
        out: dict[str, Any] = {}

        def walk(d: dict, prefix: str) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")
                else:
                    out[f"{prefix}{k}"] = v

        walk(self.to_dict(), "")
        return out

    def model_hash(self) -> str:
        """Hash of the model section: checkpoints refuse to load into a different architecture.
        Where the initial weights came from (model.init_from) is not architecture: moving the
        source directory must not orphan a run's checkpoints."""
        arch = {k: v for k, v in _to_plain(self.model).items() if k != "init_from"}
        if self.lora.enabled:  # adapters are part of what a checkpoint holds
            arch["lora"] = _to_plain(self.lora)
        blob = json.dumps(arch, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- loading


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is tuple and typing.get_args(tp)[1:] == (Ellipsis,):
        return f"[{_type_name(typing.get_args(tp)[0])}, ...]"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in typing.get_args(tp)) + "]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where YAML is ambiguous."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        non_null = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is not None and len(non_null) == 1 and dataclasses.is_dataclass(non_null[0]):
            return _coerce(value, non_null[0], key)  # a nested section: its own error names its key
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        _fail(f"{key}={value!r} must be {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        _fail(f"{key}={value!r} must be null")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        _fail(f"{key}={value!r} must be one of {_type_name(tp)}")
    if origin is tuple and typing.get_args(tp)[1:] == (Ellipsis,):
        if not isinstance(value, (list, tuple)):
            _fail(f"{key}={value!r} must be a list")
        return tuple(_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            _fail(f"{key}={value!r} must be a list {_type_name(tp)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            _fail(f"{key} must be a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(f"{key} must be a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        _fail(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(f"{key}={value!r} must be an integer")
    if tp is float:
        # PyYAML reads 3e-4 (no dot) as a string; accept any number spelled as one.
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            _fail(f"{key}={value!r} must be a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        _fail(f"{key}={value!r} must be a string")
    raise AssertionError(f"unsupported annotation {tp} for {key}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            _fail(f"unknown key {prefix}{k} (valid keys here: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _apply_override(tree: dict, item: str) -> None:
    if "=" not in item:
        _fail(f"--set {item!r} must look like key.path=value")
    key, _, raw = item.partition("=")
    parts = key.strip().split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            _fail(f"--set {key}: {p} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        _fail(f"--set {key.strip()}: {raw!r} is not a valid YAML value ({_yaml_problem(e)}); quote it or fix it")


def _tracking_uri_of(tree: dict) -> str:
    """Where an MLflow init_from resolves: what tracking.tracking_uri() gives for this tree."""
    from raymoe.tracking import default_tracking_uri  # tracking.py imports no more than this module

    tracking = tree.get("tracking") if isinstance(tree.get("tracking"), dict) else {}
    return default_tracking_uri(tracking.get("uri"), str(tree.get("output_dir") or ".raymoe"))


def model_config_from_section(section: dict, where: str = "<model>") -> ModelConfig:
    """A ModelConfig from a plain `model:` mapping, with the loader's strict checks."""
    try:
        return _build(ModelConfig, json.loads(json.dumps(section)), "model.")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def to_plain(obj: Any) -> Any:
    """A config dataclass as plain dicts, lists and scalars (what YAML and JSON hold)."""
    return _to_plain(obj)


def _model_from_source(model: dict, base_dir: str | None, tracking_uri: str | None) -> dict:
    """The model section of a run that starts from `model.init_from`: the source's architecture,
    plus the few keys a run may change (INIT_FROM_OVERRIDABLE). A key that contradicts the
    source is an error rather than a silent override: it would not fit the weights."""
    source = str(model["init_from"])
    if "://" not in source and ":/" not in source:
        source = os.path.abspath(os.path.join(base_dir or "", os.path.expanduser(source)))
    from raymoe.model_dir import source_model_section  # imports torch; only runs that need it pay

    arch = source_model_section(source, tracking_uri)
    merged = {**arch, "init_from": source}
    for key, value in model.items():
        if key == "init_from":
            continue
        if key in INIT_FROM_OVERRIDABLE:
            # A nested section (balance) is merged key by key: switching off the bias updates
            # (balance: {bias_update_rate: 0}) keeps the source's other balancing settings.
            both = isinstance(value, dict) and isinstance(arch.get(key), dict)
            merged[key] = {**arch[key], **value} if both else value
        elif key not in arch or arch[key] != value:
            shown = arch.get(key, "<unset>")
            _fail(f"model.{key}={value!r} contradicts model.init_from={source} (which has {shown!r}); "
                  f"remove it: with init_from only {', '.join(sorted(INIT_FROM_OVERRIDABLE - {'init_from'}))} may be set")
    return merged


def config_from_dict(data: dict, overrides: list[str] = (), source: str = "<dict>", base_dir: str | None = None) -> RunConfig:
    """Build and validate a RunConfig; errors are prefixed with `source`. A relative
    model.init_from is resolved against `base_dir` (the config file's directory for a file, the
    working directory otherwise)."""
    tree = json.loads(json.dumps(data if data is not None else {}))  # deep copy, plain types
    try:
        if not isinstance(tree, dict):
            _fail("the top level must be a mapping of sections (model:, train:, ...)")
        for item in overrides:
            _apply_override(tree, item)
        model = tree.get("model")
        if isinstance(model, dict) and model.get("init_from"):
            tree["model"] = _model_from_source(model, base_dir, _tracking_uri_of(tree))
        cfg = _build(RunConfig, tree)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return dataclasses.replace(cfg, output_dir=os.path.abspath(os.path.expanduser(cfg.output_dir)))


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What PyYAML found wrong, in one line. Its own first line often names only the construct it
    was inside ("while parsing a block mapping"); the problem comes after, the context is kept
    where it points elsewhere (the `[` an unclosed list opened at)."""
    if not isinstance(e, yaml.MarkedYAMLError) or not e.problem:
        return str(e).splitlines()[0]
    problem = e.problem
    if "'\\t'" in problem:
        problem += " (YAML indents with spaces, not tabs)"
    ctx = e.context_mark
    if e.context and ctx is not None and (e.problem_mark is None or ctx.line != e.problem_mark.line):
        problem += f" ({e.context} from line {ctx.line + 1}, column {ctx.column + 1})"
    return problem


def _yaml_error(path: str, text: str, e: yaml.YAMLError) -> ConfigError:
    """`path:line:column: not valid YAML: problem` (1-based, as editors count)."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        line, column = mark.line + 1, mark.column + 1
    elif isinstance(e, yaml.reader.ReaderError):  # a character YAML forbids; position indexes `text`
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
    else:
        return ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}")
    return ConfigError(f"{path}:{line}:{column}: not valid YAML: {_yaml_problem(e)}")


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Load a YAML config strictly, apply `key=value` overrides, validate, resolve paths."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as e:  # a directory, no permission
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        line, column = raw.count(b"\n", 0, e.start) + 1, len(raw[line_start:e.start].decode("utf-8", "replace")) + 1
        raise ConfigError(f"{path}:{line}:{column}: not valid YAML: byte 0x{raw[e.start]:02x} is not UTF-8; "
                          "save the file as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _yaml_error(path, text, e) from None
    return config_from_dict(data or {}, overrides, source=path, base_dir=os.getcwd())


def _unwritable_reason(directory: str) -> str | None:
    """Why `directory` cannot be created and written in, or None when it can (tried, not guessed:
    permission bits say nothing to root, and a read-only mount or a file on the path beats them)."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".raymoe-write-check-"):
            pass
    except OSError as e:
        existing = directory
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            return f"{existing} is a file, not a directory"
        return e.strerror or type(e).__name__
    return None


def check_writable(cfg: RunConfig) -> None:
    """Refuse, in one line naming the key, a directory the run writes but cannot: output_dir,
    data.cache_dir, and the default sqlite MLflow store's directory. `raymoe train` and `raymoe tune`
    call it before Ray starts; later the same mistake is a worker's traceback, or a warning that
    MLflow is unavailable. Creates the directories it checks (the run would)."""
    from raymoe.tracking import default_tracking_uri  # tracking.py imports no more than this module

    checks = [(cfg.output_dir, f"output_dir={cfg.output_dir}", "set output_dir to a writable directory")]
    if cfg.data.cache_dir:
        checks.append((os.path.abspath(cfg.data.cache_dir), f"data.cache_dir={cfg.data.cache_dir}",
                       "set data.cache_dir to a writable directory (null = <output_dir>/data)"))
    if cfg.tracking.uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        uri = default_tracking_uri(None, cfg.output_dir)
        checks.append((os.path.dirname(uri.removeprefix("sqlite:///")), f"the MLflow store {uri} (tracking.uri=null)",
                       "set output_dir to a writable directory, or tracking.uri to another store"))
    seen = set()
    for directory, what, fix in checks:
        if directory in seen:  # the default store lives in output_dir itself
            continue
        seen.add(directory)
        reason = _unwritable_reason(directory)
        if reason is not None:
            _fail(f"{what} is not writable ({reason}); {fix}")
