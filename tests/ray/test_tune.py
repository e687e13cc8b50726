"""A small ASHA search on the session's local Ray: trials are real training runs, invalid
combinations are reported (not crashes), MLflow holds a parent run with nested trial runs, and
best.yaml trains as it is."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from raymoe.config import config_from_dict, load_config
from raymoe.tracking import tracking_uri

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def search_cfg(tmp_path):
    return config_from_dict({
        "name": "search",
        "output_dir": str(tmp_path),
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_seq_len": 64, "num_experts": 4,
                  "top_k": 2, "expert_intermediate_size": 32, "first_k_dense_layers": 0},
        "scaling": {"num_workers": 1},
        "train": {"steps": 16, "batch_size": 4, "seq_len": 32, "warmup_steps": 2, "log_every": 4, "val_every": 4,
                  "val_batches": 1, "checkpoint_every": 8, "sample_tokens": 0},
        "data": {"max_bytes": 300_000},
        "tracking": {"experiment": "search"},
        "tune": {"space": {"train.lr": {"grid": [1e-5, 1e-2]}, "model.top_k": {"grid": [2, 8]}},
                 "num_samples": 1, "grace_period": 4, "reduction_factor": 2, "max_concurrent_trials": 2},
    })


def test_asha_search_reports_invalid_trials_logs_nested_runs_and_writes_a_trainable_best_yaml(ray_cluster, tmp_path):
    from raymoe.tune import run_search

    cfg = search_cfg(tmp_path)
    out = run_search(cfg)
    # 2 learning rates x top_k {2, 8}: top_k 8 > num_experts 4 is invalid twice.
    assert out.trials == 4 and out.invalid == 2
    assert out.best_params["model.top_k"] == 2 and out.best_params["train.lr"] == 1e-2
    assert 0 < out.steps_run < out.steps_budgeted  # ASHA stopped something (invalid trials ran 0 steps)

    import pandas as pd

    df = pd.read_csv(out.table_csv)
    valid = df[df["tune/invalid"].fillna(0) == 0]
    assert valid["val/loss"].min() == pytest.approx(out.best_metric)
    assert valid["val/loss"].min() < valid["val/loss"].max()  # best beats worst (lr 1e-5 barely moves)

    client = MlflowClient(tracking_uri(cfg))
    parent = client.get_run(out.parent_run_id)
    assert parent.data.metrics["best/val/loss"] == pytest.approx(out.best_metric)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{out.parent_run_id}'")
    assert len(children) == 4
    assert sum("raymoe.invalid" in c.data.tags for c in children) == 2
    trained = [c for c in children if "raymoe.invalid" not in c.data.tags]
    assert all(client.get_metric_history(c.info.run_id, "train/loss") for c in trained)
    artifacts = {a.path for a in client.list_artifacts(out.parent_run_id)}
    assert {"best.yaml", "results.csv", "metric_vs_params.png"} <= artifacts

    best = load_config(out.best_yaml, ["train.steps=4", "train.log_every=2"])
    assert best.model.top_k == 2 and best.train.lr == out.best_params["train.lr"] and not best.tune.space
    # best.yaml is a complete config: it trains as it is (the loop in this process; a Ray Train fit
    # of the same config is what every trial above was).
    import torch

    from raymoe.train.data import prepare_corpus
    from raymoe.train.loop import DistInfo, NullTracker, train

    corpus = prepare_corpus(best.data, best.data_cache_dir, best.train.seq_len)

    class Steps:
        def report(self, metrics, checkpoint_dir):
            self.last = metrics["train/step"]

    reporter = Steps()
    result = train(best, corpus_dir=corpus.dir, reporter=reporter, tracker=NullTracker(), info=DistInfo(0, 1, torch.device("cpu")))
    assert result.step == 4 and reporter.last == 4
