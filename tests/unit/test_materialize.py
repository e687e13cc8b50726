"""Meta-device build (parallel/apply.py materialize): a rank allocates only what it owns, and the
same seed gives the same global weights, adapters included, at any expert degree."""

from __future__ import annotations

import torch

from raymoe.config import LoraConfig, ModelConfig
from raymoe.model.lora import apply_lora, init_adapters
from raymoe.model.transformer import MoETransformer
from raymoe.parallel.apply import materialize, parallelize
from raymoe.parallel.mesh import Mesh

CFG = ModelConfig(hidden_size=32, num_layers=3, num_heads=2, max_seq_len=32, attention="mla", kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, first_k_dense_layers=1,
                  dense_intermediate_size=48, num_experts=8, top_k=2, expert_intermediate_size=16, tie_embeddings=True)
LORA = LoraConfig(rank=4, targets=("attention", "routed_experts"))


def _rank_model(expert_degree: int, rank: int):
    """What rank `rank` of a world of `expert_degree` ranks builds (no process group: nothing runs)."""
    with torch.device("meta"):
        model = MoETransformer(CFG)
    apply_lora(model, LORA)
    plan = parallelize(model, Mesh(expert_degree, rank, expert_degree, CFG.num_experts))
    materialize(model, plan, torch.device("cpu"))
    model.init_weights(seed=3)
    init_adapters(model, seed=3)
    return model, plan


def test_every_layout_starts_from_the_same_global_weights_and_holds_only_its_experts():
    whole, _ = _rank_model(1, 0)
    full = whole.state_dict()
    assert whole.lm_head.weight is whole.embed.weight  # the tie survives materialization
    per_rank_bytes = {}
    for ep in (2, 4):
        for rank in range(ep):
            model, plan = _rank_model(ep, rank)
            lo, hi = rank * 8 // ep, (rank + 1) * 8 // ep
            for name, t in model.state_dict().items():
                expected = full[name][lo:hi] if name in dict(plan.experts) else full[name]
                assert torch.equal(t, expected), (ep, rank, name)
            per_rank_bytes[ep] = sum(p.numel() * p.element_size() for p in model.parameters())
    whole_bytes = sum(p.numel() * p.element_size() for p in whole.parameters())
    expert_bytes = sum(p.numel() * p.element_size() for n, p in whole.named_parameters() if ".ffn.experts." in n)
    for ep, got in per_rank_bytes.items():
        assert got == whole_bytes - expert_bytes + expert_bytes // ep  # dense + its share of the experts
    assert torch.count_nonzero(full["layers.1.ffn.experts.lora_B1"]) == 0 and full["layers.1.ffn.experts.lora_A1"].std() > 0
