"""raymoe plan's activation estimate against the tensors autograd saves (CPU, fp32). Its parameter,
gradient and AdamW figures are checked against the bytes training holds in every gloo run of
tests/distributed/test_fsdp.py (1, 2 and 4 ranks, both dense layouts, expert replicas, frozen parts,
bf16)."""

from __future__ import annotations

import pytest
import torch

from raymoe.config import config_from_dict
from raymoe.model.transformer import MoETransformer
from raymoe.parallel.memory import activation_parts


@pytest.mark.parametrize("attention", ["mha", "mla"])
@pytest.mark.parametrize("checkpointing", [0, 1])
def test_activation_estimate_is_within_15_percent_of_what_autograd_saves(attention, checkpointing):
    model_cfg = {"vocab_size": 260, "hidden_size": 128, "num_layers": 3, "num_heads": 4, "max_seq_len": 128,
                 "attention": attention, "first_k_dense_layers": 1, "dense_intermediate_size": 256, "num_experts": 8,
                 "top_k": 2, "expert_intermediate_size": 64, "num_shared_experts": 1}
    if attention == "mla":
        model_cfg.update(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32)
    cfg = config_from_dict({"name": "act", "model": model_cfg, "train": {"precision": "fp32"}})
    torch.manual_seed(0)
    model = MoETransformer(cfg.model)
    model.init_weights(0)
    model.train()
    model.checkpoint_every = checkpointing
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, 260, (2, 128))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # what forward keeps for backward
        model(tokens, targets=tokens).token_loss.mean()  # the training loop's forward and loss
    kept, recompute = activation_parts(cfg, tokens.numel(), checkpointing, device_type="cpu")
    assert kept == pytest.approx(sum(saved.values()), rel=0.15)
    assert (recompute > 0) == bool(checkpointing)
    if checkpointing:
        full, _ = activation_parts(cfg, tokens.numel(), 0, device_type="cpu")
        assert kept + recompute < full / 2  # recomputation pays off already at 3 blocks
