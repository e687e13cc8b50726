"""Two gloo ranks at expert degree 2 load a checkpoint whose expert shard only rank 1 reads is
corrupt: every rank's refusal is gathered, so rank 0 (the one that prints) names the bad file,
the rank that found it and why, falls back to the previous checkpoint, and when no checkpoint
is left the one-line error lists every rank's bad files.

    .venv/bin/python -m pytest tests/distributed/test_checkpoint_refusal.py -q
"""

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
from raymoe.parallel.apply import parallelize
from raymoe.parallel.checkpoint import CheckpointError, TrainerState, load_latest_good, save_checkpoint
from raymoe.parallel.mesh import build_mesh
from raymoe.train.loop import build_optimizer

# Multi-process or subprocess runs, seconds each: `make test-fast` skips them.
pytestmark = pytest.mark.slow

MODEL = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "max_seq_len": 128, "num_experts": 4, "top_k": 2,
         "expert_intermediate_size": 8}
RANK1_SHARD = "experts-00002-00004.safetensors"  # experts [2, 4): only rank 1 reads it at expert degree 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(world, rank):
    cfg = config_from_dict({"model": MODEL})
    model = MoETransformer(cfg.model)
    model.init_weights(seed=0)
    plan = parallelize(model, build_mesh(world, rank, world, cfg.model.num_experts))
    return cfg, model, plan, build_optimizer(plan.dense + plan.experts, cfg.train, torch.device("cpu"))


def _flip_byte(fpath: str) -> None:
    data = bytearray(open(fpath, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(fpath, "wb").write(bytes(data))


def _worker(rank, world, port, root, stage):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg, model, plan, opt = _build(world, rank)
    if stage == "save":
        for step in (1, 2):
            save_checkpoint(os.path.join(root, f"step-{step}"), model, opt, plan, TrainerState(step=step, model_hash=cfg.model_hash()))
    else:
        lines, outcome = [], {}
        candidates = [os.path.join(root, "step-2"), os.path.join(root, "step-1")]
        try:
            path, state, _ = load_latest_good(candidates, model, opt, plan, cfg.model_hash(), log=lines.append)
            outcome = {"path": path, "step": state.step}
        except CheckpointError as e:
            outcome = {"error": str(e)}
        with open(os.path.join(root, f"{stage}-rank{rank}.json"), "w") as f:
            json.dump({"lines": lines, **outcome}, f)
    dist.barrier()  # neither rank tears gloo down while the other still talks to it (an abort at exit otherwise)
    dist.destroy_process_group()


def _results(root, stage):
    return [json.load(open(os.path.join(root, f"{stage}-rank{r}.json"))) for r in range(2)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("refusal"))
    spawn(_worker, (2, _port(), root, "save"), 2)
    return root


def test_rank0_names_the_file_rank1_refused_and_falls_back(saved):
    bad = os.path.join(saved, "step-2", RANK1_SHARD)
    _flip_byte(bad)
    try:
        spawn(_worker, (2, _port(), saved, "fallback"), 2)
    finally:
        _flip_byte(bad)  # restore it for the next test
    rank0, rank1 = _results(saved, "fallback")
    assert rank0["path"] == rank1["path"] == os.path.join(saved, "step-1") and rank0["step"] == 1
    # Was: "checkpoint .../step-2 refused: another rank could not load its part; trying the previous one".
    assert rank0["lines"] == [f"checkpoint {os.path.join(saved, 'step-2')} refused: rank 1: {bad}: sha256 does not match "
                              "manifest.json (truncated or corrupted); trying the previous one"]


def test_when_no_checkpoint_loads_the_error_lists_every_ranks_bad_files(saved):
    newest_bad = os.path.join(saved, "step-2", RANK1_SHARD)
    dense_bad = os.path.join(saved, "step-1", "dense.safetensors")
    _flip_byte(newest_bad)
    _flip_byte(dense_bad)
    try:
        spawn(_worker, (2, _port(), saved, "none"), 2)
    finally:
        _flip_byte(newest_bad)
        _flip_byte(dense_bad)
    rank0, rank1 = _results(saved, "none")
    assert rank0["error"] == rank1["error"]  # every rank raises the same error
    assert rank0["error"] == (
        f"none of the 2 checkpoints could be loaded: rank 1: {newest_bad}: sha256 does not match manifest.json "
        f"(truncated or corrupted); ranks 0, 1: {dense_bad}: sha256 does not match manifest.json (truncated or corrupted); "
        "fix or remove them, or start a new run name")
