"""LoRA fine-tuning on sft data, expert-parallel, multi-process with gloo, no Ray: one rank and two
ranks (each owning half of the experts and their adapters) give the same losses step by step, so
the adapters are sliced with their experts, their gradients cross the all-to-all, and the loss is
normalized over the global batch's loss tokens whichever rank holds them; and the one-rank run's
adapter checkpoint resumes on two ranks (resharded) with the same losses as going on with one."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist

from gloo import spawn
from raymoe.config import config_from_dict
from raymoe.model.transformer import MoETransformer
from raymoe.model_dir import write_model_dir
from raymoe.train.data import prepare_run_data
from reporters import MergingReporter

# Multi-process or subprocess runs, seconds each: `make test-fast` skips them.
pytestmark = pytest.mark.slow

MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_seq_len": 64, "attention": "mla", "kv_lora_rank": 16,
         "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "num_experts": 4, "top_k": 2,
         "expert_intermediate_size": 16, "first_k_dense_layers": 1, "dense_intermediate_size": 48,
         "balance": {"bias_update_rate": 0.01}}
GLOBAL_BATCH = 4


def _cfg(tmp_path, world):
    return config_from_dict({
        "name": "lora-ep", "output_dir": str(tmp_path / "out"), "model": {"init_from": str(tmp_path / "base")},
        "lora": {"rank": 4, "alpha": 8, "targets": ["attention", "dense_ffn", "shared_experts", "routed_experts"],
                 "train_router": True},
        "scaling": {"num_workers": world},
        "train": {"steps": 4, "batch_size": GLOBAL_BATCH // world, "seq_len": 64, "lr": 1e-2, "warmup_steps": 0,
                  "log_every": 1, "val_every": 2, "val_batches": 1, "checkpoint_every": 2, "sample_tokens": 0},
        "data": {"format": "sft", "source": str(tmp_path / "sft.jsonl"), "val_fraction": 0.2},
    })


def _worker(rank, world, port, cfg_dict, corpus_dir, out_file, resume, keep):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from raymoe.train.loop import DistInfo, train

    reporter = MergingReporter(keep)
    train(config_from_dict(cfg_dict), corpus_dir=corpus_dir, reporter=reporter, info=DistInfo(rank, world, torch.device("cpu")),
          resume_dirs=[resume] if resume else [])
    losses = {step: [m["train/loss"], m.get("val/loss")] for step, m in reporter.metrics.items()}
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(losses, f)
    dist.destroy_process_group()


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_expert_parallel_lora_on_two_ranks_gives_the_losses_of_one(tmp_path):
    base = config_from_dict({"name": "base", "model": MODEL, "train": {"seq_len": 64}})
    model = MoETransformer(base.model)
    model.init_weights(seed=5)
    write_model_dir(str(tmp_path / "base"), base, model.state_dict().items())
    with open(tmp_path / "sft.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"Q{i}: what is {i} + {i % 7}?\n", "completion": f"A: {i + i % 7}" + "!" * (i % 5)}) + "\n")
    corpus = prepare_run_data(_cfg(tmp_path, 1)).dir
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"losses-{world}.json"
        keep = str(tmp_path / "ckpts") if world == 1 else None
        spawn(_worker, (world, _port(), _cfg(tmp_path, world).to_dict(), corpus, str(out), None, keep), world)
        runs[world] = json.loads(out.read_text())
    assert list(runs[1]) == ["1", "2", "3", "4"]
    for step in runs[1]:
        (a, va), (b, vb) = runs[1][step], runs[2][step]
        assert b == pytest.approx(a, rel=1e-5), (step, a, b)
        if va is not None:
            assert vb == pytest.approx(va, rel=1e-5)
    assert runs[1]["4"][0] < runs[1]["1"][0]  # it trains

    out = tmp_path / "losses-resumed.json"
    spawn(_worker, (2, _port(), _cfg(tmp_path, 2).to_dict(), corpus, str(out), str(tmp_path / "ckpts" / "step2"), None), 2)
    resumed = json.loads(out.read_text())
    assert list(resumed) == ["3", "4"]
    for step in resumed:
        assert resumed[step][0] == pytest.approx(runs[1][step][0], rel=1e-5), step
