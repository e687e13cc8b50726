"""End to end on the session's local Ray: a 2-worker TorchTrainer run tracked in MLflow, then a
resume that continues the step count and the same MLflow run."""

from __future__ import annotations

import os

import pytest
from mlflow.tracking import MlflowClient

from raymoe.config import config_from_dict
from raymoe.ray_train import run_training
from raymoe.tracking import tracking_uri

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def small_run(output_dir, steps):
    return config_from_dict({
        "name": "e2e",
        "output_dir": str(output_dir),
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_seq_len": 64, "num_experts": 4,
                  "top_k": 2, "expert_intermediate_size": 48, "first_k_dense_layers": 0},
        "scaling": {"num_workers": 2, "max_failures": 0},
        "train": {"steps": steps, "batch_size": 4, "seq_len": 64, "lr": 3e-3, "warmup_steps": 3, "log_every": 10,
                  "val_every": 10, "val_batches": 2, "checkpoint_every": 15, "sample_tokens": 16},
        "data": {"max_bytes": 1_000_000},
        "tracking": {"experiment": "e2e"},
    })


def _artifacts(client, run_id, path=None):
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def test_two_worker_run_learns_logs_to_mlflow_and_resumes_into_the_same_run(ray_cluster, tmp_path):
    cfg = small_run(tmp_path, steps=30)
    first = run_training(cfg)
    assert first.step == 30
    assert first.checkpoint_path and os.path.isdir(first.checkpoint_path)
    assert first.sample is not None and first.sample.startswith(cfg.train.sample_prompt)

    client = MlflowClient(tracking_uri(cfg))
    run = client.get_run(first.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.num_experts"] == "4"
    assert run.data.params["scaling.num_workers"] == "2"
    val = client.get_metric_history(run.info.run_id, "val/loss")
    assert [m.step for m in val] == [10, 20, 30]
    assert val[-1].value < val[0].value - 0.3, [m.value for m in val]
    for key in ("train/loss", "train/tokens_per_s", "train/grad_norm", "moe/load_imbalance", "moe/dropped_frac"):
        assert client.get_metric_history(run.info.run_id, key), key
    artifacts = _artifacts(client, run.info.run_id)
    for name in ("config.yaml", "expert_load.json", "expert_load_heatmap.png"):
        assert name in artifacts, (name, artifacts)
    from raymoe.model_dir import open_source

    model = open_source(f"runs:/{run.info.run_id}/model", tracking_uri=tracking_uri(cfg))  # the run's MLflow model
    assert {"config.yaml", "model.safetensors"} <= set(os.listdir(model.path)) and model.cfg.model == cfg.model

    # Same name and output_dir, more steps: Ray Train resumes from the step-30 checkpoint.
    second = run_training(small_run(tmp_path, steps=45))
    assert second.mlflow_run_id == first.mlflow_run_id
    assert second.step == 45
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [10, 20, 30, 40, 45]  # continued, not restarted from 0
    restarts = client.get_metric_history(run.info.run_id, "elastic/restarts")
    assert [(m.step, m.value) for m in restarts] == [(30, 1.0)]
