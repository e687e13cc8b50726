"""Ray Train end to end on the session's local Ray. A 2-worker expert-parallel run learns and
tracks to MLflow (params, metrics, artifacts, its MLflow model); run again with more steps it
continues the same MLflow run from its last checkpoint. The same run with a worker SIGKILLed
mid-run: Ray Train restarts the group, every rank reloads the last checkpoint with its expert
shard, and the run ends where the uninterrupted one does, in one MLflow run. What no restart can
fix ends at once instead: a run whose only checkpoint is corrupt stops after one attempt despite
max_failures, and a worker group larger than the session's fixed-size local Ray
(tests/conftest.py) fails before any worker starts, both in one line."""

from __future__ import annotations

import json
import os

import pytest
from mlflow.tracking import MlflowClient

from raymoe.config import config_from_dict
from raymoe.ray_train import run_training
from raymoe.tracking import tracking_uri

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def ep_run(output_dir, name, fault=None, steps=12):
    return config_from_dict({
        "name": name,
        "output_dir": str(output_dir),
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_seq_len": 32, "num_experts": 8,
                  "top_k": 2, "expert_intermediate_size": 16, "score_func": "sigmoid", "route_scale": 2.5,
                  "num_expert_groups": 4, "top_k_groups": 2},
        # Two workers (expert degree 2) keep the test to a minute on two cores; the 4-worker elastic
        # test covers the larger group.
        "scaling": {"num_workers": 2, "max_failures": 2},
        "parallel": {"expert_degree": "auto"},
        "train": {"steps": steps, "batch_size": 2, "seq_len": 32, "lr": 3e-3, "warmup_steps": 2, "log_every": 2,
                  "val_every": 6, "val_batches": 1, "checkpoint_every": 4, "sample_tokens": 8,
                  "fault_injection": fault},
        "data": {"max_bytes": 300_000},
        "tracking": {"experiment": "ft"},
    })


def _artifacts(client, run_id, path=None):
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def test_a_run_tracks_to_mlflow_resumes_into_its_run_and_a_killed_worker_restarts_it_to_the_same_losses(ray_cluster, tmp_path):
    ref_cfg = ep_run(tmp_path, "reference")
    reference = run_training(ref_cfg)
    client = MlflowClient(tracking_uri(ref_cfg))
    _assert_tracked(client, reference, ref_cfg)

    cfg = ep_run(tmp_path, "faulted", fault={"kill_rank": 1, "at_step": 6})
    faulted = run_training(cfg)

    assert faulted.step == reference.step == 12
    assert reference.restarts == 0
    assert faulted.restarts == 1 and faulted.restart_records[0]["cause"] == "fault_injection"
    assert faulted.restart_records[0]["resumed_from_step"] == 4
    assert faulted.train_loss == pytest.approx(reference.train_loss, abs=1e-4)
    assert faulted.val_loss == pytest.approx(reference.val_loss, abs=1e-4)

    with open(os.path.join(cfg.storage_path, cfg.name, "fault_injected.json")) as f:
        marker = json.load(f)
    assert marker["killed_after_step"] == 6 and marker["rank"] == 1

    run_id = faulted.mlflow_run_id
    restarts = [(m.step, m.value) for m in client.get_metric_history(run_id, "elastic/restarts")]
    assert restarts == [(4, 1.0)]  # resumed from the step-4 checkpoint, once
    assert [m.value for m in client.get_metric_history(run_id, "elastic/steps_lost")] == [2.0]  # 5, 6
    assert [m.value for m in client.get_metric_history(run_id, "elastic/world_size")] == [2.0]
    recovery = client.get_metric_history(run_id, "elastic/recovery_s")
    assert len(recovery) == 1 and 0 < recovery[0].value < 120
    # Steps logged before the kill are not logged again: every metric's steps strictly increase.
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [2, 4, 6, 8, 10, 12]
    a2a = client.get_metric_history(run_id, "moe/a2a_bytes")
    assert a2a and all(m.value > 0 for m in a2a)

    # The reference again, same name and output_dir, more steps: Ray Train resumes it from its
    # step-12 checkpoint into the same MLflow run, continuing the step count.
    second = run_training(ep_run(tmp_path, "reference", steps=16))
    assert second.mlflow_run_id == reference.mlflow_run_id and second.step == 16
    steps = [m.step for m in client.get_metric_history(reference.mlflow_run_id, "train/loss")]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16]  # continued, not restarted from 0
    restarts = client.get_metric_history(reference.mlflow_run_id, "elastic/restarts")
    assert [(m.step, m.value) for m in restarts] == [(12, 1.0)]


def _assert_tracked(client, outcome, cfg):
    """What a finished run leaves in MLflow: params in YAML spelling, falling losses, the MoE
    metrics, its artifacts and an MLflow model holding the trained weights."""
    assert outcome.step == 12
    assert outcome.checkpoint_path and os.path.isdir(outcome.checkpoint_path)
    assert outcome.sample is not None and outcome.sample.startswith(cfg.train.sample_prompt)
    run = client.get_run(outcome.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.num_experts"] == "8"
    assert run.data.params["scaling.num_workers"] == "2"
    assert run.data.params["parallel.expert_degree"] == "2"  # resolved, not "auto"
    val = client.get_metric_history(run.info.run_id, "val/loss")
    assert [m.step for m in val] == [6, 12]
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert loss[-1].value < loss[0].value - 0.3, [m.value for m in loss]
    for key in ("train/tokens_per_s", "train/grad_norm", "moe/load_imbalance", "moe/dropped_frac"):
        assert client.get_metric_history(run.info.run_id, key), key
    artifacts = _artifacts(client, run.info.run_id)
    for name in ("config.yaml", "expert_load.json", "expert_load_heatmap.png"):
        assert name in artifacts, (name, artifacts)
    from raymoe.model_dir import open_source

    model = open_source(f"runs:/{run.info.run_id}/model", tracking_uri=tracking_uri(cfg))  # the run's MLflow model
    assert {"config.yaml", "model.safetensors"} <= set(os.listdir(model.path)) and model.cfg.model == cfg.model


def _write_corrupt_checkpoint(cfg) -> str:
    """A real checkpoint of cfg's model (one rank) in the run's storage directory, where
    `_resume_candidates` finds it, with one byte of its expert shard flipped."""
    import torch

    from raymoe.model.transformer import MoETransformer
    from raymoe.parallel.apply import parallelize
    from raymoe.parallel.checkpoint import TrainerState, save_checkpoint
    from raymoe.parallel.mesh import build_mesh
    from raymoe.train.loop import build_optimizer

    model = MoETransformer(cfg.model)
    model.init_weights(seed=0)
    plan = parallelize(model, build_mesh(1, 0, 1, cfg.model.num_experts))
    opt = build_optimizer(plan.dense + plan.experts, cfg.train, torch.device("cpu"))
    path = os.path.join(cfg.storage_path, cfg.name, "checkpoint_2026-01-01_00-00-00.000000")
    save_checkpoint(path, model, opt, plan, TrainerState(step=4, model_hash=cfg.model_hash()))
    shard = os.path.join(path, f"experts-00000-{cfg.model.num_experts:05d}.safetensors")
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(shard, "wb").write(bytes(data))
    return shard


def test_a_run_whose_only_checkpoint_is_corrupt_ends_after_one_attempt_naming_the_file(ray_cluster, tmp_path):
    import time

    from raymoe.parallel.checkpoint import CheckpointError

    cfg = config_from_dict({**ep_run(tmp_path, "corrupt").to_dict(), "scaling": {"num_workers": 2, "max_failures": 3}})
    shard = _write_corrupt_checkpoint(cfg)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        run_training(cfg)
    seconds = time.perf_counter() - t0
    msg = str(info.value)
    print(f"corrupt only checkpoint: failed in {seconds:.1f}s: {msg}")
    # One attempt is one worker-group start (~10 s here); max_failures=3 used to make it four.
    assert seconds < 45, seconds
    assert "\n" not in msg
    assert msg.startswith("none of the 1 checkpoints could be loaded")
    assert f"ranks 0, 1: {shard}: sha256 does not match manifest.json" in msg


def test_more_workers_than_the_cluster_has_cpus_fails_in_seconds_naming_the_keys(ray_cluster, tmp_path):
    import time

    from raymoe.config import ConfigError

    cpus = int(ray_cluster.cluster_resources()["CPU"])
    cfg = config_from_dict({**ep_run(tmp_path, "too-big").to_dict(), "scaling": {"num_workers": cpus + 4, "max_failures": 3}})
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        run_training(cfg)
    assert time.perf_counter() - t0 < 10
    assert str(info.value) == (f"scaling.num_workers={cpus + 4} x scaling.cpus_per_worker=1.0 needs {cpus + 4} CPUs; "
                               f"this Ray cluster has {cpus} and does not autoscale: lower scaling.num_workers or add nodes")
