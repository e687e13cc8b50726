"""FSDP-sharded checkpoints (torch.distributed.checkpoint for the dense part, expert stacks
FSDP-sharded over their replicas) reload bit-identically into other layouts: 4 ranks (expert
degree 2 x data degree 2, everything sharded) save; 2 ranks fully sharded at expert degree 2,
and 1 plain process, load; every weight and AdamW moment equals the saved one exactly. The
sharded checkpoint also exports as a Hugging Face directory."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist

from gloo import spawn
from raymoe.config import config_from_dict
from raymoe.model.transformer import MoETransformer
from raymoe.parallel.apply import assign_, materialize, parallelize
from raymoe.parallel.checkpoint import TrainerState, full_state_dict, load_checkpoint, save_checkpoint
from raymoe.parallel.mesh import build_mesh
from raymoe.train.loop import RUN_CONFIG, build_optimizer

# Multi-process or subprocess runs, seconds each: `make test-fast` skips them.
pytestmark = pytest.mark.slow

# DeepSeek-V3-shaped (exportable to DeepseekV3ForCausalLM), with uneven rows for 4 ranks.
MODEL = {"hidden_size": 40, "num_layers": 3, "num_heads": 4, "max_seq_len": 128, "attention": "mla", "kv_lora_rank": 16,
         "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "first_k_dense_layers": 1,
         "dense_intermediate_size": 72, "num_experts": 4, "top_k": 2, "expert_intermediate_size": 24,
         "num_shared_experts": 1, "score_func": "sigmoid", "route_scale": 2.5, "num_expert_groups": 2, "top_k_groups": 1}


def _build(world, rank, ep, dense):
    cfg = config_from_dict({"name": "ck", "model": MODEL, "parallel": {"expert_degree": ep, "dense": dense}})
    with torch.device("meta"):
        model = MoETransformer(cfg.model)
    mesh = build_mesh(world, rank, ep, cfg.model.num_experts)
    plan = parallelize(model, mesh, dense=dense)
    materialize(model, plan, torch.device("cpu"))
    model.init_weights(seed=3, assign=assign_)
    opt = build_optimizer(plan.dense + plan.experts, cfg.train, torch.device("cpu"))
    return cfg, model, plan, opt


def _whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _snapshot(plan, opt):
    """Every parameter and moment whole (gathered over FSDP; experts: this rank's expert slice)."""
    out = {}
    for name, p in plan.dense + plan.experts:
        out[name] = _whole(p).detach().clone()
        for m in ("exp_avg", "exp_avg_sq"):
            if p in opt.state:
                out[f"opt/{name}/{m}"] = _whole(opt.state[p][m]).detach().clone()
    return out


def _save_worker(rank, world, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg, model, plan, opt = _build(world, rank, 2, "fsdp")
    assert plan.fsdp and plan.expert_fsdp
    torch.manual_seed(rank)
    for _ in range(2):  # non-trivial moments
        out = model(torch.randint(0, 260, (2, 16)))
        (out.logits.float().square().mean() + out.aux_loss).backward()
        plan.sync_gradients()
        opt.step()
        opt.zero_grad()
    save_checkpoint(os.path.join(root, "ckpt"), model, opt, plan, TrainerState(step=2, model_hash=cfg.model_hash()),
                    records={RUN_CONFIG: cfg.to_dict()} if rank == 0 else None)
    snap = _snapshot(plan, opt)
    if plan.mesh.data_index == 0:
        torch.save(snap, os.path.join(root, f"saved-{plan.mesh.expert_index}.pt"))
    dist.destroy_process_group()


def _load_worker(rank, world, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _check_load(world, rank, root, "fsdp")
    dist.destroy_process_group()


def _check_load(world, rank, root, dense):
    cfg, model, plan, opt = _build(world, rank, 2 if world > 1 else 1, dense)
    load_checkpoint(os.path.join(root, "ckpt"), model, opt, plan, cfg.model_hash())
    got = _snapshot(plan, opt)
    saved = [torch.load(os.path.join(root, f"saved-{j}.pt")) for j in range(2)]
    local = plan.mesh.local_experts()
    assert set(got) == set(saved[0]) and any(k.startswith("opt/") for k in got)  # the moments came back too
    for name, t in got.items():
        base = name.split("/")[1] if name.startswith("opt/") else name
        if base in dict(plan.experts):
            # The saving layout held experts [0, 2) on expert index 0 and [2, 4) on index 1.
            want = torch.cat([saved[0][name], saved[1][name]])[local.start:local.stop]
        else:
            want = saved[0][name]
        assert torch.equal(t, want), (world, name)


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fully_sharded_checkpoint_reloads_bit_identically_at_other_layouts_and_exports(tmp_path):
    from raymoe.model_dir import export_hf

    root = str(tmp_path)
    spawn(_save_worker, (4, _port(), root), 4)
    assert len([f for f in os.listdir(tmp_path / "ckpt" / "dense") if f.endswith(".distcp")]) == 4
    spawn(_load_worker, (2, _port(), root), 2)  # expert degree 2, no replicas
    _check_load(1, 0, root, "replicate")  # one plain process, no process group
    whole = full_state_dict(str(tmp_path / "ckpt"))
    assert whole["layers.1.ffn.experts.w13"].shape[0] == 4  # every expert, from both expert files
    assert export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), log=lambda m: None) == "DeepseekV3ForCausalLM"
