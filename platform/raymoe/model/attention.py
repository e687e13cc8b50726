"""Causal self-attention: MHA/GQA with RoPE, and DeepSeek's multi-head latent attention (MLA).

Either kind can be a sliding-window (local) layer; `ModelConfig.is_local_layer` interleaves them
with global layers. Attention itself is `F.scaled_dot_product_attention`, which picks a fused
kernel where one exists.

MLA (DeepSeek-V2/V3): keys and values are rebuilt per head from one compressed latent of
kv_lora_rank dims per token plus one rotary key of qk_rope_head_dim dims shared by all heads;
the latent (plus that rotary key) is what a KV cache stores. Queries are optionally compressed
through q_lora_rank. Rotary embedding applies only to the *_rope parts of queries and keys.

Shape suffixes: B batch, S sequence, D model dim, H query heads, J key/value heads,
  d head dim, r rotary dims, n non-rotary dims, v value dims, L latent rank
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.config import ModelConfig


def rope_tables(dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [max_seq_len, dim], in the rotate-half layout (Llama / Mixtral)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BHSr: torch.Tensor, cos_Sr: torch.Tensor, sin_Sr: torch.Tensor) -> torch.Tensor:
    half = x_BHSr.shape[-1] // 2
    rotated = torch.cat([-x_BHSr[..., half:], x_BHSr[..., :half]], dim=-1)
    return (x_BHSr * cos_Sr + rotated * sin_Sr).to(x_BHSr.dtype)


def causal_mask(seq_len: int, window: int | None, device) -> torch.Tensor | None:
    """None for plain causal (SDPA's is_causal); else bool [S, S], True where attention is allowed."""
    if window is None:
        return None
    i = torch.arange(seq_len, device=device)
    dist = i[:, None] - i[None, :]
    return (dist >= 0) & (dist < window)


def _attend(q, k, v, window: int | None, scale: float | None = None):
    mask = causal_mask(q.shape[-2], window, q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


class Attention(nn.Module):
    """Multi-head attention; grouped-query when num_kv_heads < num_heads."""

    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
        self.window = window
        self.wq = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    @property
    def rope_dim(self) -> int:
        return self.head_dim

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q_BHSd = self.wq(x_BSD).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k_BJSd = self.wk(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BJSd = self.wv(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q_BHSd, k_BJSd = apply_rope(q_BHSd, cos, sin), apply_rope(k_BJSd, cos, sin)
        out_BHSd = _attend(q_BHSd, k_BJSd, v_BJSd, self.window)
        return self.wo(out_BHSd.transpose(1, 2).reshape(B, S, -1))


class MLAttention(nn.Module):
    """DeepSeek multi-head latent attention (training form: keys/values expanded per head)."""

    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.n, self.r, self.v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.window = window
        D, H = cfg.hidden_size, cfg.num_heads
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(cfg.q_lora_rank, eps=cfg.rms_norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * (self.n + self.r), bias=False)
        else:
            self.wq = nn.Linear(D, H * (self.n + self.r), bias=False)
        # One projection yields the latent and the shared rotary key.
        self.wkv_a = nn.Linear(D, self.kv_lora_rank + self.r, bias=False)
        self.kv_norm = nn.RMSNorm(self.kv_lora_rank, eps=cfg.rms_norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, H * (self.n + self.v), bias=False)
        self.wo = nn.Linear(H * self.v, D, bias=False)

    @property
    def rope_dim(self) -> int:
        return self.r

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H, n, r, v = self.num_heads, self.n, self.r, self.v
        q = self.wq_b(self.q_norm(self.wq_a(x_BSD))) if hasattr(self, "wq_a") else self.wq(x_BSD)
        q_BHS_nr = q.view(B, S, H, n + r).transpose(1, 2)
        q_nope, q_rope = q_BHS_nr.split([n, r], dim=-1)

        latent_BSL, k_rope_BSr = self.wkv_a(x_BSD).split([self.kv_lora_rank, r], dim=-1)
        kv = self.wkv_b(self.kv_norm(latent_BSL)).view(B, S, H, n + v).transpose(1, 2)
        k_nope, v_BHSv = kv.split([n, v], dim=-1)
        k_rope_B1Sr = apply_rope(k_rope_BSr.unsqueeze(1), cos, sin)  # shared by all heads

        q_BHSd = torch.cat([q_nope, apply_rope(q_rope, cos, sin)], dim=-1)
        k_BHSd = torch.cat([k_nope, k_rope_B1Sr.expand(B, H, S, r)], dim=-1)
        out_BHSv = _attend(q_BHSd, k_BHSd, v_BHSv, self.window, scale=(n + r) ** -0.5)
        return self.wo(out_BHSv.transpose(1, 2).reshape(B, S, H * v))


def build_attention(cfg: ModelConfig, layer: int) -> nn.Module:
    window = cfg.sliding_window if cfg.is_local_layer(layer) else None
    return MLAttention(cfg, window) if cfg.attention == "mla" else Attention(cfg, window)
