"""`raymoe tune`: search MoE hyperparameters with Ray Tune; every trial is a real training run.

    raymoe tune jobs/configs/tune-demo.yaml          # writes <output_dir>/tune/<name>/best.yaml

The `tune:` section names a search space over any config key by dotted path. Each trial applies
its sampled values to the config, validates it (an impossible combination, say top_k >
num_experts, is reported as an invalid trial with the worst metric, not a crash), and runs the
same `run_training` as `raymoe train` (a TorchTrainer, possibly multi-worker and expert
parallel) with Tune's report callback, so the trial reports `val/loss` every `train.log_every`
steps and ASHA can stop it at a rung. Trials are named by Tune's trial id, and their Ray Train
checkpoints live under the search's directory, so `raymoe tune --resume` (Tuner.restore) continues
an interrupted search and resumes unfinished trials from their last checkpoint.

MLflow: one parent run for the search, a nested child run per trial (sampled params, full
config, metric curves); the parent gets the best trial's params and metric, the results table
(CSV), a plot of the metric against the most influential hyperparameters, and best.yaml.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from raymoe.config import ConfigError, RunConfig, config_from_dict

INVALID = "tune/invalid"


def search_space(space: dict[str, dict]) -> dict[str, Any]:
    """tune: space -> Ray Tune domains, keyed by the dotted config path."""
    from ray import tune

    out = {}
    for key, spec in space.items():
        kind, values = next(iter(spec.items()))
        if kind == "choice":
            out[key] = tune.choice(values)
        elif kind == "grid":
            out[key] = tune.grid_search(values)
        elif kind == "uniform":
            out[key] = tune.uniform(*values)
        elif kind == "loguniform":
            out[key] = tune.loguniform(*values)
        elif kind == "randint":
            out[key] = tune.randint(int(values[0]), int(values[1]))
    return out


def apply_params(base: dict, params: dict[str, Any], source: str) -> RunConfig:
    """The base config with each dotted key set to the trial's value, validated."""
    tree = json.loads(json.dumps(base))
    for key, value in params.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value.item() if hasattr(value, "item") else value
    return config_from_dict(tree, source=source)


def _trial(params: dict[str, Any], *, base: dict, parent_run_id: str | None, tracking_uri: str, experiment: str) -> None:
    """One Tune trial: validate, open a child MLflow run, train with Tune's report forwarding."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raymoe.ray_train import run_training
    from raymoe.tracking import open_child_run

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    metric = base.get("tune", {}).get("metric", "val/loss")
    mode = base.get("tune", {}).get("mode", "min")
    try:
        cfg = apply_params(base, params, source=f"trial {ctx.get_trial_name()}")
    except ConfigError as e:
        child = open_child_run(tracking_uri, experiment, parent_run_id, f"{base.get('name', 'tune')}-{trial_id}", params, None)
        if child is not None:
            child.set_tag("raymoe.invalid", str(e))
            child.finish("FAILED")
        # The worst possible value: a scheduler treats it as a finished, hopeless trial.
        tune.report({metric: math.inf if mode == "min" else -math.inf, "train/step": 0, INVALID: 1.0})
        return
    cfg = dataclasses.replace(cfg, name=f"{cfg.name}-{trial_id}")
    child = open_child_run(tracking_uri, experiment, parent_run_id, cfg.name, params, cfg)
    run_training(cfg, tracker=child, callbacks=[TuneReportCallback()], finalize=False, log=lambda msg: None)
    if child is not None:
        child.finish("FINISHED")


@dataclass
class SearchOutcome:
    best_params: dict[str, Any]
    best_metric: float
    best_yaml: str
    trials: int
    invalid: int
    steps_run: int
    steps_budgeted: int
    parent_run_id: str | None
    table_csv: str


def _influence(df, params: list[str], metric: str, log_scale: set[str]) -> list[tuple[str, float]]:
    """|Spearman correlation| of each parameter with the metric over the valid trials."""
    out = []
    for p in params:
        col = f"config/{p}"
        if col not in df or df[col].nunique() < 2:
            out.append((p, 0.0))
            continue
        x = df[col].astype(float)
        if p in log_scale:
            x = x.map(math.log)
        rho = x.rank().corr(df[metric].rank())
        out.append((p, 0.0 if rho != rho else abs(float(rho))))
    return sorted(out, key=lambda t: -t[1])


def _plot(df, ranked: list[tuple[str, float]], metric: str, path: str, log_scale: set[str]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    top = [p for p, _ in ranked[:3]] or []
    if not top:
        return False
    fig, axes = plt.subplots(1, len(top), figsize=(4.5 * len(top), 3.6), squeeze=False)
    for ax, p in zip(axes[0], top):
        ax.scatter(df[f"config/{p}"].astype(float), df[metric], s=28)
        if p in log_scale:
            ax.set_xscale("log")
        ax.set_xlabel(p)
        ax.set_ylabel(metric)
        ax.set_title(f"|rank corr| {dict(ranked)[p]:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run_search(cfg: RunConfig, *, address: str | None = None, resume: bool = False, log=print) -> SearchOutcome:
    """Run the `tune:` section of `cfg` (a local Ray unless one is running or an address is given)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from raymoe.ray_train import _ensure_ray
    from raymoe.tracking import open_parent_run, tracking_uri
    from raymoe.train.data import prepare_run_data

    tc = cfg.tune
    if not tc.space:
        raise ConfigError("tune.space is empty: name at least one key to search, e.g. train.lr: {loguniform: [1e-4, 3e-3]}")
    t0 = time.perf_counter()
    # Once, before trials race for it.
    prepare_run_data(cfg, log=log)
    uri = tracking_uri(cfg)
    parent = open_parent_run(cfg, log=log)
    _ensure_ray(address, log)

    search_dir = os.path.join(cfg.output_dir, "tune")
    base = cfg.to_dict()
    # Trials store their Ray Train runs under the search's own directory, and share one corpus.
    base["output_dir"] = os.path.join(search_dir, cfg.name)
    base["data"]["cache_dir"] = cfg.data_cache_dir
    trainable = tune.with_parameters(
        _trial, base=base, parent_run_id=parent.run_id if parent else None, tracking_uri=uri, experiment=cfg.tracking.experiment
    )
    # The trial itself only orchestrates: its Ray Train workers hold the CPUs and GPUs.
    trainable = tune.with_resources(trainable, {"CPU": 0.01})

    if tc.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="train/step", max_t=cfg.train.steps, grace_period=tc.grace_period,
                                  reduction_factor=tc.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    search_alg = None
    if tc.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise ConfigError("tune.search=optuna needs optuna: pip install -e '.[optuna]' (or pip install optuna)") from None
        search_alg = OptunaSearch(seed=tc.seed)
    elif tc.seed is not None:
        import random

        import numpy as np

        random.seed(tc.seed)
        np.random.seed(tc.seed)

    path = os.path.join(search_dir, cfg.name)
    run_config = tune.RunConfig(name=cfg.name, storage_path=search_dir, verbose=1)
    tune_config = tune.TuneConfig(metric=tc.metric, mode=tc.mode, num_samples=tc.num_samples, scheduler=scheduler,
                                  search_alg=search_alg, max_concurrent_trials=tc.max_concurrent_trials)
    if resume and tune.Tuner.can_restore(path):
        log(f"resuming the search in {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=search_space(tc.space), tune_config=tune_config, run_config=run_config)
    log(f"search {cfg.name!r}: {tc.num_samples} trial(s) over {', '.join(tc.space)}; {tc.scheduler} on {tc.metric} ({tc.mode}), "
        f"{tc.max_concurrent_trials} at a time")
    results = tuner.fit()

    df = results.get_dataframe()
    invalid = int(df[INVALID].fillna(0).sum()) if INVALID in df else 0
    valid = df[df[INVALID].fillna(0) == 0] if INVALID in df else df
    if valid.empty:
        raise ConfigError(f"every trial of the search was invalid ({invalid}); narrow tune.space")
    best = results.get_best_result(metric=tc.metric, mode=tc.mode, scope="last")
    best_params = {k: best.config[k] for k in tc.space}
    best_cfg = apply_params(cfg.to_dict(), best_params, source="best trial")
    best_cfg = dataclasses.replace(best_cfg, name=f"{cfg.name}-best", tune=type(cfg.tune)())
    os.makedirs(path, exist_ok=True)
    best_yaml = os.path.join(path, "best.yaml")
    with open(best_yaml, "w") as f:
        f.write(f"# Best trial of search {cfg.name!r}: {tc.metric} = {best.metrics[tc.metric]:.4f}\n")
        f.write("# " + ", ".join(f"{k}={v}" for k, v in best_params.items()) + "\n")
        f.write(best_cfg.to_yaml())

    steps_run = int(df["train/step"].fillna(0).sum())
    steps_budgeted = len(df) * cfg.train.steps
    table = os.path.join(path, "results.csv")
    cols = [c for c in df.columns if c.startswith("config/") or c in (tc.metric, "train/step", "train/loss", INVALID, "trial_id")]
    df[cols].to_csv(table, index=False)
    log_scale = {k for k, spec in tc.space.items() if "loguniform" in spec}
    if parent:
        parent.log_metrics({f"best/{tc.metric}": float(best.metrics[tc.metric]), "tune/trials": len(df), "tune/invalid": invalid,
                            "tune/steps_run": steps_run, "tune/steps_budgeted": steps_budgeted,
                            "tune/compute_fraction": steps_run / max(steps_budgeted, 1)}, step=0)
        for k, v in best_params.items():
            parent.set_tag(f"best.{k}", str(v))
        parent.log_artifact(best_yaml)
        parent.log_artifact(table)
        ranked = _influence(valid, list(tc.space), tc.metric, log_scale)
        png = os.path.join(path, "metric_vs_params.png")
        if _plot(valid, ranked, tc.metric, png, log_scale):
            parent.log_artifact(png)
        parent.finish("FINISHED")
    log(f"{len(df)} trials in {time.perf_counter() - t0:.0f}s ({invalid} invalid); best {tc.metric} "
        f"{best.metrics[tc.metric]:.4f} with " + ", ".join(f"{k}={v}" for k, v in best_params.items()))
    log(f"compute: {steps_run} trial-steps run of {steps_budgeted} budgeted ({steps_run / max(steps_budgeted, 1):.0%})")
    return SearchOutcome(best_params, float(best.metrics[tc.metric]), best_yaml, len(df), invalid, steps_run, steps_budgeted,
                         parent.run_id if parent else None, table)
