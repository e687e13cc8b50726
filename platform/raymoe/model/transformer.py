"""The decoder-only causal LM: embedding -> blocks (attention + dense or MoE FFN) -> norm -> head.

Single-device code: `parallel/` shards its experts from outside, the training loop wraps it.
`forward` returns the logits together with the summed balance losses and per-MoE-layer routing
statistics, threaded through the blocks as return values (not stashed on modules) so that
activation checkpointing, which runs a block's forward twice, cannot count a step's load twice.
Given `targets`, it returns each token's cross-entropy instead of the logits: the head's matmul
and the loss run as one (train/loss.py linear_cross_entropy), which is what training and
evaluation call.

    model = MoETransformer(cfg.model); model.init_weights(seed=0)
    out = model(tokens_BS)            # out.logits [B, S, V], out.aux_loss, out.moe_stats
    out = model(tokens_BS, targets=y) # out.token_loss [B, S] fp32, out.logits None
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from raymoe.config import ModelConfig
from raymoe.model.attention import CacheView, build_attention, document_mask, rope_tables
from raymoe.model.moe import GroupedExperts, MoE, MoEStats, SwiGLU
from raymoe.model.norm import RMSNorm
from raymoe.train.loss import linear_cross_entropy


@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    """[B, S, V]; None when forward was given targets."""
    aux_loss: torch.Tensor
    """Sum of every MoE layer's balance losses (already weighted by their coefficients)."""
    moe_stats: list[MoEStats] = field(default_factory=list)
    """One entry per MoE layer, in layer order."""
    token_loss: torch.Tensor | None = None
    """[B, S] fp32: -log p(targets) of every position, when forward was given targets."""


def tensor_generator(seed: int | None, name: str, index: int | None = None) -> torch.Generator | None:
    """A CPU generator of its own for one tensor (or one expert's row of a stack); None: unseeded."""
    if seed is None:
        return None
    key = f"{seed}/{name}" + (f"/{index}" if index is not None else "")
    return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1)


class KVCache:
    """Key/value storage for up to `max_batch` sequences of `max_len` tokens, one row per sequence.

    MHA/GQA layers keep keys and values per KV head; MLA layers keep only the compressed latent and
    the shared rotary key (kv_lora_rank + qk_rope_head_dim numbers per token, for all heads).
    """

    def __init__(self, model: "MoETransformer", max_batch: int, max_len: int, dtype: torch.dtype | None = None):
        device = model.embed.weight.device
        dtype = dtype or model.embed.weight.dtype
        self.max_batch, self.max_len = max_batch, max_len
        self.layers = [
            {name: torch.zeros(max_batch, max_len, *shape, device=device, dtype=dtype) for name, shape in block.attn.cache_shapes().items()}
            for block in model.layers
        ]

    def bytes_per_token(self) -> int:
        return sum(t[0, 0].numel() * t.element_size() for layer in self.layers for t in layer.values())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.attn = build_attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer) else SwiGLU(cfg.hidden_size, cfg.dense_intermediate_size)

    decode_fn = None
    """A torch.compile'd `layer_forward` for decode steps, set by MoETransformer.compile_decode."""
    full_fn = None
    """A torch.compile'd `layer_forward` for passes without a cache, set by MoETransformer.compile_blocks."""

    def forward(self, x_BSD, cos, sin, cache=None, doc_mask=None, valid_BS=None):
        if self.decode_fn is not None and cache is not None and x_BSD.shape[1] == 1:
            return self.decode_fn(x_BSD, cos, sin, cache, doc_mask, valid_BS)
        if self.full_fn is not None and cache is None:
            return self.full_fn(x_BSD, cos, sin, None, doc_mask, valid_BS)
        return self.layer_forward(x_BSD, cos, sin, cache, doc_mask, valid_BS)

    def layer_forward(self, x_BSD, cos, sin, cache=None, doc_mask=None, valid_BS=None):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin, cache, doc_mask)
        h = self.ffn_norm(x_BSD)
        if isinstance(self.ffn, MoE):
            y, aux, stats = self.ffn(h, valid_BS)
            return x_BSD + y, aux, stats
        return x_BSD + self.ffn(h), None, None


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # nn.Embedding's own N(0, 1) init, but skipped on the meta device, where torch's normal_ is a
        # Python reference that imports torch._dynamo (1.5-3 s of `raymoe plan` or `raymoe import`);
        # init_weights draws it anyway.
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight if weight.is_meta else weight.normal_())
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        rope_dim = cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.resolved_head_dim
        cos, sin = rope_tables(rope_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.checkpoint_every = 0  # set by the training loop: recompute every k-th block

    def tie_weights(self) -> None:
        """lm_head shares the embedding (tie_embeddings); again after to_empty, which re-creates both."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def compile_decode(self) -> None:
        """Run each block's decode steps (one new token per cached row) through torch.compile,
        with dynamic shapes, so batch size and cache length do not recompile. At decode sizes a
        block is a few hundred small kernels; inductor fuses its norms, rotary and routing
        arithmetic and cuts the dispatch between them (docs/PERFORMANCE.md). The first decode
        step of each new shape class compiles, seconds to a minute (Engine.warm_up runs them
        ahead). Prefill stays eager: a prompt runs once, at lengths a compile would chase.
        Inference only, on a model whose experts run here (not a router's remote ones)."""
        for block in self.layers:
            block.decode_fn = torch.compile(block.layer_forward, dynamic=True)

    def compile_blocks(self, **compile_options) -> None:
        """Run each block's passes without a cache (training steps, forward and backward) through
        torch.compile; grouped_mm stays one opaque op with its own backward. Measured on CPU it
        gained nothing over eager (bench/train_step.py --compile, docs/PERFORMANCE.md lever 9), so
        the training loop does not call it; on CUDA it is for the benchmark to measure first.
        Single-device models (no expert-parallel or FSDP wrapping). `compile_options` go to
        torch.compile (the tests trace with backend="aot_eager", which skips inductor's codegen)."""
        for block in self.layers:
            block.full_fn = torch.compile(block.layer_forward, **compile_options)

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoE)]

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, assign=None) -> None:
        """Normal(0, init_std) matrices; residual-output projections scaled by 1/sqrt(2L).

        Layout-independent: every tensor draws from its own generator, seeded by (seed, name), and
        every routed expert from its own, seeded by (seed, name, global expert id). A rank that
        holds experts [lo, hi) of a stack (GroupedExperts.first_expert = lo) draws exactly those
        rows of the whole model's init, so a model built on the meta device and materialized per
        rank (parallel/apply.py) starts from the same global weights at any world size. Adapters
        (model/lora.py) are initialized there, not here. `assign(param, whole)` writes a whole
        tensor into a parameter (parallel/apply.assign_ for FSDP shards; default: copy_)."""
        from raymoe.model.lora import is_adapter

        assign = assign or (lambda p, t: p.copy_(t))
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        experts = {f"{n}.{k}": m for n, m in self.named_modules() if isinstance(m, GroupedExperts)
                   for k, _ in m.named_parameters(recurse=False)}
        for name, p in self.named_parameters():
            if is_adapter(name):
                continue
            if name.endswith(".bias"):
                p.zero_()
                continue
            if p.dim() == 1:  # norm scales
                p.fill_(1.0)
                continue
            sd = out_std if name.endswith(("wo.weight", "w2.weight", ".w2")) else std
            if name in experts:
                first = experts[name].first_expert
                assign(p, torch.stack([torch.normal(0.0, sd, size=p.shape[1:], generator=tensor_generator(seed, name, first + i))
                                       for i in range(p.shape[0])]))
            else:
                assign(p, torch.normal(0.0, sd, size=p.shape, generator=tensor_generator(seed, name)))
        self.init_buffers()

    def init_buffers(self) -> None:
        """Zero selection biases and the RoPE tables: what a model built on the meta device needs
        besides weights, when its weights are loaded rather than drawn (init_weights calls this)."""
        for moe in self.moe_layers():
            moe.router.expert_bias.zero_()
        # Recomputed rather than copied: a model built on the meta device gets real tables here.
        rope_dim = self.rope_cos.shape[-1]
        cos, sin = rope_tables(rope_dim, self.cfg.max_seq_len, self.cfg.rope_theta, self.cfg.rope_scaling)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, tokens_BS: torch.Tensor, cache: "KVCache | None" = None, slots: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, num_keys: int | None = None) -> ModelOutput:
        """Without a cache: a full causal pass from position 0, or, for packed sequences, with
        `segments` [B, S] (which example each token belongs to; attention stays inside it) and
        `positions` [B, S] restarting per example. With a cache: the tokens take absolute
        `positions` [B, S] in cache rows `slots` [B], and attend to everything cached before them.
        With `targets` [B, S] (token ids): `token_loss` instead of `logits` (module docstring).
        `num_keys`: how many cached positions the new tokens attend over (at least the largest
        position + 1; masked past each row's own); None reads it off `positions`, a host sync on
        CUDA that a captured decode step (serve/graphs.py) cannot make."""
        S = tokens_BS.shape[1]
        doc_mask = valid_BS = None
        if cache is None:
            assert S <= self.cfg.max_seq_len, f"sequence of {S} tokens > model.max_seq_len={self.cfg.max_seq_len}"
            if segments is not None:
                cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # [B, 1, S, r]
                doc_mask = document_mask(segments)
                valid_BS = segments >= 0  # padding: -1
            else:
                cos, sin = self.rope_cos[:S], self.rope_sin[:S]
            views = [None] * len(self.layers)
        else:
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # [B, 1, S, r]
            num_keys = int(positions.max()) + 1 if num_keys is None else num_keys
            masks: dict = {}  # built once per window for all layers (CacheView.allowed, .bias)
            views = [CacheView(layer, slots, positions, num_keys, masks) for layer in cache.layers]
        x = self.embed(tokens_BS)
        aux_total = x.new_zeros((), dtype=torch.float32)
        stats: list[MoEStats] = []
        for i, block in enumerate(self.layers):
            if self.training and self.checkpoint_every and i % self.checkpoint_every == 0:
                x, aux, st = checkpoint(block, x, cos, sin, None, doc_mask, valid_BS, use_reentrant=False)
            else:
                x, aux, st = block(x, cos, sin, views[i], doc_mask, valid_BS)
            if st is not None:
                aux_total = aux_total + aux
                stats.append(st)
        if targets is not None:
            token_loss = linear_cross_entropy(self.norm(x), self.lm_head.weight, targets)
            return ModelOutput(None, aux_total, stats, token_loss)
        logits = self.lm_head(self.norm(x))
        return ModelOutput(logits, aux_total, stats)

    @torch.no_grad()
    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        *,
        temperature: float = 0.8,
        top_k: int | None = 40,
        seed: int = 0,
        stop_id: int | None = None,
    ) -> list[int]:
        """Sample a continuation by re-running the window (no KV cache; for short samples)."""
        device = self.embed.weight.device
        gen = torch.Generator(device=device).manual_seed(seed)
        ids = list(prompt)
        for _ in range(max_new_tokens):
            window = torch.tensor([ids[-self.cfg.max_seq_len :]], device=device)
            logits = self(window).logits[0, -1].float()
            if temperature <= 0:
                nxt = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k:
                    kth = logits.topk(min(top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = int(torch.multinomial(F.softmax(logits, -1), 1, generator=gen))
            if nxt == stop_id:
                break
            ids.append(nxt)
        return ids[len(prompt) :]
