"""Causal self-attention: MHA/GQA with RoPE, and DeepSeek's multi-head latent attention (MLA).

Either kind can be a sliding-window (local) layer; `ModelConfig.is_local_layer` interleaves them
with global layers. Attention itself is `F.scaled_dot_product_attention`, which picks a fused
kernel where one exists; where none does on CPU (MLA's query/key width is not its value width),
training and evaluation take `_attend_unfused`, causal blocks that skip the masked keys, instead
of SDPA's math fallback.

MLA (DeepSeek-V2/V3): keys and values are rebuilt per head from one compressed latent of
kv_lora_rank dims per token plus one rotary key of qk_rope_head_dim dims shared by all heads;
the latent (plus that rotary key) is what a KV cache stores. Queries are optionally compressed
through q_lora_rank. Rotary embedding applies only to the *_rope parts of queries and keys.

Hugging Face layouts this module can express (model/hf.py maps them): projection biases and
RMSNorm on queries/keys before RoPE (per head, Qwen3-MoE; over the whole projection, OLMoE) for
MHA, and YaRN-scaled rotary tables for both kinds. RoPE always rotates halves here; checkpoints
that rotate interleaved pairs (DeepSeek) get their rotary rows permuted at import instead.

Shape suffixes: B batch, S sequence, D model dim, H query heads, J key/value heads,
  d head dim, r rotary dims, n non-rotary dims, v value dims, L latent rank
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.config import ModelConfig, RopeScaling
from raymoe.model.norm import RMSNorm


def _yarn_inv_freq(dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    """YaRN's per-frequency blend of interpolated (divided by factor) and original frequencies:
    frequencies that turn more than beta_fast times over the original context are kept, fewer
    than beta_slow times fully interpolated, linearly in between (Peng et al. 2023, eq. 18-20)."""
    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (original frequency), 0: interpolate
    return (1.0 / (s.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def rope_tables(dim: int, max_seq_len: int, theta: float, scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [max_seq_len, dim], in the rotate-half layout (Llama / Mixtral); with YaRN
    scaling, its frequencies and both tables multiplied by its attention factor."""
    # Computed on the CPU and moved to the default device: under torch.device("meta") torch's meta
    # arange is a Python reference whose first call imports torch._dynamo, 1.5-3 s of a meta-device
    # build (`raymoe plan`, `raymoe import`; training imports it anyway, through torch.optim).
    with torch.device("cpu"):
        if scaling is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
            scale = 1.0
        else:
            inv_freq, scale = _yarn_inv_freq(dim, theta, scaling), scaling.cos_sin_scale
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = (angles.cos() * scale).float(), (angles.sin() * scale).float()
    device = torch.get_default_device()
    return cos.to(device), sin.to(device)


def apply_rope(x_BHSr: torch.Tensor, cos_Sr: torch.Tensor, sin_Sr: torch.Tensor) -> torch.Tensor:
    half = x_BHSr.shape[-1] // 2
    rotated = torch.cat([-x_BHSr[..., half:], x_BHSr[..., :half]], dim=-1)
    return (x_BHSr * cos_Sr + rotated * sin_Sr).to(x_BHSr.dtype)


def cached_mask(positions_BS: torch.Tensor, num_keys: int, window: int | None) -> torch.Tensor:
    """bool [B, 1, S, T]: query at absolute position p sees cached keys j <= p (and p - j < window)."""
    j = torch.arange(num_keys, device=positions_BS.device)
    dist = positions_BS[:, :, None] - j[None, None, :]
    allowed = dist >= 0
    if window is not None:
        allowed &= dist < window
    return allowed.unsqueeze(1)


def causal_mask(seq_len: int, window: int | None, device) -> torch.Tensor | None:
    """None for plain causal (SDPA's is_causal); else bool [S, S], True where attention is allowed."""
    if window is None:
        return None
    i = torch.arange(seq_len, device=device)
    dist = i[:, None] - i[None, :]
    return (dist >= 0) & (dist < window)


def document_mask(segments_BS: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, S, S] for packed sequences: a token sees earlier tokens of its own example only."""
    S = segments_BS.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=segments_BS.device).tril()
    return ((segments_BS[:, :, None] == segments_BS[:, None, :]) & causal).unsqueeze(1)


def _attend(q, k, v, window: int | None, scale: float | None = None, doc_mask: torch.Tensor | None = None):
    if q.device.type == "cpu" and q.shape[-1] != v.shape[-1] and doc_mask is None and q.shape[1] == k.shape[1]:
        return _attend_unfused(q, k, v, window, scale)
    mask = causal_mask(q.shape[-2], window, q.device)
    if doc_mask is not None:
        mask = doc_mask if mask is None else doc_mask & mask
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def _attend_unfused(q_BHSd, k_BHSd, v_BHSv, window: int | None, scale: float | None,
                    block: int = 128) -> torch.Tensor:
    """Causal attention by blocks of `block` queries, each over only the keys it can see: scores
    with the mask added (one baddbmm), softmax, weighted sum. For CPU shapes SDPA has no fused
    kernel for (MLA's query/key width is not its value width), SDPA's math fallback multiplies
    every query by every key and makes more passes over [B, H, S, S]: q and k scaled apart, and
    a softmax that also checks for rows with every key masked (a causal row always sees its own
    key). Blocking skips the upper triangle's blocks: 3/4 of the products at two blocks, about
    half for long sequences. Measured fwd+bwd at the CPU benchmark's MLA shape (docs/PERFORMANCE.md
    lever 16); tests/unit/test_attention.py holds it to SDPA's output and gradients."""
    B, H, S, d = q_BHSd.shape
    allowed_SS = causal_mask(S, window, q_BHSd.device)
    if allowed_SS is None:
        allowed_SS = torch.ones(S, S, dtype=torch.bool, device=q_BHSd.device).tril()
    bias_SS = torch.zeros(S, S, dtype=q_BHSd.dtype, device=q_BHSd.device).masked_fill_(~allowed_SS, float("-inf"))
    q_RSd, k_RSd, v_RSv = q_BHSd.reshape(B * H, S, d), k_BHSd.reshape(B * H, S, d), v_BHSv.reshape(B * H, S, -1)
    alpha = scale if scale is not None else d ** -0.5
    return _BlockedAttention.apply(q_RSd, k_RSd, v_RSv, bias_SS, alpha, block, window).view(B, H, S, -1)


class _BlockedAttention(torch.autograd.Function):
    """`_attend_unfused`'s blocks with their backward written out (docs/PERFORMANCE.md lever 21):
    each block's output and query gradient go straight into their rows of one buffer, and its key
    and value gradients are added in place into theirs (baddbmm_). Autograd of the same blocks
    zero-fills a whole [R, S, d] gradient for every block's slice of q, k and v, sums them, and
    concatenates the outputs. The softmax is taken and kept in fp32 whatever the input dtype."""

    @staticmethod
    def _blocks(S: int, block: int, window: int | None):
        for a in range(0, S, block):
            # queries [a, b) see keys from lo: the first key any of them sees
            yield a, min(a + block, S), 0 if window is None else max(0, a - window + 1)

    @staticmethod
    def forward(ctx, q_RSd, k_RSd, v_RSv, bias_SS, alpha: float, block: int, window: int | None):
        out_RSv = v_RSv.new_empty(q_RSd.shape[0], q_RSd.shape[1], v_RSv.shape[-1])
        probs = []
        for a, b, lo in _BlockedAttention._blocks(q_RSd.shape[1], block, window):
            scores = torch.baddbmm(bias_SS[a:b, lo:b], q_RSd[:, a:b], k_RSd[:, lo:b].transpose(1, 2), alpha=alpha)
            probs.append(scores.softmax(-1, dtype=torch.float32))
            out_RSv[:, a:b] = torch.bmm(probs[-1].to(v_RSv.dtype), v_RSv[:, lo:b])
        ctx.save_for_backward(q_RSd, k_RSd, v_RSv, *probs)
        ctx.alpha, ctx.block, ctx.window = alpha, block, window
        return out_RSv

    @staticmethod
    def backward(ctx, g_RSv):
        q_RSd, k_RSd, v_RSv, *probs = ctx.saved_tensors
        dtype, g_RSv = q_RSd.dtype, g_RSv.contiguous()
        dq, dk, dv = torch.empty_like(q_RSd), torch.zeros_like(k_RSd), torch.zeros_like(v_RSv)
        for (a, b, lo), p in zip(_BlockedAttention._blocks(q_RSd.shape[1], ctx.block, ctx.window), probs):
            g = g_RSv[:, a:b]
            dp = torch.bmm(g, v_RSv[:, lo:b].transpose(1, 2))
            ds = torch._softmax_backward_data(dp.float(), p, -1, torch.float32).to(dtype)
            dq[:, a:b] = torch.bmm(ds, k_RSd[:, lo:b]).mul_(ctx.alpha)
            dk[:, lo:b].baddbmm_(ds.transpose(1, 2), q_RSd[:, a:b], alpha=ctx.alpha)
            dv[:, lo:b].baddbmm_(p.to(dtype).transpose(1, 2), g)
        return dq, dk, dv, None, None, None, None


class Attention(nn.Module):
    """Multi-head attention; grouped-query when num_kv_heads < num_heads."""

    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
        self.window = window
        H, J, d = self.num_heads, self.num_kv_heads, self.head_dim
        self.wq = nn.Linear(cfg.hidden_size, H * d, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.hidden_size, J * d, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.hidden_size, J * d, bias=cfg.qkv_bias)
        self.wo = nn.Linear(H * d, cfg.hidden_size, bias=cfg.attn_out_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            # 'head': one [d] scale shared by every head; 'full': a scale per projection output.
            q_dim, k_dim = (d, d) if cfg.qk_norm == "head" else (H * d, J * d)
            self.q_norm = RMSNorm(q_dim, eps=cfg.rms_norm_eps)
            self.k_norm = RMSNorm(k_dim, eps=cfg.rms_norm_eps)

    @property
    def rope_dim(self) -> int:
        return self.head_dim

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-token cache entries: keys and values of every KV head."""
        return {"k": (self.num_kv_heads, self.head_dim), "v": (self.num_kv_heads, self.head_dim)}

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: "CacheView | None" = None,
                doc_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q, k = self.wq(x_BSD), self.wk(x_BSD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BSHd, k_BSJd = q.view(B, S, self.num_heads, self.head_dim), k.view(B, S, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q_BSHd, k_BSJd = self.q_norm(q_BSHd), self.k_norm(k_BSJd)
        q_BHSd, k_BJSd = q_BSHd.transpose(1, 2), k_BSJd.transpose(1, 2)
        v_BJSd = self.wv(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q_BHSd, k_BJSd = apply_rope(q_BHSd, cos, sin), apply_rope(k_BJSd, cos, sin)
        if cache is None:
            out_BHSd = _attend(q_BHSd, k_BJSd, v_BJSd, self.window, doc_mask=doc_mask)
        else:
            k_all, v_all = cache.write_read(k=k_BJSd.transpose(1, 2), v=v_BJSd.transpose(1, 2))  # [B, T, J, d]
            mask = cache.allowed(self.window)
            out_BHSd = F.scaled_dot_product_attention(
                q_BHSd, k_all.transpose(1, 2), v_all.transpose(1, 2), attn_mask=mask,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )
        return self.wo(out_BHSd.transpose(1, 2).reshape(B, S, -1))


class MLAttention(nn.Module):
    """DeepSeek multi-head latent attention. Training and prefill expand keys and values per head;
    a decode step attends to the cached latents directly (`_attend_latent`)."""

    absorb: bool = True
    """Decode steps attend in latent space; False rebuilds per-head keys and values from every
    cached latent at each step, as prefill does (the A/B switch of bench/decode.py and the tests)."""

    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.n, self.r, self.v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.window = window
        D, H = cfg.hidden_size, cfg.num_heads
        eps = cfg.mla_norm_eps if cfg.mla_norm_eps is not None else cfg.rms_norm_eps
        # YaRN lengthens the rotary wavelengths; DeepSeek compensates in the softmax temperature.
        self.scale = (self.n + self.r) ** -0.5 * (cfg.rope_scaling.mla_softmax_multiplier if cfg.rope_scaling else 1.0)
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, eps=eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * (self.n + self.r), bias=False)
        else:
            self.wq = nn.Linear(D, H * (self.n + self.r), bias=False)
        # One projection yields the latent and the shared rotary key.
        self.wkv_a = nn.Linear(D, self.kv_lora_rank + self.r, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, eps=eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, H * (self.n + self.v), bias=False)
        self.wo = nn.Linear(H * self.v, D, bias=False)

    @property
    def rope_dim(self) -> int:
        return self.r

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-token cache entry: the normalized latent and the shared rotary key side by side
        (one write and one read a step; the pair is also the key of the latent-space attention),
        nothing per head."""
        return {"latent_rope": (self.kv_lora_rank + self.r,)}

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: "CacheView | None" = None,
                doc_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H, n, r, v = self.num_heads, self.n, self.r, self.v
        q = self.wq_b(self.q_norm(self.wq_a(x_BSD))) if hasattr(self, "wq_a") else self.wq(x_BSD)
        q_BHS_nr = q.view(B, S, H, n + r).transpose(1, 2)
        q_nope, q_rope = q_BHS_nr.split([n, r], dim=-1)

        latent_BSL, k_rope_BSr = self.wkv_a(x_BSD).split([self.kv_lora_rank, r], dim=-1)
        latent_BSL = self.kv_norm(latent_BSL)
        k_rope_B1Sr = apply_rope(k_rope_BSr.unsqueeze(1), cos, sin)  # shared by all heads
        mask = None
        if cache is not None:
            # The cache holds only the latent and the rotary key, nothing per head.
            (kv_BTK,) = cache.write_read(latent_rope=torch.cat([latent_BSL, k_rope_B1Sr.squeeze(1)], dim=-1))
            latent_BSL, k_rope_BTr = kv_BTK.split([self.kv_lora_rank, r], dim=-1)
            k_rope_B1Sr = k_rope_BTr.unsqueeze(1)
            # A decode step (one new token per row). Prefill keeps the expanded form, whose SDPA
            # kernels suit long prompts; an unmerged LoRA adapter on wkv_b changes its weight.
            if S == 1 and self.absorb and not hasattr(self.wkv_b, "lora_A"):
                return self._attend_latent(q_nope, apply_rope(q_rope, cos, sin), kv_BTK, cache.bias(self.window, kv_BTK.dtype))
            mask = cache.allowed(self.window)
        T = latent_BSL.shape[1]
        kv = self.wkv_b(latent_BSL).view(B, T, H, n + v).transpose(1, 2)
        k_nope, v_BHTv = kv.split([n, v], dim=-1)

        q_BHSd = torch.cat([q_nope, apply_rope(q_rope, cos, sin)], dim=-1)
        k_BHTd = torch.cat([k_nope, k_rope_B1Sr.expand(B, H, T, r)], dim=-1)
        if cache is None:
            out_BHSv = _attend(q_BHSd, k_BHTd, v_BHTv, self.window, scale=self.scale, doc_mask=doc_mask)
        else:
            out_BHSv = F.scaled_dot_product_attention(q_BHSd, k_BHTd, v_BHTv, attn_mask=mask, scale=self.scale)
        return self.wo(out_BHSv.transpose(1, 2).reshape(B, S, H * v))

    def _attend_latent(self, q_nope_BHSn, q_rope_BHSr, kv_BTK, bias_B1ST) -> torch.Tensor:
        """Attention over the cache in latent space (DeepSeek-V2's weight absorption): wkv_b's key
        half is folded into the query and its value half applied after the weighted sum, so no
        step rebuilds per-head keys and values for every cached position. The same numbers as
        the expanded form, since q_nope . (W_k latent) = (W_k^T q_nope) . latent; per cached
        position it costs H (2L + r) multiply-adds instead of L H (n + v) more. `kv_BTK` is the
        cache's [latent | rotary key] (K = L + r), `bias_B1ST` 0 where a key is visible, -inf where not."""
        B, H, S, n = q_nope_BHSn.shape
        L = self.kv_lora_rank
        w_HnvL = self.wkv_b.weight.to(kv_BTK.dtype).view(H, n + self.v, L)
        w_k_HnL, w_v_HvL = w_HnvL.split([n, self.v], dim=1)
        # Per head, one GEMM over every (row, position): [H, B*S, n] x [H, n, L], weights not copied per row.
        q_lat_HRL = torch.bmm(q_nope_BHSn.transpose(0, 1).reshape(H, B * S, n), w_k_HnL)
        q_BHSK = torch.cat([q_lat_HRL.view(H, B, S, L).transpose(0, 1), q_rope_BHSr], dim=-1)  # K = L + r
        # Every head's queries against the one shared key as a single GEMM per row, [B, H*S, K] x
        # [B, K, T], scaled and masked in the same call: no per-head copy of the keys (SDPA's
        # enable_gqa path on CPU expands them).
        scores_BRT = torch.baddbmm(bias_B1ST.view(B, S, -1), q_BHSK.reshape(B, H * S, -1),
                                   kv_BTK.transpose(1, 2), alpha=self.scale)
        probs_BRT = scores_BRT.softmax(-1, dtype=torch.float32)
        out_BRL = torch.bmm(probs_BRT.to(kv_BTK.dtype), kv_BTK[..., :L])
        out_HRv = torch.bmm(out_BRL.view(B, H, S, L).transpose(0, 1).reshape(H, B * S, L), w_v_HvL.transpose(1, 2))
        return self.wo(out_HRv.view(H, B, S, self.v).permute(1, 2, 0, 3).reshape(B, S, H * self.v))


class CacheView:
    """One layer's slice of a KV cache as seen by one forward: which cache rows (`slots` [B]) and
    which absolute positions (`positions` [B, S]) the new tokens take. `masks` is shared by the
    views of one forward: each layer's mask depends only on its window, so it is built once per
    window, not once per layer (a decode step's small ops are most of its time on CPU)."""

    def __init__(self, storage: dict[str, torch.Tensor], slots: torch.Tensor, positions: torch.Tensor, num_keys: int,
                 masks: dict | None = None):
        self.storage, self.slots, self.positions, self.num_keys = storage, slots, positions, num_keys
        self.masks = {} if masks is None else masks

    def allowed(self, window: int | None) -> torch.Tensor:
        """bool [B, 1, S, T]: True where a new token sees a cached key (cached_mask)."""
        key = ("allowed", window)
        if key not in self.masks:
            self.masks[key] = cached_mask(self.positions, self.num_keys, window)
        return self.masks[key]

    def bias(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, S, T] in `dtype`: 0 where a new token sees a cached key, -inf where it does not."""
        key = ("bias", window, dtype)
        if key not in self.masks:
            allowed = self.allowed(window)
            self.masks[key] = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
        return self.masks[key]

    def write_read(self, **new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store each new [B, S, ...] entry at (slot, position); return each entry's [B, T, ...]
        for T = num_keys cached positions (positions beyond a row's length are masked out)."""
        out = []
        for name, value in new.items():
            buf = self.storage[name]
            buf[self.slots[:, None], self.positions] = value.to(buf.dtype)
            # The rows' first T positions as whole slices (index_select after narrowing): about half
            # the time of advanced indexing buf[slots, :T], which copies element by element.
            out.append(buf[:, : self.num_keys].index_select(0, self.slots).to(value.dtype))
        return tuple(out)


def build_attention(cfg: ModelConfig, layer: int) -> nn.Module:
    window = cfg.sliding_window if cfg.is_local_layer(layer) else None
    return MLAttention(cfg, window) if cfg.attention == "mla" else Attention(cfg, window)
