"""Shared fixtures. pytest puts platform/ on sys.path (pyproject.toml); the Ray cluster is one
per session and only started by tests that ask for it."""

from __future__ import annotations


import pytest


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
