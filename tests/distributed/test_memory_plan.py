"""raymoe plan's per-rank parameter, gradient and AdamW figures against the bytes the training loop
actually holds (memory/*_bytes), in gloo runs of 4 ranks with frozen parts (test_fsdp.py does the
same for its 1-, 2- and 4-rank runs); and its activation estimate against the tensors autograd
saves (CPU, fp32)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raymoe.config import config_from_dict
from raymoe.model.transformer import MoETransformer
from raymoe.parallel.memory import Layout, activation_parts, rank_memory
from raymoe.train.data import prepare_run_data

# Uneven on purpose: 260 vocabulary rows and 3-row tensors do not split evenly over 4 ranks.
MODEL = {"hidden_size": 40, "num_layers": 3, "num_heads": 4, "max_seq_len": 64, "attention": "mla", "kv_lora_rank": 16,
         "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "first_k_dense_layers": 1,
         "dense_intermediate_size": 72, "num_experts": 4, "top_k": 2, "expert_intermediate_size": 24,
         "num_shared_experts": 1, "shared_expert_gate": True}


def _cfg(tmp_path, world, ep, dense, freeze=()):
    return config_from_dict({
        "name": "plan", "output_dir": str(tmp_path / "out"), "model": MODEL, "scaling": {"num_workers": world},
        "parallel": {"expert_degree": ep, "dense": dense},
        "train": {"steps": 1, "warmup_steps": 0, "batch_size": 1, "seq_len": 16, "log_every": 1, "val_every": 1, "val_batches": 1,
                  "checkpoint_every": 100, "sample_tokens": 0, "precision": "fp32", "freeze": list(freeze)},
        "data": {"max_bytes": 60_000},
    })


def _worker(rank, world, port, cfg_dict, corpus_dir, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from raymoe.train.loop import DistInfo, train

    class Reporter:
        metrics = {}

        def report(self, metrics, checkpoint_dir):
            Reporter.metrics.update(metrics)

    train(config_from_dict(cfg_dict), corpus_dir=corpus_dir, reporter=Reporter(),
          info=DistInfo(rank, world, torch.device("cpu")))
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump({k: v for k, v in Reporter.metrics.items() if k.startswith("memory/")}, f)
    dist.destroy_process_group()


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# (world, expert degree, dense layout, frozen parts). tests/distributed/test_fsdp.py checks the
# same equality for every run it makes (1, 2 and 4 ranks, both layouts, expert replicas, bf16).
RUNS = [
    (4, 4, "replicate", ("embeddings",)),
    (4, 4, "fsdp", ("attention", "norms")),
]


def test_planned_state_bytes_equal_what_each_layout_holds(tmp_path):
    corpus = prepare_run_data(_cfg(tmp_path, 4, 4, "replicate")).dir
    for i, (world, ep, dense, freeze) in enumerate(RUNS):
        cfg = _cfg(tmp_path, world, ep, dense, freeze)
        out = tmp_path / f"run{i}.json"
        mp.spawn(_worker, args=(world, _port(), cfg.to_dict(), corpus, str(out)), nprocs=world)
        held = json.loads(out.read_text())
        planned = rank_memory(cfg, world, Layout(ep, dense, 0), device_type="cpu")
        assert held["memory/param_bytes"] == planned.params, (world, ep, dense)
        assert held["memory/grad_bytes"] == planned.grads, (world, ep, dense)
        assert held["memory/optimizer_state_bytes"] == planned.optimizer, (world, ep, dense)
        alone = rank_memory(cfg, 1, Layout(1, "replicate", 0), device_type="cpu")
        assert planned.params < alone.params  # every layout here shards something


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
        out = model(tokens)
        torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), tokens.flatten())
    kept, recompute = activation_parts(cfg, tokens.numel(), checkpointing, device_type="cpu")
    assert kept == pytest.approx(sum(saved.values()), rel=0.15)
    assert (recompute > 0) == bool(checkpointing)
    if checkpointing:
        full, _ = activation_parts(cfg, tokens.numel(), 0, device_type="cpu")
        assert kept + recompute < full / 2  # recomputation pays off already at 3 blocks
