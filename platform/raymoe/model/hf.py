"""Hugging Face MoE checkpoints <-> raymoe: config mapping, tensor names and layouts, both ways.

    model = model_config_from_hf(json.load(open("DIR/config.json")), where="DIR")    # a raymoe ModelConfig
    ckpt = HFCheckpoint("DIR"); tensors = HFSource(ckpt)                            # raymoe-named tensors
    hf_config = hf_config_from_model(cfg.model, "DeepseekV3ForCausalLM")            # and back

Supported architectures (ARCHITECTURES): DeepseekV3ForCausalLM, DeepseekV2ForCausalLM,
Qwen3MoeForCausalLM, Qwen2MoeForCausalLM, MixtralForCausalLM, OlmoeForCausalLM. Each mapping was
written against the installed transformers 5 modeling file of that architecture, and the tests
hold raymoe's logits equal to transformers' for each (tests/unit/test_hf.py).

What is notable:
- Defaults: a key missing from config.json means what transformers' config class defaults it to
  (`_DEFAULTS`), so the same file means the same model here and there.
- Nothing imports silently wrong. A setting raymoe cannot express (another activation, a RoPE
  type other than default/YaRN, Mixtral-style routing with a bias, a sliding-window pattern it has
  no key for, ...) is one `HFError` naming the Hugging Face key and its value; so is a tensor the
  mapping does not account for.
- RoPE layout: DeepSeek checkpoints rotate interleaved pairs (x0, x1), (x2, x3)...; raymoe rotates
  halves. Permuting the rotary output rows of the query projection (per head) and of
  kv_a_proj_with_mqa (after the latent) to [0, 2, 4, ..., 1, 3, 5, ...] makes the two exactly
  equal, because q.k is unchanged when q and k are permuted alike. Export applies the inverse.
- Experts: HF keeps `experts.{e}.{gate,up,down}_proj.weight` [out, in] (Mixtral: w1, w3, w2);
  raymoe stacks them transposed, gate and up side by side as w13 [E, D, 2F] (transformers 5's
  fused `gate_up_proj` [E, 2F, D] transposed) and down as w2 [E, F, D]. Reading a stacked tensor
  for an expert range reads only those experts' tensors (what one expert-parallel rank owns).
- FP8 block-quantized checkpoints (DeepSeek-V3's release: float8_e4m3fn weights, one float32
  `weight_scale_inv` per 128x128 block) are dequantized to bf16 tensor by tensor.
- Multi-token-prediction layers (`model.layers.{num_hidden_layers}...`, DeepSeek-V3's MTP) are
  skipped with a note: raymoe has no MTP head yet.

Reading is tensor by tensor: a safetensors file is opened for the tensors of one raymoe tensor and
closed again, so resident memory stays near the largest tensor rather than the model.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
from safetensors import safe_open

from raymoe.config import ConfigError, ModelConfig, model_config_from_section, to_plain as _to_plain

ARCHITECTURES = {
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "MixtralForCausalLM": "mixtral",
    "OlmoeForCausalLM": "olmoe",
}
"""Hugging Face architecture -> its model_type."""

# transformers 5 config-class defaults of the keys read here (a key absent from config.json takes these).
_COMMON = {"hidden_act": "silu", "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None,
           "partial_rotary_factor": None}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": {**_COMMON, "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
                    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
                    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
                    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
                    "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
                    "norm_topk_prob": True, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
                    "rope_interleave": True, "attention_bias": False, "num_nextn_predict_layers": 0,
                    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1},
    "deepseek_v2": {**_COMMON, "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048,
                    "rms_norm_eps": 1e-6, "attention_bias": False, "mlp_bias": False, "first_k_dense_replace": 0,
                    "kv_lora_rank": 512, "q_lora_rank": 1536, "n_group": None, "n_routed_experts": 64,
                    "n_shared_experts": 2, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                    "routed_scaling_factor": 1.0, "topk_group": None, "topk_method": "greedy",
                    "norm_topk_prob": False, "v_head_dim": 128, "num_experts_per_tok": None,
                    "moe_intermediate_size": 1407, "scoring_func": "softmax", "moe_layer_freq": 1},
    "qwen2_moe": {**_COMMON, "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
                  "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
                  "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "use_sliding_window": False,
                  "decoder_sparse_step": 1, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
                  "num_experts_per_tok": 4, "num_experts": 60, "norm_topk_prob": False, "mlp_only_layers": None,
                  "qkv_bias": True, "head_dim": None},
    "qwen3_moe": {**_COMMON, "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                  "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 4,
                  "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "attention_bias": False,
                  "use_sliding_window": False, "decoder_sparse_step": 1, "moe_intermediate_size": 768,
                  "num_experts_per_tok": 8, "num_experts": 128, "norm_topk_prob": False, "mlp_only_layers": None,
                  "head_dim": None},
    "mixtral": {**_COMMON, "rope_theta": 1e6, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None,
                "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5, "sliding_window": None,
                "num_experts_per_tok": 2, "num_local_experts": 8},
    "olmoe": {**_COMMON, "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 2048, "num_hidden_layers": 16,
              "num_attention_heads": 16, "num_key_value_heads": None, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "attention_bias": False, "clip_qkv": None, "num_experts_per_tok": 8,
              "num_experts": 64, "norm_topk_prob": False},
}


class HFError(ValueError):
    """A Hugging Face checkpoint raymoe cannot import (or a model it cannot export) as asked; the
    message names the Hugging Face key, its value and what to change."""


# ----------------------------------------------------------------------------- config: HF -> raymoe


def architecture_of(hf: dict, where: str) -> str:
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        by_type = {t: a for a, t in ARCHITECTURES.items()}
        arch = by_type.get(hf.get("model_type"))
    if arch is None:
        shown = archs[0] if archs else hf.get("model_type")
        raise HFError(f"{where}: architectures={shown!r} is not supported; raymoe imports "
                      f"{', '.join(ARCHITECTURES)}")
    return arch


# Names transformers' attribute_maps make interchangeable (its Qwen3-MoE saves num_local_experts, say).
_ALIASES = [("num_experts", "num_local_experts", "n_routed_experts"), ("num_nextn_predict_layers", "num_mtp_layers")]


class _Reader:
    """config.json values with transformers' defaults, and one-line errors naming the key."""

    def __init__(self, hf: dict, arch: str, where: str):
        self.hf, self.arch, self.where = hf, arch, where
        self.defaults = _DEFAULTS[ARCHITECTURES[arch]]

    def __call__(self, key: str) -> Any:
        if key in self.hf:
            return self.hf[key]
        for group in _ALIASES:
            if key in group:
                for alias in group:
                    if alias in self.hf:
                        return self.hf[alias]
        return self.defaults.get(key)

    def fail(self, key: str, why: str) -> None:
        raise HFError(f"{self.where}: {key}={self(key)!r} {why}")

    def require(self, key: str, allowed, why: str) -> None:
        if self(key) not in allowed:
            self.fail(key, why)


def _rope(r: _Reader) -> tuple[float, dict | None]:
    """(rope_theta, raymoe rope_scaling) from either spelling: transformers 4's rope_theta +
    rope_scaling, or transformers 5's rope_parameters."""
    params = r("rope_parameters") if isinstance(r("rope_parameters"), dict) else None
    scaling = dict(params or r("rope_scaling") or {})
    key = "rope_parameters" if params else "rope_scaling"
    theta = scaling.pop("rope_theta", None) or r("rope_theta")
    kinds = (scaling.pop("rope_type", None), scaling.pop("type", None))
    kind = kinds[0] or kinds[1] or "default"
    prf = scaling.pop("partial_rotary_factor", None) or r("partial_rotary_factor")
    if prf not in (None, 1, 1.0):
        r.fail("partial_rotary_factor", "is not supported: raymoe rotates every query/key dimension of a head")
    if kind == "default":
        return float(theta), None
    if kind != "yarn":
        raise HFError(f"{r.where}: {key}.rope_type={kind!r} is not supported; raymoe implements default RoPE and 'yarn'")
    known = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate"}
    unknown = sorted(set(scaling) - known)
    if unknown:
        raise HFError(f"{r.where}: {key}.{unknown[0]}={scaling[unknown[0]]!r} is not a YaRN setting raymoe knows")
    original = scaling.get("original_max_position_embeddings") or r("max_position_embeddings")
    factor = scaling.get("factor") or r("max_position_embeddings") / original
    out = {"factor": float(factor), "original_max_position_embeddings": int(original),
           "beta_fast": float(scaling.get("beta_fast") or 32), "beta_slow": float(scaling.get("beta_slow") or 1),
           "truncate": bool(scaling.get("truncate", True))}
    for k in ("mscale", "mscale_all_dim", "attention_factor"):
        if scaling.get(k) is not None:
            out[k] = float(scaling[k])
    return float(theta), out


def _common(r: _Reader) -> dict[str, Any]:
    r.require("hidden_act", ("silu",), "is not supported: raymoe's feed-forward layers are SwiGLU (silu)")
    theta, scaling = _rope(r)
    return {
        "vocab_size": r("vocab_size"), "hidden_size": r("hidden_size"), "num_layers": r("num_hidden_layers"),
        "num_heads": r("num_attention_heads"), "max_seq_len": r("max_position_embeddings"),
        "rms_norm_eps": float(r("rms_norm_eps")), "tie_embeddings": bool(r("tie_word_embeddings")),
        "rope_theta": theta, "rope_scaling": scaling,
        # Balancing is a training choice, not part of a checkpoint: imported models keep the routing
        # they were trained with unless a run asks for more (model.balance with init_from).
        "balance": {"bias_update_rate": 0.0},
    }


def _mla(r: _Reader) -> dict[str, Any]:
    r.require("attention_bias", (False, None), "is not supported: raymoe's MLA projections have no biases")
    out = {"attention": "mla", "q_lora_rank": r("q_lora_rank") or 0, "kv_lora_rank": r("kv_lora_rank"),
           "qk_nope_head_dim": r("qk_nope_head_dim"), "qk_rope_head_dim": r("qk_rope_head_dim"),
           "v_head_dim": r("v_head_dim")}
    # transformers builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps, not rms_norm_eps.
    if float(r("rms_norm_eps")) != 1e-6:
        out["mla_norm_eps"] = 1e-6
    return out


def _mha(r: _Reader) -> dict[str, Any]:
    H, D = r("num_attention_heads"), r("hidden_size")
    kv = r("num_key_value_heads") or H
    head_dim = r("head_dim")  # null: hidden_size / num_attention_heads, in raymoe as in transformers
    return {"attention": "mha", "num_kv_heads": None if kv == H else kv,
            "head_dim": None if head_dim is None or (D % H == 0 and head_dim == D // H) else head_dim}


def _moe_deepseek(r: _Reader) -> dict[str, Any]:
    if r("moe_layer_freq") not in (1, None):
        r.fail("moe_layer_freq", "is not supported: transformers makes every layer from first_k_dense_replace on MoE")
    return {"first_k_dense_layers": r("first_k_dense_replace") or 0, "dense_intermediate_size": r("intermediate_size"),
            "num_experts": r("n_routed_experts") or 0, "top_k": r("num_experts_per_tok"),
            "expert_intermediate_size": r("moe_intermediate_size"), "num_shared_experts": r("n_shared_experts") or 0,
            "route_scale": float(r("routed_scaling_factor"))}


def _deepseek_v3(r: _Reader) -> dict[str, Any]:
    r.require("scoring_func", ("sigmoid",), "is not supported: transformers' DeepseekV3 always scores experts with a sigmoid")
    r.require("topk_method", ("noaux_tc",), "is not supported: transformers' DeepseekV3 always routes with noaux_tc")
    return {**_common(r), **_mla(r), **_moe_deepseek(r), "score_func": "sigmoid",
            "norm_topk_prob": bool(r("norm_topk_prob")), "num_expert_groups": r("n_group") or 1,
            "top_k_groups": r("topk_group") or 1, "group_score": "top2_sum"}


def _deepseek_v2(r: _Reader) -> dict[str, Any]:
    r.require("mlp_bias", (False, None), "is not supported: raymoe's feed-forward layers have no biases")
    r.require("scoring_func", ("softmax",), "is not supported: transformers' DeepseekV2 always scores experts with a softmax")
    r.require("topk_method", ("greedy", "group_limited_greedy"),
              "is not supported: DeepseekV2 routes with 'greedy' or 'group_limited_greedy'")
    if r("norm_topk_prob"):
        r.fail("norm_topk_prob", "is ambiguous: transformers' DeepseekV2 ignores it and DeepSeek's code applies it; "
                                 "set it to false (as the released V2 checkpoints have it)")
    grouped = r("topk_method") == "group_limited_greedy"
    return {**_common(r), **_mla(r), **_moe_deepseek(r), "score_func": "softmax", "norm_topk_prob": False,
            "num_expert_groups": (r("n_group") or 1) if grouped else 1,
            "top_k_groups": (r("topk_group") or 1) if grouped else 1, "group_score": "max"}


def _qwen_layers(r: _Reader) -> dict[str, Any]:
    if r("use_sliding_window"):
        r.fail("use_sliding_window", "is not supported: raymoe has no key for Qwen's max_window_layers pattern")
    return {"moe_layer_step": r("decoder_sparse_step") or 1, "dense_layers": sorted(r("mlp_only_layers") or []),
            "num_experts": r("num_experts") or 0, "top_k": r("num_experts_per_tok"),
            "expert_intermediate_size": r("moe_intermediate_size"), "dense_intermediate_size": r("intermediate_size"),
            "norm_topk_prob": bool(r("norm_topk_prob")), "score_func": "softmax"}


def _qwen2_moe(r: _Reader) -> dict[str, Any]:
    shared = r("shared_expert_intermediate_size") or 0
    return {**_common(r), **_mha(r), **_qwen_layers(r), "qkv_bias": bool(r("qkv_bias")),
            "num_shared_experts": 1 if shared else 0, "shared_expert_intermediate_size": shared or None,
            "shared_expert_gate": bool(shared)}


def _qwen3_moe(r: _Reader) -> dict[str, Any]:
    bias = bool(r("attention_bias"))
    return {**_common(r), **_mha(r), **_qwen_layers(r), "qk_norm": "head", "qkv_bias": bias, "attn_out_bias": bias,
            "num_shared_experts": 0}


def _mixtral(r: _Reader) -> dict[str, Any]:
    out = {**_common(r), **_mha(r), "num_experts": r("num_local_experts"), "top_k": r("num_experts_per_tok"),
           "expert_intermediate_size": r("intermediate_size"), "dense_intermediate_size": r("intermediate_size"),
           "num_shared_experts": 0, "score_func": "softmax", "norm_topk_prob": True}
    if r("sliding_window") is not None:  # every layer local: no layer index is a multiple of L + 1
        out.update(sliding_window=r("sliding_window"), global_every=r("num_hidden_layers") + 1)
    return out


def _olmoe(r: _Reader) -> dict[str, Any]:
    if r("clip_qkv") is not None:
        r.fail("clip_qkv", "is not supported: raymoe does not clamp queries, keys and values")
    H, D = r("num_attention_heads"), r("hidden_size")
    if D % H:
        r.fail("hidden_size", f"must be a multiple of num_attention_heads={H} for OLMoE's query norm")
    bias = bool(r("attention_bias"))
    return {**_common(r), **_mha(r), "qk_norm": "full", "qkv_bias": bias, "attn_out_bias": bias,
            "num_experts": r("num_experts"), "top_k": r("num_experts_per_tok"),
            "expert_intermediate_size": r("intermediate_size"), "dense_intermediate_size": r("intermediate_size"),
            "num_shared_experts": 0, "score_func": "softmax", "norm_topk_prob": bool(r("norm_topk_prob"))}


_MAPPERS = {"DeepseekV3ForCausalLM": _deepseek_v3, "DeepseekV2ForCausalLM": _deepseek_v2,
            "Qwen3MoeForCausalLM": _qwen3_moe, "Qwen2MoeForCausalLM": _qwen2_moe,
            "MixtralForCausalLM": _mixtral, "OlmoeForCausalLM": _olmoe}


def model_config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """The raymoe ModelConfig of a Hugging Face config.json (one HFError when it cannot be expressed)."""
    arch = architecture_of(hf, where)
    section = _MAPPERS[arch](_Reader(hf, arch, where))
    try:
        return model_config_from_section(section, where)
    except ConfigError as e:
        raise HFError(f"maps to an invalid raymoe model: {e}") from None


def rope_interleaved(hf: dict) -> bool:
    """Does this checkpoint rotate interleaved pairs (and so need its rotary rows permuted)?"""
    arch = architecture_of(hf, "config.json")
    if arch == "DeepseekV2ForCausalLM":
        return True  # transformers' DeepseekV2 always rotates pairs (complex multiplication)
    if arch == "DeepseekV3ForCausalLM":
        return bool(hf.get("rope_interleave", True))
    return False


# ----------------------------------------------------------------------------- config: raymoe -> HF


def _rope_out(cfg: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_theta": cfg.rope_theta}
    s = cfg.rope_scaling
    if s is not None:
        scaling = {"type": "yarn", "factor": s.factor, "original_max_position_embeddings": s.original_max_position_embeddings,
                   "beta_fast": s.beta_fast, "beta_slow": s.beta_slow}
        if not s.truncate:
            scaling["truncate"] = False
        for k in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(s, k) is not None:
                scaling[k] = getattr(s, k)
        out["rope_scaling"] = scaling
    return out


def _hf_common(cfg: ModelConfig) -> dict[str, Any]:
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
            **_rope_out(cfg)}


def _hf_mha(cfg: ModelConfig) -> dict[str, Any]:
    return {"num_key_value_heads": cfg.resolved_kv_heads, "head_dim": cfg.resolved_head_dim}


def _hf_deepseek(cfg: ModelConfig, v3: bool) -> dict[str, Any]:
    out = {**_hf_common(cfg), "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
           "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
           "v_head_dim": cfg.v_head_dim, "num_key_value_heads": cfg.num_heads,
           "first_k_dense_replace": cfg.first_k_dense_layers, "intermediate_size": cfg.dense_intermediate_size,
           "n_routed_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
           "moe_intermediate_size": cfg.expert_intermediate_size, "n_shared_experts": cfg.num_shared_experts,
           "routed_scaling_factor": cfg.route_scale, "attention_bias": False, "moe_layer_freq": 1}
    grouped = cfg.num_expert_groups > 1
    if v3:
        out.update(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=cfg.norm_topk_prob,
                   n_group=cfg.num_expert_groups, topk_group=cfg.top_k_groups, rope_interleave=True,
                   num_nextn_predict_layers=0)
    else:
        out.update(scoring_func="softmax", topk_method="group_limited_greedy" if grouped else "greedy",
                   norm_topk_prob=False, n_group=cfg.num_expert_groups if grouped else None,
                   topk_group=cfg.top_k_groups if grouped else None, mlp_bias=False)
    return out


def _hf_qwen(cfg: ModelConfig) -> dict[str, Any]:
    return {**_hf_common(cfg), **_hf_mha(cfg), "decoder_sparse_step": cfg.moe_layer_step,
            "mlp_only_layers": list(cfg.dense_layers), "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
            "moe_intermediate_size": cfg.expert_intermediate_size, "intermediate_size": cfg.dense_intermediate_size,
            "norm_topk_prob": cfg.norm_topk_prob, "use_sliding_window": False}


_HF_BUILDERS = {
    "DeepseekV3ForCausalLM": lambda c: _hf_deepseek(c, v3=True),
    "DeepseekV2ForCausalLM": lambda c: _hf_deepseek(c, v3=False),
    "Qwen3MoeForCausalLM": lambda c: {**_hf_qwen(c), "attention_bias": c.qkv_bias},
    "Qwen2MoeForCausalLM": lambda c: {**_hf_qwen(c), "qkv_bias": c.qkv_bias,
                                      "shared_expert_intermediate_size": c.shared_width},
    "MixtralForCausalLM": lambda c: {**_hf_common(c), **_hf_mha(c), "num_local_experts": c.num_experts,
                                     "num_experts_per_tok": c.top_k, "intermediate_size": c.expert_intermediate_size,
                                     "sliding_window": c.sliding_window},
    "OlmoeForCausalLM": lambda c: {**_hf_common(c), **_hf_mha(c), "attention_bias": c.qkv_bias,
                                   "num_experts": c.num_experts, "num_experts_per_tok": c.top_k,
                                   "intermediate_size": c.expert_intermediate_size, "norm_topk_prob": c.norm_topk_prob,
                                   "clip_qkv": None},
}

_AUTO_ORDER = ("MixtralForCausalLM", "OlmoeForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM",
               "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")

# What a model is, as opposed to how a run trains it: export must preserve exactly these.
_TRAINING_ONLY = {"init_from", "init_std", "balance", "capacity_factor", "gate_threshold"}


def _differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    pa, pb = _to_plain(a), _to_plain(b)
    return [k for k in pa if k not in _TRAINING_ONLY and pa[k] != pb[k]]


def hf_config_from_model(cfg: ModelConfig, architecture: str | None = None, base: dict | None = None) -> dict[str, Any]:
    """A config.json for `cfg` as `architecture` (None: the most specific that expresses it exactly).

    `base`: the config.json the model was imported from; keys the mapping does not produce (token
    ids, dtype, ...) are kept from it. The result is checked by mapping it back: an architecture
    that would change any model key is refused, naming the key."""
    if cfg.capacity_factor is not None or cfg.gate_threshold > 0:
        raise HFError(f"model.capacity_factor / model.gate_threshold drop tokens; no Hugging Face architecture does "
                      "that at inference: export a model trained without them")
    # Without a recorded origin, the most specific architecture that fits: a plain GQA model is
    # Mixtral rather than a Qwen2-MoE with its options off.
    candidates = [architecture] if architecture else list(_AUTO_ORDER)
    reasons = []
    for arch in candidates:
        if arch not in _HF_BUILDERS:
            raise HFError(f"--arch {arch!r} is not supported; use one of {', '.join(ARCHITECTURES)}")
        # auto_map would send trust_remote_code users to modeling files that are not exported.
        dropped = ("rope_parameters", "quantization_config", "rope_scaling", "auto_map", "torch_dtype", "dtype")
        out = {k: v for k, v in (base or {}).items() if k not in dropped}
        out.update(_HF_BUILDERS[arch](cfg))
        out["architectures"], out["model_type"] = [arch], ARCHITECTURES[arch]
        try:
            back = model_config_from_hf(out, where=arch)
        except HFError as e:
            reasons.append(str(e))
            continue
        diff = _differences(cfg, back)
        if not diff:
            return out
        k = diff[0]
        reasons.append(f"{arch} cannot express model.{k}={_to_plain(cfg)[k]!r} (it would become {_to_plain(back)[k]!r})")
    if architecture:
        raise HFError(reasons[0])
    raise HFError("no supported Hugging Face architecture expresses this model exactly: " + "; ".join(reasons[:3]))


# ----------------------------------------------------------------------------- tensor names


@dataclass(frozen=True)
class TensorMap:
    """How one raymoe tensor is made of Hugging Face tensors."""

    name: str
    """raymoe state-dict key."""
    hf: tuple[str, ...]
    """One HF key, or for kind 'stack' one per expert and part (all experts of the first part, then
    of the next)."""
    kind: Literal["copy", "rope_q", "rope_kv", "stack", "zeros"] = "copy"
    """'rope_q'/'rope_kv': rotary rows permuted (per head / after the latent); 'stack': the
    experts' [out, in] matrices transposed and stacked into [E, in, out], `parts` of them side by
    side along out; 'zeros': a raymoe tensor the architecture does not have (the routers'
    selection bias outside DeepSeek-V3), zero there and on export required to still be zero."""
    fused: tuple[str, int, int] | None = None
    """For 'stack': (HF key of transformers 5's fused [E, rows, in] tensor, first row, rows) to use
    when the per-expert keys are absent."""
    parts: int = 1
    """For 'stack': how many HF matrices of each expert sit side by side (2 for gate and up in w13)."""


def _layer_prefixes(arch: str) -> tuple[str, str]:
    return ("block_sparse_moe", "w1 w3 w2") if arch == "MixtralForCausalLM" else ("mlp", "gate_proj up_proj down_proj")


def tensor_maps(cfg: ModelConfig, arch: str, interleaved: bool) -> list[TensorMap]:
    """Every persistent raymoe tensor of `cfg` with the HF tensors it comes from, in model order."""
    maps = [TensorMap("embed.weight", ("model.embed_tokens.weight",))]
    moe_name, proj = _layer_prefixes(arch)
    gate, up, down = proj.split()
    for i in range(cfg.num_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        maps += [TensorMap(p + "attn_norm.weight", (h + "input_layernorm.weight",)),
                 TensorMap(p + "ffn_norm.weight", (h + "post_attention_layernorm.weight",))]
        a, ha = p + "attn.", h + "self_attn."
        if cfg.attention == "mla":
            rope_q = "rope_q" if interleaved else "copy"
            if cfg.q_lora_rank > 0:
                maps += [TensorMap(a + "wq_a.weight", (ha + "q_a_proj.weight",)),
                         TensorMap(a + "q_norm.weight", (ha + "q_a_layernorm.weight",)),
                         TensorMap(a + "wq_b.weight", (ha + "q_b_proj.weight",), rope_q)]
            else:
                maps.append(TensorMap(a + "wq.weight", (ha + "q_proj.weight",), rope_q))
            maps += [TensorMap(a + "wkv_a.weight", (ha + "kv_a_proj_with_mqa.weight",), "rope_kv" if interleaved else "copy"),
                     TensorMap(a + "kv_norm.weight", (ha + "kv_a_layernorm.weight",)),
                     TensorMap(a + "wkv_b.weight", (ha + "kv_b_proj.weight",)),
                     TensorMap(a + "wo.weight", (ha + "o_proj.weight",))]
        else:
            for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
                maps.append(TensorMap(f"{a}{ours}.weight", (f"{ha}{theirs}.weight",)))
                if (cfg.qkv_bias and ours != "wo") or (cfg.attn_out_bias and ours == "wo"):
                    maps.append(TensorMap(f"{a}{ours}.bias", (f"{ha}{theirs}.bias",)))
            if cfg.qk_norm != "none":
                maps += [TensorMap(a + "q_norm.weight", (ha + "q_norm.weight",)),
                         TensorMap(a + "k_norm.weight", (ha + "k_norm.weight",))]
        f, hf_ = p + "ffn.", f"{h}{moe_name}."
        if not cfg.is_moe_layer(i):
            maps += [TensorMap(f + "w1.weight", (h + "mlp.gate_proj.weight",)),
                     TensorMap(f + "w3.weight", (h + "mlp.up_proj.weight",)),
                     TensorMap(f + "w2.weight", (h + "mlp.down_proj.weight",))]
            continue
        maps.append(TensorMap(f + "router.weight", (hf_ + "gate.weight",)))
        if arch == "DeepseekV3ForCausalLM":
            maps.append(TensorMap(f + "router.expert_bias", (hf_ + "gate.e_score_correction_bias",)))
        else:
            maps.append(TensorMap(f + "router.expert_bias", (), "zeros"))
        E, F = cfg.num_experts, cfg.expert_intermediate_size
        fused_gate_up, fused_down = hf_ + "experts.gate_up_proj", hf_ + "experts.down_proj"
        for ours, theirs, fused in (("w13", (gate, up), (fused_gate_up, 0, 2 * F)),
                                    ("w2", (down,), (fused_down, 0, cfg.hidden_size))):
            keys = tuple(f"{hf_}experts.{e}.{proj}.weight" for proj in theirs for e in range(E))
            maps.append(TensorMap(f"{f}experts.{ours}", keys, "stack", fused, parts=len(theirs)))
        if cfg.shared_width:
            shared = h + ("mlp.shared_expert." if arch == "Qwen2MoeForCausalLM" else "mlp.shared_experts.")
            maps += [TensorMap(f + "shared.w1.weight", (shared + "gate_proj.weight",)),
                     TensorMap(f + "shared.w3.weight", (shared + "up_proj.weight",)),
                     TensorMap(f + "shared.w2.weight", (shared + "down_proj.weight",))]
            if cfg.shared_expert_gate:
                maps.append(TensorMap(f + "shared.gate.weight", (h + "mlp.shared_expert_gate.weight",)))
    maps.append(TensorMap("norm.weight", ("model.norm.weight",)))
    if not cfg.tie_embeddings:
        maps.append(TensorMap("lm_head.weight", ("lm_head.weight",)))
    return maps


def _rope_rows(cfg: ModelConfig, kind: str, inverse: bool) -> torch.Tensor:
    """Row order that turns interleaved rotary rows into rotate-half rows (or back)."""
    r = cfg.qk_rope_head_dim
    halves = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2)])
    perm = torch.argsort(halves) if inverse else halves
    if kind == "rope_kv":
        L = cfg.kv_lora_rank
        return torch.cat([torch.arange(L), L + perm])
    n = cfg.qk_nope_head_dim
    head = torch.cat([torch.arange(n), n + perm])
    return torch.cat([h * (n + r) + head for h in range(cfg.num_heads)])


def permute_rope(t: torch.Tensor, cfg: ModelConfig, kind: str, inverse: bool = False) -> torch.Tensor:
    if kind not in ("rope_q", "rope_kv"):
        return t
    return t[_rope_rows(cfg, kind, inverse)].contiguous()


def to_hf_tensors(m: TensorMap, t: torch.Tensor, cfg: ModelConfig, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors a raymoe tensor becomes (export)."""
    if m.kind == "zeros":
        if bool(t.ne(0).any()):
            raise HFError(f"{m.name} is not zero (auxiliary-loss-free balancing moved it), and {arch} has no "
                          "selection bias to carry it (only DeepseekV3ForCausalLM does); train with "
                          "model.balance.bias_update_rate: 0 to export this model as " + arch)
        return
    if m.kind == "stack":
        experts = len(m.hf) // m.parts
        for p, part in enumerate(t.chunk(m.parts, dim=-1)):
            for key, w in zip(m.hf[p * experts:(p + 1) * experts], part.unbind(0)):
                yield key, w.t().contiguous()
    else:
        yield m.hf[0], permute_rope(t, cfg, m.kind, inverse=True)


# ----------------------------------------------------------------------------- reading checkpoints


MTP_NOTE = ("skipped {n} tensors of layers {layers} (DeepSeek's multi-token-prediction module): raymoe has no MTP "
            "head yet; the main model is complete without them")


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """DeepSeek-V3's block FP8: w is float8_e4m3fn [out, in], scale_inv one float per block of
    block[0] x block[1] (ragged at the edges); returns w * scale in bf16."""
    out, inp = w.shape
    rows, cols = math.ceil(out / block[0]), math.ceil(inp / block[1])
    if tuple(scale_inv.shape) != (rows, cols):
        raise HFError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {(rows, cols)} for a "
                      f"{tuple(w.shape)} weight in {block[0]}x{block[1]} blocks")
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :inp]
    return (w.float() * scale).to(torch.bfloat16)


class HFCheckpoint:
    """A Hugging Face model directory: config.json and single-file or sharded safetensors."""

    def __init__(self, path: str):
        self.path = path
        cfg_path = os.path.join(path, "config.json")
        try:
            with open(cfg_path) as f:
                self.config = json.load(f)
        except FileNotFoundError:
            raise HFError(f"{path}: no config.json; point at a Hugging Face model directory") from None
        except (OSError, json.JSONDecodeError) as e:
            raise HFError(f"{cfg_path}: unreadable ({e})") from None
        self.architecture = architecture_of(self.config, cfg_path)
        self.weight_map = self._weight_map()
        q = self.config.get("quantization_config") or {}
        self.fp8_block = None
        if q:
            if q.get("quant_method") != "fp8" or (q.get("fmt") not in (None, "e4m3")):
                raise HFError(f"{cfg_path}: quantization_config.quant_method={q.get('quant_method')!r} "
                              f"(fmt {q.get('fmt')!r}) is not supported; raymoe dequantizes block FP8 (e4m3) only")
            self.fp8_block = tuple(q.get("weight_block_size") or (128, 128))
        self.num_layers = self.config.get("num_hidden_layers") or _DEFAULTS[ARCHITECTURES[self.architecture]]["num_hidden_layers"]
        self.reads: list[str] = []
        """HF keys read so far, in order (tests check what an expert-parallel rank touched)."""

    def _weight_map(self) -> dict[str, str]:
        index = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    wm = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise HFError(f"{index}: unreadable index ({e})") from None
            missing = sorted({fn for fn in wm.values() if not os.path.exists(os.path.join(self.path, fn))})
            if missing:
                raise HFError(f"{index}: lists {missing[0]}, which is missing from {self.path}")
            return wm
        files = sorted(fn for fn in os.listdir(self.path) if fn.endswith(".safetensors"))
        if not files:
            raise HFError(f"{self.path}: no .safetensors weights (and no model.safetensors.index.json); raymoe reads "
                          "safetensors checkpoints only (convert .bin with transformers' save_pretrained)")
        wm = {}
        for fn in files:
            with safe_open(os.path.join(self.path, fn), framework="pt") as f:
                wm.update({k: fn for k in f.keys()})
        return wm

    def has(self, key: str) -> bool:
        return key in self.weight_map

    def iter_read(self, keys: list[str]) -> Iterator[tuple[int, torch.Tensor]]:
        """(position in keys, tensor) for each HF key, FP8 ones dequantized, in file order. The file
        is opened per tensor: safetensors maps it, and pages read stay resident until it is closed,
        which would otherwise put a whole shard's worth of tensors into RSS."""
        by_file: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            if k not in self.weight_map:
                raise HFError(f"{self.path}: the checkpoint has no tensor {k} (truncated download or another architecture?)")
            by_file.setdefault(self.weight_map[k], []).append(i)
        for fn, idx in by_file.items():
            for i in idx:
                with safe_open(os.path.join(self.path, fn), framework="pt") as f:
                    t = f.get_tensor(keys[i])
                self.reads.append(keys[i])
                if t.dtype == torch.float8_e4m3fn:
                    scale_key = keys[i] + "_scale_inv"
                    if scale_key not in self.weight_map:
                        raise HFError(f"{self.path}: {keys[i]} is float8_e4m3fn but {scale_key} is missing")
                    (scale,) = self._read_plain([scale_key])
                    t = dequantize_fp8(t, scale, self.fp8_block or (128, 128))
                yield i, t

    def read(self, key: str) -> torch.Tensor:
        return next(self.iter_read([key]))[1]

    def _read_plain(self, keys: list[str]) -> list[torch.Tensor]:
        fn = self.weight_map[keys[0]]
        with safe_open(os.path.join(self.path, fn), framework="pt") as f:
            return [f.get_tensor(k) for k in keys]

    def mtp_keys(self) -> list[str]:
        """Tensors of layers at or past num_hidden_layers: DeepSeek-V3's MTP module."""
        pat = re.compile(r"^model\.layers\.(\d+)\.")
        return [k for k in self.weight_map if (m := pat.match(k)) and int(m.group(1)) >= self.num_layers]


_IGNORED = re.compile(r"(\.rotary_emb\.inv_freq|_scale_inv)$")


class HFSource:
    """raymoe-named tensors read from a Hugging Face checkpoint, one raymoe tensor at a time."""

    def __init__(self, ckpt: HFCheckpoint, cfg: ModelConfig | None = None):
        self.ckpt = ckpt
        self.cfg = cfg or model_config_from_hf(ckpt.config, os.path.join(ckpt.path, "config.json"))
        self.maps = {m.name: m for m in tensor_maps(self.cfg, ckpt.architecture, rope_interleaved(ckpt.config))}
        self.notes: list[str] = []
        mtp = ckpt.mtp_keys()
        if mtp:
            layers = sorted({int(k.split(".")[2]) for k in mtp})
            self.notes.append(MTP_NOTE.format(n=len(mtp), layers=", ".join(map(str, layers))))
        self._check_keys(set(mtp))

    def _check_keys(self, skipped: set[str]) -> None:
        """Every tensor the model needs is there, and every tensor there is accounted for."""
        wanted = set()
        for m in self.maps.values():
            if m.kind == "stack" and not all(self.ckpt.has(k) for k in m.hf) and m.fused and self.ckpt.has(m.fused[0]):
                wanted.add(m.fused[0])
                continue
            for k in m.hf:
                if not self.ckpt.has(k):
                    raise HFError(f"{self.ckpt.path}: the checkpoint has no tensor {k} (needed for raymoe's {m.name}); "
                                  "is the download complete, and is config.json the one of these weights?")
                wanted.add(k)
        extra = sorted(k for k in self.ckpt.weight_map if k not in wanted and k not in skipped and not _IGNORED.search(k))
        if extra:
            raise HFError(f"{self.ckpt.path}: {len(extra)} tensor(s) raymoe's {self.ckpt.architecture} mapping does not "
                          f"account for, e.g. {extra[0]}; refusing to import part of a model")

    def names(self) -> list[str]:
        return list(self.maps)

    def tensor(self, name: str, experts: range | None = None) -> torch.Tensor:
        """One raymoe tensor; for stacked expert weights, only the rows of `experts` (all if None)."""
        m = self.maps[name]
        if m.kind == "zeros":
            return torch.zeros(self.cfg.num_experts, dtype=torch.float32)
        if m.kind != "stack":
            return permute_rope(self.ckpt.read(m.hf[0]), self.cfg, m.kind)
        E = len(m.hf) // m.parts
        rows = experts if experts is not None else range(E)
        if all(self.ckpt.has(k) for k in m.hf):
            # Filled expert by expert: the [E, in, parts * out] result is the only full-size buffer.
            out = None
            keys = [m.hf[p * E + e] for p in range(m.parts) for e in rows]
            for i, w in self.ckpt.iter_read(keys):
                if out is None:
                    out = torch.empty(len(rows), w.shape[1], m.parts * w.shape[0], dtype=w.dtype)
                p, e = divmod(i, len(rows))
                out[e, :, p * w.shape[0]:(p + 1) * w.shape[0]].copy_(w.t())
            return out
        key, first, count = m.fused  # transformers 5's own layout: [E, rows, in]
        fused = self.ckpt.read(key)
        return fused[rows.start:rows.stop, first:first + count].transpose(1, 2).contiguous()
