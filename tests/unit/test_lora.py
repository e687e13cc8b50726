"""LoRA (model/lora.py) on one process: identity at step 0, gradients only where they belong,
merge equal to the adapted model, the grouped-expert path equal to a per-expert reference."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from raymoe.config import ConfigError, LoraConfig, ModelConfig, config_from_dict
from raymoe.model.lora import apply_lora, is_adapter, merge_lora, part_of, set_trainable
from raymoe.model.moe import GroupedExperts
from raymoe.model.transformer import MoETransformer

ALL = ("attention", "dense_ffn", "shared_experts", "routed_experts")


def _model(attention="mla", seed=0):
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, max_seq_len=32, attention=attention, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, q_lora_rank=12 if attention == "mla" else 0,
                      first_k_dense_layers=1, dense_intermediate_size=48, num_experts=4, top_k=2,
                      expert_intermediate_size=16, num_shared_experts=1)
    model = MoETransformer(cfg)
    model.init_weights(seed=seed)
    return model


def _randomize_b(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _tokens(seed=0, B=2, S=12):
    return torch.randint(0, 260, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_zero_b_leaves_the_logits_unchanged_and_the_merge_equals_the_adapted_model(attention):
    model = _model(attention)
    for moe in model.moe_layers():
        # Adapted experts take the grouped GEMM; exact equality needs the base model on it too,
        # not on the padded inference path (the same sums, rounded in another order).
        moe.padded = False
    x = _tokens()
    with torch.no_grad():
        base = model(x).logits
    added = apply_lora(model, LoraConfig(rank=4, alpha=8, targets=ALL))
    assert added > 0
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, base)  # B = 0: exactly the base model, not approximately
    _randomize_b(model)
    with torch.no_grad():
        adapted = model(x).logits
    assert (adapted - base).abs().max() > 1e-3  # the adapters now matter...
    merge_lora(model)
    assert not any(is_adapter(n) for n, _ in model.named_parameters())
    assert set(model.state_dict()) == set(_model(attention).state_dict())  # a plain model again
    with torch.no_grad():
        merged = model(x).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)  # ...and the merge keeps them


def test_gradients_reach_only_adapters_and_the_router_when_asked():
    lora = LoraConfig(rank=4, targets=("attention", "routed_experts"), train_router=True)
    model = _model()
    apply_lora(model, lora)
    set_trainable(model, SimpleNamespace(lora=lora, train=SimpleNamespace(freeze=())))
    model(_tokens()).logits.square().mean().backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
        elif ".lora_B" in name or part_of(name) == "router":
            assert p.grad.abs().sum() > 0, name  # B = 0, so A's gradient is zero at step 0, B's is not
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(is_adapter(n) or part_of(n) == "router" for n in trained)
    assert any(part_of(n) == "router" for n in trained)
    assert any(".ffn.experts.lora_B1" in n for n in trained) and any(".attn.wkv_a.lora_A" in n for n in trained)
    assert not any(".ffn.w1.lora" in n or ".shared." in n for n in trained)  # not targets


def test_freeze_parts_for_full_fine_tuning():
    run = config_from_dict({"train": {"freeze": ["embeddings", "router", "norms"]}})
    model = _model()
    set_trainable(model, run)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "embed.weight" in frozen and "lm_head.weight" in frozen and "layers.1.ffn.router.weight" in frozen
    assert "layers.0.attn_norm.weight" in frozen and "norm.weight" in frozen and "layers.0.attn.kv_norm.weight" in frozen
    assert "layers.1.ffn.experts.w13" not in frozen and "layers.0.attn.wo.weight" not in frozen


def test_config_refuses_lora_without_a_base_and_with_freeze():
    with pytest.raises(ConfigError, match="lora.rank > 0 fine-tunes a trained model: set model.init_from"):
        config_from_dict({"lora": {"rank": 8}})
    with pytest.raises(ConfigError, match="lora.targets=.*must be one of|lora.targets\\[0\\]"):
        config_from_dict({"lora": {"targets": ["mlp"]}})
    with pytest.raises(ConfigError, match="train.freeze=.*nothing|train.freeze\\[0\\]"):
        config_from_dict({"train": {"freeze": ["everything"]}})
    with pytest.raises(ConfigError, match="lora.alpha=0.0 must be > 0"):
        config_from_dict({"lora": {"alpha": 0}})


def _reference_experts(x, counts, w, adapters, scale):
    """SwiGLU per expert with explicitly merged per-expert weights, one expert at a time."""
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xe = x[start:start + n]
        start += n
        W = {k: w[k][e] + scale * adapters[f"A{k}"][e] @ adapters[f"B{k}"][e] for k in "132"}
        outs.append((F.silu(xe @ W["1"]) * (xe @ W["3"])) @ W["2"])
    return torch.cat(outs)


def test_grouped_expert_lora_equals_a_per_expert_reference_forward_and_gradients():
    torch.manual_seed(0)
    E, D, Fh, r = 4, 12, 10, 3
    experts = GroupedExperts(E, D, Fh)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    apply_lora(_wrap(experts), LoraConfig(rank=r, alpha=6, targets=("routed_experts",)))
    with torch.no_grad():
        for k in "132":
            getattr(experts, f"lora_B{k}").normal_(0, 0.3)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(int(counts.sum()), D)

    x1 = x.clone().requires_grad_()
    out = experts(x1, counts)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    gate, up = experts.w13.detach().chunk(2, dim=-1)  # the reference takes gate and up apart
    w = {"1": gate, "3": up, "2": experts.w2.detach()}
    ad = {f"{ab}{k}": getattr(experts, f"lora_{ab}{k}").detach().clone().requires_grad_() for ab in "AB" for k in "132"}
    x2 = x.clone().requires_grad_()
    ref = _reference_experts(x2, counts, w, ad, 6 / r)
    ref.backward(grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for key, t in ad.items():
        torch.testing.assert_close(getattr(experts, f"lora_{key[0]}{key[1]}").grad, t.grad, rtol=1e-4, atol=1e-5)
    assert ad["A1"].grad[1].abs().sum() == 0  # expert 1 got no tokens, so no gradient


def _wrap(experts):
    """A module tree in which `experts` sits where apply_lora looks for routed experts."""
    root = torch.nn.Module()
    layer = torch.nn.Module()
    layer.ffn = torch.nn.Module()
    layer.ffn.experts = experts
    root.layers = torch.nn.ModuleList([layer])
    return root


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's rms_norm under bf16 autocast
def test_a_frozen_base_in_bf16_keeps_adapters_embedding_and_norms_in_fp32_and_computes_alike():
    from raymoe.model.lora import cast_frozen_

    lora = LoraConfig(rank=4, targets=ALL)
    model = _model()
    apply_lora(model, lora)
    _randomize_b(model)
    set_trainable(model, SimpleNamespace(lora=lora, train=SimpleNamespace(freeze=())))
    x = _tokens()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x).logits.float()  # fp32 weights, bf16 compute: what storing them in bf16 must match
    saved = cast_frozen_(model, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert saved == sum(p.numel() * 2 for n, p in model.named_parameters() if dtypes[n] == torch.bfloat16)
    assert dtypes["layers.1.ffn.experts.w13"] == dtypes["layers.0.attn.wkv_a.weight"] == torch.bfloat16
    assert dtypes["embed.weight"] == dtypes["layers.0.attn_norm.weight"] == dtypes["layers.0.attn.wkv_a.lora_A"] == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x).logits.float()
    # Linear layers compute identically (autocast rounded their weights to bf16 already); the fp32
    # router now reads bf16-rounded weights, the only source of difference.
    assert (out - ref).abs().max() / ref.abs().max() < 0.02
