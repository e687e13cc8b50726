"""Shared fixtures. pytest puts platform/ on sys.path (pyproject.toml); the Ray cluster is one
per session and only started by tests that ask for it."""

from __future__ import annotations

import os

import pytest

# Ray Train's controller polls its workers every 2 s and starts a preemption-watcher actor per run;
# on two cores that waiting was a fifth of every end-to-end training test. Polling every 0.5 s
# changes no behaviour under test (the workers' health-check timeout stays 10 minutes).
# Set before any Ray process starts, so the local cluster and the subprocess clusters inherit them.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")  # serving metrics reach the endpoint in seconds, not 10
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (2 CPUs, as on the CI machine). Stops only what it started."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
        started = True
    yield ray
    if started:
        ray.shutdown()
