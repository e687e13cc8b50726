"""MLflow tracking: one run per `raymoe train`, continued (same run id) when training resumes.

The driver opens the run and logs the resolved config; rank 0 of the worker group logs metrics
and the final artifacts into that run by id. The run id is remembered next to the Ray Train
checkpoints, so a resumed or restarted run continues the same MLflow run instead of forking.

Default store: `sqlite:///<output_dir>/mlflow.db` (MLflow 3 refuses a bare ./mlruns file store),
an absolute URI because Ray workers change directory. `tracking.uri` or $MLFLOW_TRACKING_URI
points at a server instead. An unreachable server never stops training: the tracker warns once
and turns itself into a no-op.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from typing import Any

from raymoe.config import RunConfig

# What a run logs, by artifact path (each name defined here only).
CONFIG_ARTIFACT = "config.yaml"
"""The resolved run config."""
MODEL_ARTIFACT = "model"
"""The final model as a model directory (model_dir.py): runs:/<id>/model, what registration points at."""
ADAPTER_ARTIFACT = "adapter"
"""A LoRA run's adapters, beside the merged model."""
LOAD_HISTORY = "expert_load.json"
"""Per-expert routed-token counts over training (also kept in each checkpoint; `raymoe placement` reads it)."""
LOAD_HEATMAP = "expert_load_heatmap.png"

# Fail fast on an unreachable server instead of MLflow's default minutes of retries.
_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def default_tracking_uri(uri: str | None, output_dir: str) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else the sqlite store under output_dir."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return "sqlite:///" + os.path.join(os.path.abspath(os.path.expanduser(output_dir)), "mlflow.db")


def tracking_uri(cfg: RunConfig) -> str:
    return default_tracking_uri(cfg.tracking.uri, cfg.output_dir)


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def _client(uri: str):
    for k, v in _HTTP_ENV.items():
        os.environ.setdefault(k, v)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class MlflowTracker:
    """Logs into one existing MLflow run by id. Any MLflow failure -> one warning, then no-op."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self._client = None
        self._disabled = False
        self._skip_through = -1
        self.registered: str | None = None
        """models:/<name>/<version> once the final model is registered."""

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        if self._disabled:
            return None
        try:
            if self._client is None:
                self._client = _client(self.uri)
            return fn(self._client, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never take training down
            self._disabled = True
            warnings.warn(f"MLflow at {self.uri} failed during {what} ({type(e).__name__}: {str(e)[:200]}); "
                          "training continues without tracking", stacklevel=3)
            return None

    def resume_after_last_step(self, key: str = "train/step") -> int:
        """After a restart, skip steps this run already logged (they are recomputed from the last
        checkpoint), so every metric's steps stay strictly increasing. Returns that last step."""
        history = self._call("get_metric_history", lambda c: c.get_metric_history(self.run_id, key)) or []
        self._skip_through = max((int(m.step) for m in history), default=-1)
        return self._skip_through

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        if step <= self._skip_through:
            metrics = {k: v for k, v in metrics.items() if k.startswith("elastic/")}
            if not metrics:
                return
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        self._call("log_metrics", lambda c: c.log_batch(self.run_id, metrics=batch))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        fn = (lambda c: c.log_artifacts(self.run_id, local_path, artifact_path)) if os.path.isdir(local_path) else (
            lambda c: c.log_artifact(self.run_id, local_path, artifact_path))
        self._call("log_artifact", fn)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log_text", lambda c: c.log_text(self.run_id, text, artifact_file))

    def set_tag(self, key: str, value: str) -> None:
        self._call("set_tag", lambda c: c.set_tag(self.run_id, key, value))

    def finish(self, status: str = "FINISHED") -> None:
        self._call("set_terminated", lambda c: c.set_terminated(self.run_id, status))

    @property
    def ok(self) -> bool:
        return not self._disabled


def _run_id_file(cfg: RunConfig) -> str:
    return os.path.join(cfg.storage_path, cfg.name, "mlflow_run.json")


def open_run(cfg: RunConfig, config_yaml: str, log=print) -> MlflowTracker | None:
    """Create the MLflow run for this training run, or reopen the one a previous attempt made.

    Returns None (after one warning) when the tracking store cannot be reached.
    """
    uri = tracking_uri(cfg)
    id_file = _run_id_file(cfg)
    try:
        client = _client(uri)
        run_id = None
        if os.path.exists(id_file):
            with open(id_file) as f:
                saved = json.load(f)
            if saved.get("tracking_uri") == uri:
                try:
                    info = client.get_run(saved["run_id"]).info
                    # A deleted run still answers get_run but cannot be logged to: start a new one.
                    run_id = info.run_id if info.lifecycle_stage == "active" else None
                except Exception:  # noqa: BLE001 - purged run or another store: start a new one
                    run_id = None
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            log(f"continuing MLflow run {run_id} ({uri})")
        else:
            # With a local database store MLflow would put artifacts in <cwd>/mlruns; keep them
            # beside the database instead. A server decides for itself.
            exp_id = _experiment_id(client, cfg.tracking.experiment, cfg.output_dir, uri)
            run = client.create_run(exp_id, run_name=cfg.tracking.run_name or cfg.name, tags={"raymoe.run": cfg.name, "mlflow.source.name": "raymoe train"})
            run_id = run.info.run_id
            _log_params(client, run_id, cfg)
            client.log_text(run_id, config_yaml, CONFIG_ARTIFACT)
            os.makedirs(os.path.dirname(id_file), exist_ok=True)
            with open(id_file, "w") as f:
                json.dump({"run_id": run_id, "tracking_uri": uri}, f)
            log(f"MLflow run {run_id} in experiment {cfg.tracking.experiment!r} ({uri})")
        return MlflowTracker(uri, run_id)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"MLflow tracking at {uri} is unavailable ({type(e).__name__}: {str(e)[:200]}); training continues without tracking")
        return None


def _experiment_id(client, cfg_or_name, output_dir: str | None, uri: str) -> str:
    name = cfg_or_name
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    local = uri.startswith(("sqlite:", "file:"))
    artifacts = "file://" + os.path.join(output_dir, "mlartifacts") if (local and output_dir) else None
    return client.create_experiment(name, artifact_location=artifacts)


def open_parent_run(cfg: RunConfig, log=print) -> MlflowTracker | None:
    """The MLflow run of a whole `raymoe tune` search; trials are its nested children."""
    uri = tracking_uri(cfg)
    try:
        client = _client(uri)
        exp_id = _experiment_id(client, cfg.tracking.experiment, cfg.output_dir, uri)
        run = client.create_run(exp_id, run_name=f"{cfg.name} (search)", tags={"raymoe.search": cfg.name, "mlflow.source.name": "raymoe tune"})
        _log_params(client, run.info.run_id, cfg)
        client.log_text(run.info.run_id, cfg.to_yaml(), CONFIG_ARTIFACT)
        log(f"MLflow search run {run.info.run_id} in experiment {cfg.tracking.experiment!r} ({uri})")
        return MlflowTracker(uri, run.info.run_id)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"MLflow tracking at {uri} is unavailable ({type(e).__name__}: {str(e)[:200]}); searching without tracking")
        return None


def open_child_run(uri: str, experiment: str, parent_run_id: str | None, name: str, params: dict, cfg: RunConfig | None) -> MlflowTracker | None:
    """A trial's run, nested under the search's run (MLflow's mlflow.parentRunId tag)."""
    if parent_run_id is None:
        return None
    try:
        from mlflow.entities import Param

        client = _client(uri)
        exp_id = client.get_run(parent_run_id).info.experiment_id
        run = client.create_run(exp_id, run_name=name, tags={"mlflow.parentRunId": parent_run_id, "raymoe.trial": name})
        sampled = [Param(f"trial.{k}", str(v)) for k, v in params.items()]
        client.log_batch(run.info.run_id, params=sampled)
        if cfg is not None:
            _log_params(client, run.info.run_id, cfg)
        return MlflowTracker(uri, run.info.run_id)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"MLflow child run for {name} failed ({type(e).__name__}: {str(e)[:200]}); the trial runs untracked")
        return None


def _log_params(client, run_id: str, cfg: RunConfig) -> None:
    from mlflow.entities import Param

    # The serve: section says how the model is served later, not how this run trained it.
    params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in cfg.flat().items()
              if not k.startswith("serve.")]
    for i in range(0, len(params), 100):  # MLflow caps params per batch at 100
        client.log_batch(run_id, params=params[i : i + 100])


def expert_load_heatmap(load_history: list[dict[str, Any]], out_png: str) -> bool:
    """Heatmap of each MoE layer's share of tokens per expert over the whole run (matplotlib)."""
    if not load_history:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return False
    total = np.sum([np.asarray(h["load"], dtype=np.float64) for h in load_history], axis=0)
    share = total / np.maximum(total.sum(axis=1, keepdims=True), 1)
    num_layers, num_experts = share.shape
    fig, ax = plt.subplots(figsize=(min(16, 2 + num_experts * 0.35), 1.5 + num_layers * 0.4))
    im = ax.imshow(share * num_experts, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"expert load / mean, steps {load_history[0]['step']}-{load_history[-1]['step']}")
    fig.colorbar(im, ax=ax, label="load relative to an even split")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return True


def log_final_artifacts(tracker: MlflowTracker, cfg: RunConfig, checkpoint_dir: str, weights: dict | None = None) -> None:
    """From the final checkpoint: weights (safetensors) + config under model/, load history, heatmap.

    `weights`: the checkpoint's full state dict if the caller already assembled it."""
    with tempfile.TemporaryDirectory() as d:
        if cfg.tracking.log_checkpoint:
            from raymoe.model_dir import tokenizer_dir_of, write_model_dir
            from raymoe.parallel.checkpoint import _unique, full_state_dict

            mdir = os.path.join(d, MODEL_ARTIFACT)
            # The training checkpoint is sharded by expert; what we log is the whole model, as a
            # model directory (with the tokenizer the run used, so serving it needs nothing else).
            tensors = {k: v.detach().contiguous().cpu()
                       for k, v in _unique(weights if weights is not None else full_state_dict(checkpoint_dir)).items()}
            write_model_dir(mdir, cfg, tensors.items(), tokenizer_dir=tokenizer_dir_of(cfg), staged=False)
            tracker.log_artifact(mdir, MODEL_ARTIFACT)
            if cfg.tracking.registered_model:
                register_model(tracker, cfg.tracking.registered_model)
        history_path = os.path.join(checkpoint_dir, LOAD_HISTORY)
        if os.path.exists(history_path):
            tracker.log_artifact(history_path)
            with open(history_path) as f:
                history = json.load(f)
            png = os.path.join(d, LOAD_HEATMAP)
            if expert_load_heatmap(history, png):
                tracker.log_artifact(png)


def register_model(tracker: MlflowTracker, name: str) -> str | None:
    """A new version of registered model `name` from this run's model/ artifacts; returns its URI."""

    def create(c):
        from mlflow.exceptions import MlflowException

        try:
            c.create_registered_model(name)
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                raise
        return c.create_model_version(name, source=f"runs:/{tracker.run_id}/{MODEL_ARTIFACT}", run_id=tracker.run_id).version

    version = tracker._call("register_model", create)
    if version is None:
        return None
    tracker.registered = f"models:/{name}/{version}"
    return tracker.registered


def register_model_dir(model_dir: str, name: str, *, tracking_uri: str | None = None, experiment: str = "raymoe",
                       source: str | None = None, log=print) -> str | None:
    """Log a model directory (e.g. from `raymoe import`) as one MLflow run's model/ artifacts and
    register it as a new version of `name`; returns models:/<name>/<version> (None if MLflow failed)."""
    uri = default_tracking_uri(tracking_uri, ".raymoe")  # where `raymoe train`'s default store is
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]), exist_ok=True)
    try:
        client = _client(uri)
        exp_id = _experiment_id(client, experiment, os.path.dirname(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None, uri)
        run = client.create_run(exp_id, run_name=f"import {os.path.basename(os.path.normpath(model_dir))}",
                                tags={"mlflow.source.name": "raymoe import", **({"raymoe.source": source} if source else {})})
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"MLflow at {uri} is unavailable ({type(e).__name__}: {str(e)[:200]}); the model was not registered")
        return None
    tracker = MlflowTracker(uri, run.info.run_id)
    tracker.log_artifact(model_dir, MODEL_ARTIFACT)
    registered = register_model(tracker, name)
    tracker.finish("FINISHED" if registered else "FAILED")
    return registered


def print_where_to_look(uri: str, run_id: str | None, out=sys.stdout) -> None:
    if run_id:
        print(f"MLflow run: {run_id}", file=out)
    print(f"MLflow UI:  {ui_command(uri)}", file=out)
