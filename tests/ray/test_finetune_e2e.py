"""The shipped fine-tuning recipe end to end on Ray Train with MLflow: jobs/configs/finetune-demo.yaml
fine-tunes the model registered as raymoe-demo (here a demo-architecture model registered by the
test, as `make demo` would) with LoRA on the shipped instruction set, expert-parallel on 2 workers;
one worker is killed after the first adapter checkpoint and the run resumes from it; the merged
model is registered and served from MLflow."""

from __future__ import annotations

import os

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors import safe_open

from raymoe.config import load_config
from raymoe.model.lora import is_adapter
from raymoe.model.transformer import MoETransformer
from raymoe.model_dir import open_model, write_model_dir
from raymoe.ray_train import run_training
from raymoe.tracking import register_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_finetune_demo_trains_lora_survives_a_killed_worker_and_serves_the_merged_model(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the shipped config names its data relative to the repository
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    demo = load_config("jobs/configs/demo.yaml")
    base = MoETransformer(demo.model)
    base.init_weights(seed=0)
    write_model_dir(str(tmp_path / "demo-model"), demo, base.state_dict().items())
    assert register_model_dir(str(tmp_path / "demo-model"), "raymoe-demo", tracking_uri=uri, log=lambda m: None)

    cfg = load_config("jobs/configs/finetune-demo.yaml", [
        f"output_dir={tmp_path}", f"tracking.uri={uri}", "train.steps=20", "train.log_every=5", "train.val_every=10",
        "train.checkpoint_every=10", "train.sample_tokens=8", "train.fault_injection={kill_rank: 1, at_step: 13}"])
    outcome = run_training(cfg)
    assert outcome.step == 20 and outcome.recovery["steps_lost"] == 3  # killed after 13, resumed from 10

    client = MlflowClient(uri)
    history = {k: [(m.step, m.value) for m in client.get_metric_history(outcome.mlflow_run_id, k)]
               for k in ("val/loss", "params/trainable_per_rank", "data/loss_fraction", "train/loss_tokens_per_s",
                         "elastic/restarts")}
    (s0, v0), (_, v10), (_, v20) = history["val/loss"]
    assert s0 == 0 and v20 < v10 < v0  # held-out assistant tokens get likelier than under the base
    assert history["elastic/restarts"] == [(10, 1.0)]
    (_, trainable), = history["params/trainable_per_rank"]
    assert 0 < trainable < 0.2 * sum(p.numel() for p in base.parameters())
    (_, loss_fraction), = history["data/loss_fraction"]
    assert 0.2 < loss_fraction < 0.6  # answers are about 40% of the shipped chats' bytes
    assert all(v > 0 for _, v in history["train/loss_tokens_per_s"])

    # The run's checkpoints hold adapters (and selection biases), never the frozen base.
    with safe_open(os.path.join(outcome.checkpoint_path, "dense.safetensors"), "pt") as f:
        assert all(is_adapter(k) or k.endswith("expert_bias") for k in f.keys() if not k.startswith("opt/"))

    # What MLflow registered is the merged model, the same as reading the adapter checkpoint.
    assert outcome.registered_model.startswith("models:/raymoe-demo-chat/")
    logged = {a.path for a in client.list_artifacts(outcome.mlflow_run_id, "adapter")}
    assert "adapter/manifest.json" in logged and "adapter/dense.safetensors" in logged
    _, served, tok, _ = open_model(outcome.registered_model, tracking_uri=uri)
    _, merged, _, _ = open_model(outcome.checkpoint_path)
    x = torch.tensor([[int(t) for t in tok.encode("<|user|>\nWrite a function that adds two numbers.\n<|assistant|>\n")]])
    with torch.no_grad():
        torch.testing.assert_close(served(x).logits, merged(x).logits, rtol=0, atol=1e-6)
        assert (served(x).logits - base.eval()(x).logits).abs().max() > 1e-3
