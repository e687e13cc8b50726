"""Expert parallelism, multi-process with gloo, no Ray: the real training loop in 1, 2 and 4
processes (expert degree 1, 2, 4) over the same global batch must agree, and checkpoints must
reshard between those layouts without changing a bit."""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

from gloo import spawn
from raymoe.config import config_from_dict
from raymoe.parallel.checkpoint import full_state_dict, read_manifest

# Multi-process or subprocess runs, seconds each: `make test-fast` skips them.
pytestmark = pytest.mark.slow

GLOBAL_BATCH = 8  # sequences per step, split evenly over the ranks
# A flat LR after warmup (min_lr_ratio 1): the chained resumes below stop at different train.steps.


def make_cfg(out_dir, world, steps, checkpoint_every):
    return config_from_dict({
        "name": "ep",
        "output_dir": str(out_dir),
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_seq_len": 32, "num_experts": 8,
                  "top_k": 2, "expert_intermediate_size": 16, "first_k_dense_layers": 0, "score_func": "sigmoid",
                  "num_expert_groups": 4, "top_k_groups": 2, "route_scale": 2.5,
                  "balance": {"bias_update_rate": 0.01, "seq_aux_loss_coef": 0.01}},
        "scaling": {"num_workers": world},
        "train": {"steps": steps, "batch_size": GLOBAL_BATCH // world, "seq_len": 16, "lr": 1e-2, "warmup_steps": 1, "min_lr_ratio": 1.0,
                  "log_every": 1, "val_every": 1000, "val_batches": 1, "checkpoint_every": checkpoint_every,
                  "sample_tokens": 0},
    })


class MergingReporter:
    """Ray Train's job in miniature: every rank's checkpoint directory merged into one."""

    def __init__(self, root, rank):
        self.root, self.rank, self.losses = root, rank, {}

    def report(self, metrics, checkpoint_dir):
        step = int(metrics["train/step"])
        self.losses[step] = metrics["train/loss"]
        if checkpoint_dir:
            shutil.copytree(checkpoint_dir, os.path.join(self.root, f"ckpt-{step:03d}"), dirs_exist_ok=True)


def _worker(rank, world, port, cfg_dict, corpus_dir, out_dir, resume_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from raymoe.train.loop import DistInfo, train

    cfg = config_from_dict(cfg_dict)
    reporter = MergingReporter(out_dir, rank)
    train(cfg, corpus_dir=corpus_dir, reporter=reporter, info=DistInfo(rank, world, torch.device("cpu")),
          resume_dirs=[resume_dir] if resume_dir else [])
    if rank == 0:
        with open(os.path.join(out_dir, "losses.json"), "w") as f:
            json.dump(reporter.losses, f)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world, out_dir, corpus_dir, steps, checkpoint_every, resume_dir=None):
    os.makedirs(out_dir, exist_ok=True)
    cfg = make_cfg(out_dir, world, steps, checkpoint_every)
    spawn(_worker, (world, _free_port(), cfg.to_dict(), corpus_dir, str(out_dir), resume_dir), world)
    with open(os.path.join(out_dir, "losses.json")) as f:
        return {int(k): v for k, v in json.load(f).items()}


def moments(path):
    """Every Adam moment in a checkpoint, expert shards concatenated back to [E, ...]."""
    manifest = read_manifest(path)
    out = {}
    with safe_open(os.path.join(path, "dense.safetensors"), "pt") as f:
        out.update({k: f.get_tensor(k) for k in f.keys() if k.startswith("opt/")})
    shards = sorted((n for n, i in manifest["files"].items() if "experts" in i), key=lambda n: manifest["files"][n]["experts"])
    parts: dict[str, list] = {}
    for name in shards:
        with safe_open(os.path.join(path, name), "pt") as f:
            for k in f.keys():
                if k.startswith("opt/"):
                    parts.setdefault(k, []).append(f.get_tensor(k))
    out.update({k: torch.cat(v) for k, v in parts.items()})
    return out


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    from raymoe.train.data import prepare_corpus

    cfg = make_cfg(tmp_path_factory.mktemp("c"), 1, 1, 1)
    return prepare_corpus(cfg.data.__class__(max_bytes=300_000), cfg.data_cache_dir, 16).dir


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory, corpus_dir):
    """6 steps at worlds 1, 2 and 4 (expert degree 1, 2, 4), checkpoint every 3 steps."""
    root = tmp_path_factory.mktemp("worlds")
    return {w: (run(w, root / f"w{w}", corpus_dir, steps=6, checkpoint_every=3), root / f"w{w}") for w in (1, 2, 4)}


def test_worlds_of_1_2_and_4_processes_give_the_same_loss_and_parameters(straight_runs):
    losses1, dir1 = straight_runs[1]
    assert read_manifest(dir1 / "ckpt-006")["state"]["expert_degree"] == 1
    for world in (2, 4):
        losses, d = straight_runs[world]
        assert read_manifest(d / "ckpt-006")["state"]["expert_degree"] == world
        assert list(losses) == list(losses1) == [1, 2, 3, 4, 5, 6]
        for step in losses1:
            assert losses[step] == pytest.approx(losses1[step], abs=2e-5), (world, step)
        a, b = full_state_dict(dir1 / "ckpt-006"), full_state_dict(d / "ckpt-006")
        assert a.keys() == b.keys()
        for k in a:  # routers' selection biases included: global loads agree on every layout
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=5e-5, msg=f"world {world}: {k}")


def test_expert_shards_hold_each_rank_s_experts_and_moments(straight_runs):
    manifest = read_manifest(straight_runs[4][1] / "ckpt-006")
    ranges = sorted(i["experts"] for i in manifest["files"].values() if "experts" in i)
    assert ranges == [[0, 2], [2, 4], [4, 6], [6, 8]]
    m = moments(straight_runs[4][1] / "ckpt-006")
    assert m["opt/layers.0.ffn.experts.w13/exp_avg"].shape == (8, 32, 32)
    assert float(m["opt/layers.0.ffn.experts.w13/exp_avg_sq"].abs().sum()) > 0


def test_resume_at_2_then_1_then_4_workers_keeps_every_expert_and_the_loss_trajectory(tmp_path, straight_runs, corpus_dir):
    losses4, d4 = straight_runs[4]
    saved = d4 / "ckpt-003"  # EP=4
    chain = [(2, 4), (1, 5), (4, 6)]  # (world, train until step): 3 -> 4 at EP=2, -> 5 at EP=1, -> 6 at EP=4
    resume = str(saved)
    for world, until in chain:
        out = tmp_path / f"w{world}-to-{until}"
        losses = run(world, out, corpus_dir, steps=until, checkpoint_every=1, resume_dir=resume)
        assert list(losses) == [until]  # continued from the previous step, nothing repeated
        assert losses[until] == pytest.approx(losses4[until], abs=5e-5), (world, until)
        resume = str(out / f"ckpt-{until:03d}")
    final = full_state_dict(resume)
    reference = full_state_dict(d4 / "ckpt-006")
    for k in reference:
        torch.testing.assert_close(final[k], reference[k], rtol=0, atol=1e-4, msg=k)
    state = read_manifest(resume)["state"]
    assert state["step"] == 6 and state["restarts"] == 3 and state["expert_degree"] == 4


def test_reloading_at_another_expert_degree_is_bit_identical(tmp_path, straight_runs, corpus_dir):
    """Save at EP=4, load at EP=2 and EP=1 and save again with no step in between: same bytes."""
    saved = straight_runs[4][1] / "ckpt-006"
    for world in (2, 1):
        out = tmp_path / f"reload-{world}"
        _reload_and_save(world, saved, out, corpus_dir)
        a, b = full_state_dict(saved), full_state_dict(out)
        for k in a:
            assert torch.equal(a[k], b[k]), (world, k)
        ma, mb = moments(saved), moments(out)
        assert ma.keys() == mb.keys()
        for k in ma:
            assert torch.equal(ma[k], mb[k]), (world, k)


def _reload_worker(rank, world, port, cfg_dict, src, dst):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from raymoe.model.transformer import MoETransformer
    from raymoe.parallel.apply import parallelize
    from raymoe.parallel.checkpoint import load_latest_good, save_checkpoint
    from raymoe.parallel.mesh import build_mesh, resolve_expert_degree
    from raymoe.train.loop import build_optimizer

    cfg = config_from_dict(cfg_dict)
    model = MoETransformer(cfg.model)
    model.init_weights(seed=123)  # different from training: everything must come from the checkpoint
    mesh = build_mesh(world, rank, resolve_expert_degree("auto", world, 8), 8)
    plan = parallelize(model, mesh)
    opt = build_optimizer(plan.dense + plan.experts, cfg.train, torch.device("cpu"))
    _, state, records = load_latest_good([src], model, opt, plan, cfg.model_hash(), log=lambda m: None)
    save_checkpoint(dst, model, opt, plan, state, records=records if rank == 0 else None)
    dist.destroy_process_group()


def _reload_and_save(world, src, dst, corpus_dir):
    cfg = make_cfg(dst, world, 6, 3)
    spawn(_reload_worker, (world, _free_port(), cfg.to_dict(), str(src), str(dst)), world)
