"""tracking.py against a real MLflow sqlite store: one run per training run, continued on resume;
params in YAML spelling; metrics with steps; final artifacts from a checkpoint and the expert-load
heatmap; an unreachable server that warns once, buffers, and leaves a pending file that replays.
(A real `mlflow server` killed and restarted mid-run: test_tracking_outage.py.)

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
from raymoe.tracking import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MlflowTracker, expert_load_figure, expert_load_heatmap,
                             log_final_artifacts, open_child_run, open_parent_run, open_run, replay_command, replay_pending,
                             tracking_uri)

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
    # Every key but the serve: and tune: sections' (how the model is served later, how a search
    # would vary it: neither is how this run trained).
    assert set(params) == {k for k in cfg.flat() if not k.startswith(("serve.", "tune."))}
    assert "serve.mode" in cfg.flat() and "tune.metric" in cfg.flat()
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


def test_tracker_on_unreachable_server_warns_once_buffers_and_returns_at_once(tmp_path):
    tracker = MlflowTracker(DEAD, "abc", pending_path=str(tmp_path / "pending.jsonl"))
    assert tracker.ok
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match=r"MLflow at http://127\.0\.0\.1:9 unavailable since \S+ \(during log_metrics") as record:
        tracker.log_metrics({"train/loss": 1.0}, step=1)
    assert len(record) == 1
    assert not tracker.ok and tracker.pending == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one line per outage, not one per step
        for step in range(2, 200):
            tracker.log_metrics({"train/loss": 1.0 / step, "train/step": step}, step=step)
        tracker.set_tag("k", "v")
        tracker.log_text("x", "x.txt")
    assert tracker.pending == 1 + 2 * 198
    assert time.monotonic() - t0 < 5  # backing off: no request per step
    assert not os.path.exists(tmp_path / "pending.jsonl")  # nothing on disk until the run ends


def test_finish_without_server_writes_a_pending_file_that_replays_every_point(tmp_path, store, client):
    """The server is gone at the end of the run: the pending file, named in one warning, holds
    every point with its own step and timestamp, the tags, text and artifacts, and the final
    status; replaying it into the store completes the run."""
    tracker, _ = _quiet_open(_cfg(tmp_path, store))
    run_id = tracker.run_id
    tracker.log_metrics({"train/loss": 9.0}, step=0)  # sent while the store is there
    path = str(tmp_path / "ckpts" / "mlflow_pending.jsonl")
    away = MlflowTracker(DEAD, run_id, pending_path=path)  # the same run, its server gone
    artifact = tmp_path / "scratch" / "notes.txt"
    artifact.parent.mkdir()
    artifact.write_text("notes")
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="unavailable since"):
        for step in range(1, 41):
            away.log_metrics({"train/loss": 10.0 - step / 10, "train/step": step}, step=step)
            time.sleep(0.001)  # distinct timestamps
    away.set_tag("raymoe.restarts", "1")
    away.log_text("sampled text", "sample.txt")
    away.log_artifact(str(artifact))
    artifact.unlink()  # a temporary directory's file: the staged copy is what gets sent
    with pytest.warns(UserWarning) as record:
        away.finish()
    assert time.monotonic() - t0 < 10
    (line,) = [str(w.message) for w in record if "still unreachable" in str(w.message)]
    assert f"80 metric point(s) and 4 other record(s) of run {run_id} written to {path}" in line
    assert f"`{replay_command(path)}`" in line and "stays RUNNING" in line
    lines = [json.loads(x) for x in open(path)]
    assert {x["uri"] for x in lines} == {DEAD} and {x["run_id"] for x in lines} == {run_id}
    logged = {(x["step"], x["value"]): x["timestamp"] for x in lines if x["kind"] == "metric" and x["key"] == "train/loss"}
    assert client.get_run(run_id).info.status == "RUNNING"  # not FINISHED with holes

    assert replay_pending(path, uri=store) == 80
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(41))
    # Original steps, values and timestamps, not the replay's.
    assert {(m.step, m.value): m.timestamp for m in history if m.step > 0} == logged
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["raymoe.restarts"] == "1"
    assert {"sample.txt", "notes.txt"} <= {a.path for a in client.list_artifacts(run_id)}
    assert not os.path.exists(path) and not os.path.exists(tmp_path / "ckpts" / "mlflow_pending_artifacts")


def test_replay_against_an_unreachable_server_keeps_the_file_intact(tmp_path):
    path = str(tmp_path / "pending.jsonl")
    away = MlflowTracker(DEAD, "abc", pending_path=path)
    with pytest.warns(UserWarning):
        away.log_metrics({"train/loss": 1.0}, step=1)
        away.finish()
    before = open(path).read()
    with pytest.raises(Exception, match="127.0.0.1:9"):
        replay_pending(path)
    assert open(path).read() == before


def test_a_run_continued_after_an_outage_at_its_end_sends_the_old_points_but_stays_running(tmp_path, store, client):
    """The pending file of an attempt that ended during an outage is sent by the next attempt's
    tracker, except the old final status: the continued run is running again."""
    tracker, _ = _quiet_open(_cfg(tmp_path, store))
    path = str(tmp_path / "pending.jsonl")
    with pytest.warns(UserWarning):
        away = MlflowTracker(DEAD, tracker.run_id, pending_path=path)
        away.log_metrics({"train/loss": 3.0}, step=3)
        away.finish()
    again = MlflowTracker(store, tracker.run_id, pending_path=path)
    again.log_metrics({"train/loss": 2.0}, step=4)
    assert not os.path.exists(path) and again.ok
    assert [m.step for m in client.get_metric_history(tracker.run_id, "train/loss")] == [3, 4]
    assert client.get_run(tracker.run_id).info.status == "RUNNING"
    again.finish()
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_resume_after_last_step_skips_steps_the_run_has_except_elastic_ones(tmp_path, store, client):
    tracker, _ = _quiet_open(_cfg(tmp_path, store))
    for step in (10, 20):
        tracker.log_metrics({"train/step": step, "train/loss": 1.0}, step=step)
    restarted = MlflowTracker(store, tracker.run_id)
    assert restarted.resume_after_last_step() == 20
    restarted.log_metrics({"train/step": 15, "train/loss": 2.0, "elastic/restarts": 1}, step=15)  # recomputed
    restarted.log_metrics({"train/step": 25, "train/loss": 0.5}, step=25)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "train/loss")] == [10, 20, 25]
    assert [m.step for m in client.get_metric_history(tracker.run_id, "elastic/restarts")] == [15]


# ----------------------------------------------------------------------------- params, experiments


def test_params_are_spelled_as_in_yaml_with_the_resolved_expert_degree(tmp_path, store, client):
    cfg = _cfg(tmp_path, store, scaling={"num_workers": 4}, model={"num_experts": 8},
               train={"fault_injection": None}, name="spelled")
    tracker, _ = _quiet_open(cfg)
    params = client.get_run(tracker.run_id).data.params
    assert params["model.tie_embeddings"] == "false" and params["data.packing"] == "true"
    assert params["model.init_from"] == "null" and params["tracking.registered_model"] == "null"
    assert params["model.dense_layers"] == "[]" and params["lora.targets"] == "[attention, routed_experts]"
    assert params["train.betas"] == "[0.9, 0.95]" and params["scaling.cpus_per_worker"] == "1.0"
    assert not [k for k in params if k.startswith("tune.")]
    # auto at 4 workers and 8 experts: the largest common divisor the workers will use.
    assert params["parallel.expert_degree"] == "4"
    assert not {v for v in params.values() if v in ("False", "True", "None")}


def test_an_elastic_run_logs_auto_and_the_degree_at_its_minimum_size(tmp_path, store, client):
    cfg = _cfg(tmp_path, store, scaling={"num_workers": [2, 4]}, name="elastic")
    tracker, _ = _quiet_open(cfg)
    params = client.get_run(tracker.run_id).data.params
    assert params["scaling.num_workers"] == "[2, 4]"
    assert params["parallel.expert_degree"] == "auto" and params["parallel.expert_degree_at_min_workers"] == "2"


def test_search_run_keeps_tune_params_and_trial_runs_log_their_sampled_values(tmp_path, store, client):
    cfg = _cfg(tmp_path, store, name="search", tune={"space": {"train.lr": {"loguniform": [1e-5, 1e-2]},
                                                                "model.shared_expert_gate": {"choice": [True, False]}}})
    parent = open_parent_run(cfg, log=lambda *_: None)
    params = client.get_run(parent.run_id).data.params
    assert params["tune.space.train.lr.loguniform"] == "[1.0e-05, 0.01]" and params["tune.metric"] == "val/loss"
    child = open_child_run(store, "exp", parent.run_id, "search-1", {"train.lr": 1e-5, "model.shared_expert_gate": True}, cfg)
    child_params = client.get_run(child.run_id).data.params
    assert child_params["trial.train.lr"] == "1.0e-05" and child_params["trial.model.shared_expert_gate"] == "true"
    assert child_params["model.num_experts"] == "8" and not [k for k in child_params if k.startswith("tune.")]
    assert child.pending_path == os.path.join(cfg.storage_path, "search", "mlflow_pending.jsonl")


def test_experiments_are_tagged_as_model_development_for_the_mlflow_3_ui(tmp_path, store, client):
    _quiet_open(_cfg(tmp_path, store, tracking={"experiment": "kind-new"}))
    assert client.get_experiment_by_name("kind-new").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    # An experiment made elsewhere without the tag gets it; one whose kind someone chose keeps it.
    client.create_experiment("kind-old")
    client.create_experiment("kind-genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    _quiet_open(_cfg(tmp_path, store, tracking={"experiment": "kind-old"}, name="old"))
    _quiet_open(_cfg(tmp_path, store, tracking={"experiment": "kind-genai"}, name="genai"))
    assert client.get_experiment_by_name("kind-old").tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment_by_name("kind-genai").tags[EXPERIMENT_KIND_TAG] == "genai_development"


# ----------------------------------------------------------------------------- artifacts


def test_expert_load_heatmap_writes_a_png_of_layers_by_experts(tmp_path):
    import matplotlib.image

    png = tmp_path / "heat.png"
    assert expert_load_heatmap(HISTORY, str(png)) is True
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(png))
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def _uniform_history(num_layers: int, num_experts: int) -> list[dict]:
    return [{"step": 5, "load": [[layer * num_experts + e for e in range(num_experts)] for layer in range(num_layers)]}]


def _ticks(labels) -> list[str]:
    return [t.get_text() for t in labels]


def test_expert_load_heatmap_labels_every_layer_and_expert_with_integers():
    import matplotlib.pyplot as plt

    small = expert_load_figure(_uniform_history(2, 8))
    ax = small.axes[0]
    assert _ticks(ax.get_yticklabels()) == ["0", "1"]
    assert list(ax.get_yticks()) == [0, 1]
    assert _ticks(ax.get_xticklabels()) == [str(e) for e in range(8)]
    big = expert_load_figure(_uniform_history(4, 64))
    ax = big.axes[0]
    assert _ticks(ax.get_yticklabels()) == ["0", "1", "2", "3"]
    assert _ticks(ax.get_xticklabels()) == [str(e) for e in range(64)]
    # Grows with the experts and layers, so 64 labels fit (~0.2 in each).
    (w_small, h_small), (w_big, h_big) = small.get_size_inches(), big.get_size_inches()
    assert w_big > w_small and h_big >= h_small and w_big >= 64 * 0.2
    huge = expert_load_figure(_uniform_history(4, 256))
    assert _ticks(huge.axes[0].get_xticklabels()) == [str(e) for e in range(0, 256, 4)]
    for fig in (small, big, huge):
        plt.close(fig)


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
    assert top == {"config.yaml": False, "expert_load.json": False, "expert_load_heatmap.png": False}
    # The model is the run's MLflow model (a logged model, mlflow_model.py) around the model directory.
    from raymoe.model_dir import open_source, resolve_local

    env = os.environ.get("MLFLOW_TRACKING_URI")
    root = resolve_local(f"runs:/{tracker.run_id}/model", tracking_uri=store)
    assert os.path.isfile(os.path.join(root, "MLmodel"))
    assert os.environ.get("MLFLOW_TRACKING_URI") == env  # the download left no tracking URI behind for later runs
    src = open_source(f"runs:/{tracker.run_id}/model", tracking_uri=store)
    assert sorted(os.listdir(src.path)) == ["config.yaml", "model.safetensors"]

    dl = tmp_path / "dl"
    # The whole single-device model: dense tensors and every expert of every layer, no optimizer state.
    logged = load_file(os.path.join(src.path, "model.safetensors"))
    expected = model.state_dict()
    assert logged.keys() == expected.keys()
    for k in expected:
        assert torch.equal(logged[k], expected[k]), k
    assert logged["layers.0.ffn.experts.w13"].shape[0] == 4
    assert load_config(os.path.join(src.path, "config.yaml")) == cfg
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
