"""tracking.py against a real MLflow sqlite store: one run per training run, continued on resume;
metrics with steps; final artifacts from a checkpoint; and an unreachable server that only warns.

    .venv/bin/python -m pytest tests/unit/test_tracking.py -q
"""

from __future__ import annotations

import json
import os
import time
import warnings

import pytest
import torch
import yaml
from safetensors.torch import load_file

from raymoe.config import config_from_dict, load_config
from raymoe.tracking import MlflowTracker, expert_load_heatmap, log_final_artifacts, open_run, tracking_uri

DEAD = "http://127.0.0.1:9"  # the discard port: connection refused at once
HISTORY = [
    {"step": 10, "load": [[10, 20, 30, 40], [25, 25, 25, 25]]},
    {"step": 20, "load": [[40, 30, 20, 10], [0, 50, 50, 0]]},
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating its tables takes seconds). Artifacts of experiments
    created with the default location land in the cwd's mlruns/, so the cwd is a temp dir."""
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        # tracking._client sets these with setdefault; restore the environment afterwards.
        for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
            mp.delenv(k, raising=False)
        yield "sqlite:///" + str(root / "mlflow.db")


@pytest.fixture
def client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store)


def _cfg(tmp_path, store, **extra):
    tracking = {"experiment": "exp", "uri": store, **extra.pop("tracking", {})}
    return config_from_dict({"name": "t", "output_dir": str(tmp_path), "tracking": tracking, **extra})


def _quiet_open(cfg):
    lines = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tracker = open_run(cfg, cfg.to_yaml(), log=lines.append)
    ours = [str(w.message) for w in record if "MLflow" in str(w.message)]
    assert not ours, ours  # a working store must not warn
    return tracker, lines


# ----------------------------------------------------------------------------- open_run


def test_default_tracking_uri_is_an_absolute_sqlite_file_under_output_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config_from_dict({"output_dir": str(tmp_path)})
    assert tracking_uri(cfg) == "sqlite:///" + str(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert tracking_uri(cfg) == "http://example:5000"
    assert tracking_uri(config_from_dict({"tracking": {"uri": "sqlite:////x.db"}})) == "sqlite:////x.db"


def test_open_run_creates_a_run_with_params_tags_and_config_artifact(tmp_path, store, client):
    cfg = _cfg(tmp_path, store)
    tracker, lines = _quiet_open(cfg)
    assert isinstance(tracker, MlflowTracker) and tracker.ok
    run = client.get_run(tracker.run_id)
    assert run.info.status == "RUNNING"
    assert run.info.run_name == "t"
    assert client.get_experiment(run.info.experiment_id).name == "exp"
    params = run.data.params
    assert params["model.num_experts"] == "8"
    assert params["model.balance.bias_update_rate"] == "0.001"
    assert params["train.betas"] == "[0.9, 0.95]"
    assert params["name"] == "t"
    # Every key but the serve: section's (how the model is served later, not how it trained).
    assert set(params) == {k for k in cfg.flat() if not k.startswith("serve.")} and "serve.mode" in cfg.flat()
    assert run.data.tags["raymoe.run"] == "t"
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["config.yaml"]
    text = open(client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path / "dl"))).read()
    assert text == cfg.to_yaml()
    assert lines == [f"MLflow run {tracker.run_id} in experiment 'exp' ({store})"]
    saved = json.load(open(os.path.join(cfg.storage_path, "t", "mlflow_run.json")))
    assert saved == {"run_id": tracker.run_id, "tracking_uri": store}


def test_opening_the_same_run_again_continues_the_same_mlflow_run(tmp_path, store, client):
    cfg = _cfg(tmp_path, store)
    first, _ = _quiet_open(cfg)
    first.finish()
    assert client.get_run(first.run_id).info.status == "FINISHED"
    again, lines = _quiet_open(cfg)
    assert again.run_id == first.run_id
    assert lines == [f"continuing MLflow run {first.run_id} ({store})"]
    assert client.get_run(first.run_id).info.status == "RUNNING"
    # Still one run with this name in the experiment, and config.yaml logged once.
    exp = client.get_experiment_by_name("exp")
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_id = '{first.run_id}'")
    assert len(runs) == 1
    assert [a.path for a in client.list_artifacts(first.run_id)] == ["config.yaml"]


def test_another_run_name_gets_another_mlflow_run(tmp_path, store):
    a, _ = _quiet_open(_cfg(tmp_path, store))
    b, _ = _quiet_open(_cfg(tmp_path, store, name="other"))
    assert a.run_id != b.run_id


def test_run_name_from_tracking_section_overrides_the_config_name(tmp_path, store, client):
    tracker, _ = _quiet_open(_cfg(tmp_path, store, tracking={"run_name": "pretty"}))
    assert client.get_run(tracker.run_id).info.run_name == "pretty"


def test_a_deleted_mlflow_run_is_replaced_by_a_new_one(tmp_path, store, client):
    cfg = _cfg(tmp_path, store)
    first, _ = _quiet_open(cfg)
    client.delete_run(first.run_id)
    again, _ = _quiet_open(cfg)
    assert again is not None and again.run_id != first.run_id


def test_default_store_keeps_artifacts_under_output_dir(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config_from_dict({"name": "t", "output_dir": str(out), "tracking": {"experiment": "own-store"}})
    tracker, _ = _quiet_open(cfg)
    artifact_uri = MlflowClient(tracking_uri(cfg)).get_run(tracker.run_id).info.artifact_uri
    assert str(out) in artifact_uri, artifact_uri


# ----------------------------------------------------------------------------- MlflowTracker


def test_log_metrics_records_values_at_their_steps(tmp_path, store, client):
    tracker, _ = _quiet_open(_cfg(tmp_path, store))
    for step, loss in [(0, 5.5), (10, 4.25), (20, 3.0)]:
        tracker.log_metrics({"train/loss": loss, "moe/load_imbalance": step / 10}, step=step)
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 5.5), (10, 4.25), (20, 3.0)]
    imbalance = client.get_metric_history(tracker.run_id, "moe/load_imbalance")
    assert sorted((m.step, m.value) for m in imbalance) == [(0, 0.0), (10, 1.0), (20, 2.0)]
    assert tracker.ok


def test_set_tag_and_log_text_reach_the_run(tmp_path, store, client):
    tracker, _ = _quiet_open(_cfg(tmp_path, store))
    tracker.set_tag("raymoe.restarts", "2")
    tracker.log_text("hello", "sample.txt")
    assert client.get_run(tracker.run_id).data.tags["raymoe.restarts"] == "2"
    assert "sample.txt" in [a.path for a in client.list_artifacts(tracker.run_id)]


def test_unreachable_server_makes_open_run_warn_and_return_none(tmp_path):
    cfg = config_from_dict({"name": "t", "output_dir": str(tmp_path), "tracking": {"uri": DEAD, "experiment": "exp"}})
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match=r"MLflow tracking at http://127\.0\.0\.1:9 is unavailable"):
        tracker = open_run(cfg, cfg.to_yaml(), log=lambda *_: None)
    assert tracker is None
    assert time.monotonic() - t0 < 30
    assert not os.path.exists(os.path.join(cfg.storage_path, "t", "mlflow_run.json"))


def test_tracker_on_unreachable_server_warns_once_then_is_a_no_op():
    tracker = MlflowTracker(DEAD, "abc")
    assert tracker.ok
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match=r"MLflow at http://127\.0\.0\.1:9 failed during log_metrics") as record:
        tracker.log_metrics({"train/loss": 1.0}, step=1)
    assert len(record) == 1
    assert not tracker.ok
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any further warning fails the test
        tracker.log_metrics({"train/loss": 0.5}, step=2)
        tracker.set_tag("k", "v")
        tracker.log_text("x", "x.txt")
        tracker.finish()
    assert not tracker.ok
    assert time.monotonic() - t0 < 30


# ----------------------------------------------------------------------------- artifacts


def test_expert_load_heatmap_writes_a_png_of_layers_by_experts(tmp_path):
    import matplotlib.image

    png = tmp_path / "heat.png"
    assert expert_load_heatmap(HISTORY, str(png)) is True
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(png))
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def test_expert_load_heatmap_of_no_history_writes_nothing(tmp_path):
    png = tmp_path / "heat.png"
    assert expert_load_heatmap([], str(png)) is False
    assert not png.exists()


def _checkpoint(path: str):
    """A sharded checkpoint of a tiny model after one AdamW step; returns the model."""
    from raymoe.model.transformer import MoETransformer
    from raymoe.parallel.apply import parallelize
    from raymoe.parallel.checkpoint import TrainerState, save_checkpoint
    from raymoe.parallel.mesh import build_mesh
    from raymoe.train.loop import build_optimizer

    cfg = config_from_dict({"model": {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "num_experts": 4,
                                      "expert_intermediate_size": 8, "dense_intermediate_size": 16}})
    model = MoETransformer(cfg.model)
    model.init_weights(seed=0)
    plan = parallelize(model, build_mesh(1, 0, 1, cfg.model.num_experts))
    opt = build_optimizer(plan.dense + plan.experts, cfg.train, torch.device("cpu"))
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model(tokens)
    (out.logits.float().square().mean() + out.aux_loss).backward()
    opt.step()
    save_checkpoint(path, model, opt, plan, TrainerState(step=20, model_hash=cfg.model_hash()),
                    records={"expert_load.json": HISTORY})
    return model


def test_log_final_artifacts_logs_weights_config_load_history_and_heatmap(tmp_path, store, client):
    ckpt = str(tmp_path / "ckpt")
    model = _checkpoint(ckpt)
    cfg = _cfg(tmp_path / "run", store)
    tracker, _ = _quiet_open(cfg)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        log_final_artifacts(tracker, cfg, ckpt)
    assert not [str(w.message) for w in record if "MLflow" in str(w.message)]
    assert tracker.ok
    top = {a.path: a.is_dir for a in client.list_artifacts(tracker.run_id)}
    assert top == {"config.yaml": False, "expert_load.json": False, "expert_load_heatmap.png": False, "model": True}
    assert sorted(a.path for a in client.list_artifacts(tracker.run_id, "model")) == [
        "model/config.yaml", "model/model.safetensors"]

    dl = tmp_path / "dl"
    weights = client.download_artifacts(tracker.run_id, "model/model.safetensors", str(dl))
    # The whole single-device model: dense tensors and every expert of every layer, no optimizer state.
    logged = load_file(weights)
    expected = model.state_dict()
    assert logged.keys() == expected.keys()
    for k in expected:
        assert torch.equal(logged[k], expected[k]), k
    assert logged["layers.0.ffn.experts.w1"].shape[0] == 4
    logged_cfg = client.download_artifacts(tracker.run_id, "model/config.yaml", str(dl))
    assert load_config(logged_cfg) == cfg
    history = client.download_artifacts(tracker.run_id, "expert_load.json", str(dl))
    assert json.load(open(history)) == HISTORY
    png = client.download_artifacts(tracker.run_id, "expert_load_heatmap.png", str(dl))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_log_final_artifacts_without_checkpoint_logging_skips_the_weights(tmp_path, store, client):
    ckpt = str(tmp_path / "ckpt")
    _checkpoint(ckpt)
    cfg = _cfg(tmp_path / "run", store, tracking={"log_checkpoint": False})
    tracker, _ = _quiet_open(cfg)
    log_final_artifacts(tracker, cfg, ckpt)
    paths = sorted(a.path for a in client.list_artifacts(tracker.run_id))
    assert paths == ["config.yaml", "expert_load.json", "expert_load_heatmap.png"]
    logged = client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path / "dl"))
    assert yaml.safe_load(open(logged).read())["name"] == "t"
