"""A worker of a 2-worker expert-parallel run is SIGKILLed mid-run: Ray Train restarts the group,
every rank reloads the last checkpoint with its expert shard, and the run ends where an
uninterrupted one does, in the same MLflow run."""

from __future__ import annotations

import json
import os

import pytest
from mlflow.tracking import MlflowClient

from raymoe.config import config_from_dict
from raymoe.ray_train import run_training
from raymoe.tracking import tracking_uri

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def ep_run(output_dir, name, fault=None):
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
        "train": {"steps": 12, "batch_size": 2, "seq_len": 32, "lr": 3e-3, "warmup_steps": 2, "log_every": 2,
                  "val_every": 6, "val_batches": 1, "checkpoint_every": 4, "sample_tokens": 0,
                  "fault_injection": fault},
        "data": {"max_bytes": 300_000},
        "tracking": {"experiment": "ft"},
    })


def test_killed_worker_restarts_from_the_last_checkpoint_and_ends_like_an_uninterrupted_run(ray_cluster, tmp_path):
    reference = run_training(ep_run(tmp_path, "reference"))
    cfg = ep_run(tmp_path, "faulted", fault={"kill_rank": 1, "at_step": 6})
    faulted = run_training(cfg)

    assert faulted.step == reference.step == 12
    assert faulted.train_loss == pytest.approx(reference.train_loss, abs=1e-4)
    assert faulted.val_loss == pytest.approx(reference.val_loss, abs=1e-4)

    with open(os.path.join(cfg.storage_path, cfg.name, "fault_injected.json")) as f:
        marker = json.load(f)
    assert marker["killed_after_step"] == 6 and marker["rank"] == 1

    client = MlflowClient(tracking_uri(cfg))
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
