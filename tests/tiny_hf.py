"""Tiny random Hugging Face MoE models, built offline from configs (no hub downloads).

    model = build("DeepseekV3ForCausalLM"); model.save_pretrained(path)

Each config exercises what the mapping for its architecture must get right: DeepSeek's
interleaved RoPE and YaRN with its MLA softmax correction, both group rules, V3's correction bias,
Qwen2-MoE's q/k/v biases, gated shared expert of a free width and sparse-step/mlp-only layers,
Qwen3-MoE's per-head q/k norm with a head_dim that is not hidden/heads, OLMoE's full-width q/k norm,
Mixtral's GQA. Weights are re-drawn larger than transformers' 0.02 init and router weights larger
still, so that attention and routing are decisive: a wrong rule changes which experts are chosen.
"""

from __future__ import annotations

import torch

TINY = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=128,
            rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_YARN_V3 = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}
_YARN_V2 = {**_YARN_V3, "mscale": 0.707, "mscale_all_dim": 0.707}

CONFIGS = {
    "DeepseekV3ForCausalLM": dict(
        TINY, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=4,
        norm_topk_prob=True, rope_theta=10000.0, rope_scaling=_YARN_V3),
    "DeepseekV2ForCausalLM": dict(  # V2-Lite's shape: no query compression, greedy top-k, two shared experts
        TINY, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=3, topk_method="greedy", first_k_dense_replace=1, routed_scaling_factor=1.0,
        kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=4,
        norm_topk_prob=False, rope_theta=10000.0, rope_scaling=_YARN_V2),
    "Qwen2MoeForCausalLM": dict(
        TINY, num_hidden_layers=4, num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2,
        mlp_only_layers=[3], norm_topk_prob=False, qkv_bias=True, rope_theta=10000.0),
    "Qwen3MoeForCausalLM": dict(
        TINY, num_key_value_heads=2, head_dim=24, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, rope_theta=1e6),
    "MixtralForCausalLM": dict(
        TINY, num_key_value_heads=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6),
    "OlmoeForCausalLM": dict(
        TINY, num_key_value_heads=4, intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
        rope_theta=10000.0),
}
# A DeepSeek-V2 with group-limited routing (a group scores its best expert) and query compression.
VARIANTS = {
    "DeepseekV2-grouped": ("DeepseekV2ForCausalLM", dict(CONFIGS["DeepseekV2ForCausalLM"], topk_method="group_limited_greedy",
                                                         n_group=4, topk_group=2, q_lora_rank=48)),
    "DeepseekV3-no-q-lora": ("DeepseekV3ForCausalLM", dict(CONFIGS["DeepseekV3ForCausalLM"], q_lora_rank=None)),
}
ALL = {**{a: (a, c) for a, c in CONFIGS.items()}, **VARIANTS}


def build(name: str, seed: int = 0, **overrides):
    """A random model of ALL[name], in eval mode, fp32, eager attention and experts."""
    import transformers

    arch, kwargs = ALL[name]
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_cls(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    decisive(model, seed)
    return model


@torch.no_grad()
def decisive(model, seed: int = 0) -> None:
    """Weights with real spread: routers std 1 (routing far from ties), correction biases of the
    size of score differences, norms around 1, matrices std 0.08."""
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        elif ".gate.weight" in name and "shared" not in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.rand(b.shape, generator=gen) * 0.4 - 0.2)


def prompts(vocab: int, lengths=(7, 12, 3), seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


SAMPLE_TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
               "        self.y = y\n\nprint('héllo wörld — ünïcode ✓ 日本語')\n") * 8


def write_tokenizer(directory, vocab_size: int = 300, add_bos: bool | None = True, text: str = SAMPLE_TEXT) -> str:
    """A byte-level BPE tokenizer trained offline on `text`, saved as Hugging Face saves one:
    tokenizer.json (with a post-processor that prepends <s>) and tokenizer_config.json.
    Ids 0, 1, 2 are <pad>, <s>, </s>, as in TINY. add_bos None: no add_bos_token key."""
    import json
    import os

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    if add_bos is not None:
        config["add_bos_token"] = add_bos
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


def save(name: str, directory, seed: int = 0, tokenizer: bool = True, **save_kwargs):
    """build(name) saved with save_pretrained (and a tokenizer); returns (directory, model)."""
    model = build(name, seed)
    model.save_pretrained(directory, **save_kwargs)
    if tokenizer:
        write_tokenizer(directory)
    return str(directory), model
