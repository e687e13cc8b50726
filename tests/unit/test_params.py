"""model/params.py: parameter counts and FLOPs from a config, checked against built models."""

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from raymoe.config import ModelConfig, load_config
from raymoe.model.attention import Attention, MLAttention
from raymoe.model.moe import GroupedExperts, MoE, SwiGLU, TopKRouter
from raymoe.model.params import count_params, format_report, mean_keys_attended, train_flops_per_token
from raymoe.model.transformer import MoETransformer

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"

BASE = dict(vocab_size=300, hidden_size=64, num_layers=3, num_heads=4, expert_intermediate_size=32,
            dense_intermediate_size=96, num_experts=8, top_k=2)
SMALL = {
    "mha": ModelConfig(**BASE),
    "gqa_head_dim": ModelConfig(**BASE | dict(num_kv_heads=2, head_dim=24)),
    "mla_q_lora": ModelConfig(**BASE | dict(attention="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                                            qk_rope_head_dim=4, v_head_dim=12)),
    "mla_no_q_lora": ModelConfig(**BASE | dict(attention="mla", q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8,
                                               qk_rope_head_dim=4, v_head_dim=12)),
    "tied": ModelConfig(**BASE | dict(tie_embeddings=True)),
    "no_shared_all_moe": ModelConfig(**BASE | dict(num_shared_experts=0, first_k_dense_layers=0)),
    "two_shared_first_dense": ModelConfig(**BASE | dict(num_shared_experts=2, first_k_dense_layers=1, top_k=3)),
    "all_dense": ModelConfig(**BASE | dict(num_experts=0)),
    "sliding_groups": ModelConfig(**BASE | dict(sliding_window=5, global_every=2, num_expert_groups=4, top_k_groups=2,
                                                first_k_dense_layers=1)),
    # The Hugging Face layouts model/hf.py maps onto.
    "qwen2_moe_style": ModelConfig(**BASE | dict(num_layers=4, qkv_bias=True, shared_expert_intermediate_size=40,
                                                 shared_expert_gate=True, moe_layer_step=2, dense_layers=(3,))),
    "qwen3_moe_style": ModelConfig(**BASE | dict(num_kv_heads=2, head_dim=24, qk_norm="head", num_shared_experts=0)),
    "olmoe_style": ModelConfig(**BASE | dict(qk_norm="full", qkv_bias=True, attn_out_bias=True, num_shared_experts=0)),
}


def _numel(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters(recurse=False))


@pytest.mark.parametrize("name", list(SMALL))
def test_total_equals_the_built_models_parameters(name):
    cfg = SMALL[name]
    model = MoETransformer(cfg)
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(SMALL))
def test_activated_equals_a_hand_sum_over_the_built_modules(name):
    cfg = SMALL[name]
    model = MoETransformer(cfg)
    c = count_params(cfg)
    expected = 0
    for pname, p in model.named_parameters():  # a tied head appears only as embed.weight
        if pname == "embed.weight":
            continue
        if ".experts.w" in pname:
            assert p.numel() % cfg.num_experts == 0
            expected += p.numel() * cfg.top_k // cfg.num_experts
        else:
            expected += p.numel()
    if cfg.tie_embeddings:
        expected += model.lm_head.weight.numel()  # the head still multiplies by the tied matrix
    assert c.activated == expected
    assert c.embedding == model.embed.weight.numel()
    assert c.activated_with_embedding == expected + (0 if cfg.tie_embeddings else c.embedding)


@pytest.mark.parametrize("name", list(SMALL))
def test_breakdown_matches_modules_by_kind(name):
    cfg = SMALL[name]
    model = MoETransformer(cfg)
    mods = list(model.modules())
    blocks = list(model.layers)
    b = count_params(cfg).breakdown
    norms = [m for m in mods if isinstance(m, nn.RMSNorm)]
    attn = [m for m in mods if isinstance(m, (Attention, MLAttention))]
    attn_linears = [l for a in attn for l in a.modules() if isinstance(l, nn.Linear)]
    moes = [m for m in mods if isinstance(m, MoE)]
    assert b["norms"] == _numel(norms)
    assert b["attention"] == sum(l.weight.numel() for l in attn_linears)
    assert b["biases"] == sum(l.bias.numel() for l in attn_linears if l.bias is not None)
    assert b["router"] == _numel(m for m in mods if isinstance(m, TopKRouter))
    assert b["routed_experts"] == _numel(m for m in mods if isinstance(m, GroupedExperts))
    assert b["shared_experts"] == sum(sum(p.numel() for p in m.shared.parameters()) for m in moes if m.shared is not None)
    assert b["dense_ffn"] == sum(sum(p.numel() for p in blk.ffn.parameters()) for blk in blocks if isinstance(blk.ffn, SwiGLU))
    assert b["lm_head"] == (0 if cfg.tie_embeddings else model.lm_head.weight.numel())
    assert sum(v for k, v in b.items() if k != "routed_experts_activated") == count_params(cfg).total


def test_buffers_are_not_counted():
    cfg = SMALL["mha"]
    model = MoETransformer(cfg)
    assert any(name.endswith("expert_bias") for name, _ in model.named_buffers())
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())
    assert count_params(cfg).total < sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


# A fine-tuning config takes its architecture from model.init_from (test_shipped_configs loads it).
ARCHITECTURES = sorted(p for p in CONFIGS.glob("*.yaml") if "init_from:" not in p.read_text())


@pytest.mark.parametrize("path", ARCHITECTURES, ids=lambda p: p.name)
def test_shipped_architectures_count_exactly_on_the_meta_device(path):
    cfg = load_config(path).model
    with torch.device("meta"):  # 671B parameters, no memory
        model = MoETransformer(cfg)
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())


def _arch(name: str) -> ModelConfig:
    return load_config(CONFIGS / f"{name}.yaml").model


def test_deepseek_v3_is_671b_with_36_6b_activated():
    c = count_params(_arch("deepseek-v3"))
    # DeepSeek's own count is 14,848 higher: its selection bias (256 per MoE layer) is a
    # parameter there and a buffer here.
    assert c.total == 671_026_404_352
    assert c.total == pytest.approx(671.0e9, rel=1e-3)
    assert 36.6e9 <= c.activated <= 37.0e9
    assert c.activated_with_embedding == pytest.approx(37.6e9, rel=5e-3)


def test_mixtral_is_46_7b_with_12_9b_activated_counting_the_embedding():
    c = count_params(_arch("mixtral-8x7b"))
    assert c.total == pytest.approx(46.7e9, rel=5e-3)
    # Mistral's 12.9B includes the input-embedding lookup; without it 12.75B.
    assert c.activated_with_embedding == pytest.approx(12.9e9, rel=5e-3)
    assert c.activated == pytest.approx(12.75e9, rel=1e-3)


def test_deepseek_v2_lite_is_15_7b_with_2_45b_activated():
    c = count_params(_arch("deepseek-v2-lite"))
    assert c.total == pytest.approx(15.7e9, rel=5e-3)
    assert 2.40e9 <= c.activated <= 2.45e9 * 1.005


def test_small_gpu_config_is_about_1b():
    c = count_params(_arch("small-gpu"))
    assert 1.0e9 <= c.total <= 1.3e9


def test_train_flops_of_a_tiny_dense_model_match_a_hand_computation():
    cfg = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_experts=0,
                      dense_intermediate_size=96, tie_embeddings=False)
    T, D, L, H, d = 32, 64, 2, 4, 16
    per_layer = 4 * D * D + 3 * D * 96  # wq wk wv wo + SwiGLU
    n_matmul = L * per_layer + 300 * D  # + LM head, not the embedding lookup
    attention = 6 * L * T * H * (d + d) / 2
    assert train_flops_per_token(cfg, T) == pytest.approx(6 * n_matmul + attention)


def test_train_flops_count_only_top_k_experts_and_mla_head_dims():
    cfg = SMALL["mla_q_lora"]
    c = count_params(cfg)
    T = 16
    attention = 6 * cfg.num_layers * T * cfg.num_heads * ((8 + 4) + 12) / 2
    assert train_flops_per_token(cfg, T) == pytest.approx(6 * (c.activated - c.breakdown["norms"]) + attention)
    more_experts = dataclasses.replace(cfg, num_experts=16)  # unused experts cost no FLOPs
    assert train_flops_per_token(more_experts, T) - train_flops_per_token(cfg, T) == pytest.approx(
        6 * (count_params(more_experts).breakdown["router"] - c.breakdown["router"]))


def test_sliding_window_layers_count_the_keys_they_really_attend():
    assert mean_keys_attended(8, None) == 4
    assert mean_keys_attended(8, 3) == pytest.approx((1 + 2 + 3 * 6) / 8)
    assert mean_keys_attended(8, 100) == pytest.approx(sum(range(1, 9)) / 8)
    cfg = SMALL["sliding_groups"]  # layers 0 and 2 local (window 5), layer 1 global
    glob = dataclasses.replace(cfg, sliding_window=None)
    T, H, d = 64, 4, 16
    keys_local = mean_keys_attended(T, 5)
    saved = 6 * H * 2 * d * 2 * (T / 2 - keys_local)
    assert train_flops_per_token(glob, T) - train_flops_per_token(cfg, T) == pytest.approx(saved)


def test_report_shows_human_units_and_totals():
    text = format_report(_arch("deepseek-v3"), seq_len=4096)
    assert "671.03B" in text and "36.63B" in text and "37.55B" in text
    assert "671,026,404,352" in text
    assert "tied to embedding" in format_report(SMALL["tied"], seq_len=16)
