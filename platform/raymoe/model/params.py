"""Exact parameter counts and training FLOPs per token, from a ModelConfig alone.

Nothing is instantiated, so DeepSeek-V3 (671B) costs microseconds and no memory. Each formula
mirrors one module of model/ (attention.py, moe.py, transformer.py); the unit tests hold the
total equal to `sum(p.numel() for p in MoETransformer(cfg).parameters())`, so a change to a
module that is not made here too fails loudly.

    print(format_report(load_config("jobs/configs/deepseek-v3.yaml").model, seq_len=4096))

What counts as what:
- Buffers (the router's expert_bias, the RoPE tables) are not parameters. DeepSeek's own
  inference code keeps its selection bias as a parameter (E per MoE layer, 14,848 for V3).
- With tied embeddings the one matrix is counted once in `total` (under "embedding"; "lm_head"
  is then 0), but the head matmul through it is still activated.
- "Activated" are the parameters one token's forward multiplies with, plus the norm scales:
  attention, dense FFNs, router gates, shared experts, top_k of the E routed experts per MoE
  layer, norms and the LM head, but not the input-embedding row lookup (DeepSeek's convention:
  V3's "37B" is 36.6B without the lookup, 37.6B with it).
- Every RMSNorm scale, MLA's q_norm/kv_norm and MHA's query/key norms included, is in "norms",
  and projection biases are in "biases", never in "attention": the FLOPs formula needs the
  matmul parameters alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raymoe.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one architecture."""

    total: int
    """Every parameter, tied matrices once; what `model.parameters()` sums to."""
    activated: int
    """Parameters one token's forward touches, without the input-embedding lookup."""
    activated_with_embedding: int
    """`activated` plus the input embedding (unchanged when tied: the head already touches it)."""
    embedding: int
    """The input embedding matrix, vocab_size * hidden_size."""
    breakdown: dict[str, int] = field(default_factory=dict)
    """Per component. Every key but routed_experts_activated sums to `total`."""


def _attention_params(cfg: ModelConfig) -> tuple[int, int, int]:
    """(matmul weights, norm scales, biases) of one attention layer."""
    D, H = cfg.hidden_size, cfg.num_heads
    if cfg.attention == "mha":
        d, J = cfg.resolved_head_dim, cfg.resolved_kv_heads
        biases = (H * d + 2 * J * d if cfg.qkv_bias else 0) + (D if cfg.attn_out_bias else 0)
        norms = {"none": 0, "head": 2 * d, "full": H * d + J * d}[cfg.qk_norm]
        # wq, wk, wv, wo
        return D * H * d + 2 * D * J * d + H * d * D, norms, biases
    n, r, v, L, q = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank
    query = D * q + q * H * (n + r) if q > 0 else D * H * (n + r)  # wq_a + wq_b, or wq
    # wkv_a yields the latent and the shared rotary key; wkv_b expands the latent per head.
    matmul = query + D * (L + r) + L * H * (n + v) + H * v * D
    return matmul, L + (q if q > 0 else 0), 0  # kv_norm, q_norm; no biases


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Exact counts per component, without building the model."""
    D, V = cfg.hidden_size, cfg.vocab_size
    num_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    num_dense = cfg.num_layers - num_moe
    attn_matmul, attn_norms, attn_biases = _attention_params(cfg)
    E, K, F = cfg.num_experts, cfg.top_k, cfg.expert_intermediate_size
    per_expert = 3 * D * F  # SwiGLU w1, w3, w2

    embedding = V * D
    b = {
        "embedding": embedding,
        "attention": cfg.num_layers * attn_matmul,
        "dense_ffn": num_dense * 3 * D * cfg.dense_intermediate_size,
        "router": num_moe * E * D,
        # The fused shared SwiGLU, plus its per-token gate vector where there is one (Qwen2-MoE).
        "shared_experts": num_moe * (3 * D * cfg.shared_width + (D if cfg.shared_expert_gate else 0)),
        "routed_experts": num_moe * E * per_expert,
        "routed_experts_activated": num_moe * K * per_expert,
        # attn_norm + ffn_norm per block, MLA's inner norms, the final norm
        "norms": cfg.num_layers * (2 * D + attn_norms) + D,
        "biases": cfg.num_layers * attn_biases,
        "lm_head": 0 if cfg.tie_embeddings else V * D,
    }
    total = sum(v for k, v in b.items() if k != "routed_experts_activated")
    activated = (
        b["attention"] + b["dense_ffn"] + b["router"] + b["shared_experts"]
        + b["routed_experts_activated"] + b["norms"] + b["biases"] + V * D  # the head's matmul, tied or not
    )
    with_embedding = activated + (0 if cfg.tie_embeddings else embedding)
    return ParamCounts(total, activated, with_embedding, embedding, b)


def mean_keys_attended(seq_len: int, window: int | None) -> float:
    """Keys a query attends to, averaged over the sequence's positions.

    Causal (window None): seq_len / 2, PaLM's convention (the exact mean is (T + 1) / 2).
    Sliding window W: the exact mean over positions p of min(p + 1, W).
    """
    T = seq_len
    if window is None:
        return T / 2
    W = min(window, T)
    return (W * (W + 1) / 2 + (T - W) * W) / T


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token of one training step, at sequence length seq_len.

        6 * N  +  sum over layers of 6 * H * (d_qk + d_v) * keys(layer)

    N is the activated matmul parameters (`activated` minus the norm scales; the embedding
    lookup is not a matmul, the LM head and router gates are). A weight used once per token
    costs 2 FLOPs forward and 4 backward (PaLM, Chowdhery et al. 2022, appendix B; DeepSeek-V3
    report, arXiv 2412.19437). Attention scores (q.k) and the weighted sum of values cost
    2 * H * (d_qk + d_v) per attended key forward, times 3 for training. keys(layer) is T / 2
    for causal layers, giving 6 * L * T * H * (d_qk + d_v) / 2 (PaLM's 12 * L * H * Q * T is the
    unmasked case with d_qk = d_v = Q), and for sliding-window layers the mean over positions
    of min(pos + 1, window). MHA/GQA: d_qk = d_v = head_dim (query heads H; sharing K/V heads
    does not shrink this term). MLA: d_qk = qk_nope + qk_rope, d_v = v_head_dim (training form:
    keys and values expanded per head). Norms, activations, softmax and RoPE are not counted.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be > 0")
    counts = count_params(cfg)
    matmul = counts.activated - counts.breakdown["norms"] - counts.breakdown["biases"]
    if cfg.attention == "mla":
        d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        d_qk = d_v = cfg.resolved_head_dim
    keys = sum(
        mean_keys_attended(seq_len, cfg.sliding_window if cfg.is_local_layer(i) else None)
        for i in range(cfg.num_layers)
    )
    return 6.0 * matmul + 6.0 * cfg.num_heads * (d_qk + d_v) * keys


def human(n: float) -> str:
    """671025329152 -> '671.03B'; counts below a thousand stay exact."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def format_report(cfg: ModelConfig, seq_len: int) -> str:
    """A table of per-component counts, totals and FLOPs/token (`raymoe params CONFIG`)."""
    c = count_params(cfg)
    flops = train_flops_per_token(cfg, seq_len)
    attn_flops = flops - 6.0 * (c.activated - c.breakdown["norms"] - c.breakdown["biases"])
    rows: list[tuple[str, int | float | str]] = []
    for name, value in c.breakdown.items():
        if name == "routed_experts_activated":  # a subset of routed_experts, not a component
            rows.append((f"  of which top-{cfg.top_k} per token", value))
        elif name == "biases" and value == 0:
            continue
        elif name == "lm_head" and cfg.tie_embeddings:
            rows.append((name, "tied to embedding"))
        else:
            rows.append((name, value))
    rows += [
        ("", ""),
        ("total", c.total),
        ("activated", c.activated),
        ("activated incl. embedding", c.activated_with_embedding),
        ("", ""),
        (f"train FLOPs/token (T={seq_len})", flops),
        ("  of which attention scores/values", attn_flops),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [
        f"{cfg.num_layers} layers ({sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))} MoE), "
        f"{cfg.num_experts} routed experts top-{cfg.top_k} + "
        + (f"a shared expert of width {cfg.shared_width}, " if cfg.shared_expert_intermediate_size else f"{cfg.num_shared_experts} shared, ")
        + f"attention {cfg.attention}"
    ]
    for name, value in rows:
        if name == "":
            lines.append("")
        elif isinstance(value, str):
            lines.append(f"{name:<{width}}  {value}")
        else:
            exact = f"{value:,.0f}" if isinstance(value, int) else f"{value:.4g}"
            lines.append(f"{name:<{width}}  {human(value):>9}  {exact:>20}")
    return "\n".join(lines)
