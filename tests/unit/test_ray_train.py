"""ray_train.py's driver-side decisions, without starting Ray: whether the cluster can hold the
worker group (and the one line when it cannot), which worker errors end a run instead of being
retried, how fault injection's kill is announced, and the end-of-run restart list read back
from a hand-written restarts.jsonl.

    .venv/bin/python -m pytest tests/unit/test_ray_train.py -q
"""

from __future__ import annotations

import json
import logging
import pickle
import time

import pytest
from ray.exceptions import ActorDiedError
from ray.train import ControllerError, WorkerGroupError

from raymoe.config import ConfigError, config_from_dict
from raymoe.parallel.checkpoint import BaseModelChanged, CheckpointError
from raymoe.ray_train import (
    EndRunOnUserError,
    NotRetried,
    _user_error,
    check_cluster_fits,
    ensure_cluster_fits,
    format_restarts,
    read_restarts_since,
)
from raymoe.train.data import DataError


def _cfg(**scaling):
    return config_from_dict({"scaling": scaling})


# ----------------------------------------------------------------------------- resources


def test_more_workers_than_cpus_on_a_fixed_cluster_is_one_config_error_naming_the_keys():
    with pytest.raises(ConfigError) as info:
        check_cluster_fits(_cfg(num_workers=8), [{"CPU": 2.0}], autoscales=False)
    assert str(info.value) == ("scaling.num_workers=8 x scaling.cpus_per_worker=1.0 needs 8 CPUs; this Ray cluster has 2 "
                               "and does not autoscale: lower scaling.num_workers or add nodes")


def test_an_elastic_range_is_checked_at_its_minimum():
    assert check_cluster_fits(_cfg(num_workers=[2, 8]), [{"CPU": 2.0}], autoscales=False) is None
    with pytest.raises(ConfigError, match=r"^scaling.num_workers=\[3, 8\] \(at least 3\) x scaling.cpus_per_worker=1.0 "
                                          r"needs 3 CPUs; this Ray cluster has 2 and does not autoscale"):
        check_cluster_fits(_cfg(num_workers=[3, 8]), [{"CPU": 2.0}], autoscales=False)


def test_gpu_workers_need_one_gpu_each():
    with pytest.raises(ConfigError) as info:
        check_cluster_fits(_cfg(num_workers=2, use_gpu=True), [{"CPU": 16.0, "GPU": 1.0}], autoscales=False)
    assert str(info.value) == ("scaling.num_workers=2 with scaling.use_gpu=true needs 2 GPUs; this Ray cluster has 1 and "
                               "does not autoscale: lower scaling.num_workers, add GPU nodes or set scaling.use_gpu=false")
    assert check_cluster_fits(_cfg(num_workers=2, use_gpu=True), [{"CPU": 2.0, "GPU": 1.0}] * 2, autoscales=False) is None


def test_workers_are_packed_whole_onto_nodes():
    # 4 CPUs in total, but no 2-CPU node can take a 3-CPU worker.
    with pytest.raises(ConfigError) as info:
        check_cluster_fits(_cfg(num_workers=1, cpus_per_worker=3.0), [{"CPU": 2.0}, {"CPU": 2.0}], autoscales=False)
    assert str(info.value) == ("scaling.num_workers=1 x scaling.cpus_per_worker=3.0 needs room for 1 whole worker; this Ray "
                               "cluster fits 0 on its nodes (2, 2 CPUs) and does not autoscale: lower scaling.cpus_per_worker or "
                               "scaling.num_workers, or add larger nodes")
    assert check_cluster_fits(_cfg(num_workers=4, cpus_per_worker=0.5), [{"CPU": 1.0}, {"CPU": 1.0}], autoscales=False) is None


def test_an_autoscaling_cluster_gets_the_request_and_a_bounded_wait():
    sizes = iter([[{"CPU": 2.0}], [{"CPU": 2.0}], [{"CPU": 2.0}, {"CPU": 8.0}]])
    requests, lines = [], []
    ensure_cluster_fits(_cfg(num_workers=8), lines.append, nodes_fn=lambda: (next(sizes), True),
                        request_fn=lambda bundles: requests.append(bundles), wait_s=60, poll_s=0)
    assert requests == [[{"CPU": 1.0}] * 8, []]  # asked for the bundles, then withdrawn
    assert lines[0] == ("waiting up to 60s for the autoscaler: scaling.num_workers=8 x scaling.cpus_per_worker=1.0 "
                        "needs 8 CPUs; this Ray cluster has 2")
    assert lines[1].startswith("the cluster grew to hold the worker group in ")


def test_an_autoscaler_that_never_adds_the_nodes_ends_in_a_config_error_after_the_bound():
    requests = []
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"needs 8 CPUs; this Ray cluster has 2, still after waiting 0s for the autoscaler"):
        ensure_cluster_fits(_cfg(num_workers=8), lambda _: None, nodes_fn=lambda: ([{"CPU": 2.0}], True),
                            request_fn=lambda bundles: requests.append(bundles), wait_s=0.2, poll_s=0.05)
    assert time.monotonic() - t0 < 5
    assert requests[-1] == []


# ----------------------------------------------------------------------------- errors a retry cannot fix


@pytest.mark.parametrize("error", [CheckpointError("ckpt/experts-00000-00004.safetensors: sha256 does not match"),
                                   BaseModelChanged("base changed"), DataError("corpus missing"), ConfigError("bad key")])
def test_an_error_no_retry_fixes_ends_the_run_from_the_controller(error):
    callback = EndRunOnUserError()
    with pytest.raises(NotRetried) as info:
        callback.after_exception(None, {1: error, 0: RuntimeError("gloo: connection closed by peer")})
    assert info.value.rank == 1 and info.value.error is error
    # Ray Train hands it to the driver as ControllerError(NotRetried): pickled, and unwrapped again.
    back = pickle.loads(pickle.dumps(ControllerError(info.value)))
    cause = _user_error(back)
    assert type(cause) is type(error) and str(cause) == str(error)


def test_other_worker_errors_are_left_to_the_failure_policy():
    EndRunOnUserError().after_exception(None, {0: RuntimeError("gloo: connection closed by peer"), 1: ActorDiedError()})
    assert _user_error(ControllerError(RuntimeError("controller bug"))) is None
    assert _user_error(WorkerGroupError("x", {0: RuntimeError("nan loss")})) is None


def test_a_worker_group_error_after_the_retries_still_reports_the_workers_own_error():
    error = DataError("/data/corpus is not visible on node 10.0.0.2")
    assert _user_error(WorkerGroupError("x", {0: RuntimeError("peer gone"), 1: error})) is error


def test_ray_trains_own_resource_check_becomes_a_one_line_config_error():
    from ray.train.v2._internal.exceptions import InsufficientClusterResourcesError

    cause = _user_error(ControllerError(InsufficientClusterResourcesError(
        'Insufficient cluster resources to launch training workers.\nThe worker group requires {"CPU": 8}')))
    assert isinstance(cause, ConfigError) and "\n" not in str(cause) and '{"CPU": 8}' in str(cause)


def test_the_injected_kill_is_announced_once_as_expected(tmp_path, capsys):
    marker = tmp_path / "fault_injected.json"
    marker.write_text(json.dumps({"killed_at": time.time(), "killed_after_step": 6, "rank": 1}))
    callback = EndRunOnUserError(str(marker))
    callback.after_exception(None, {1: ActorDiedError()})
    callback.after_exception(None, {1: ActorDiedError()})  # the next poll sees the same death
    assert capsys.readouterr().err == ("expected: fault injection killed worker 1 after step 6 (train.fault_injection); "
                                       "Ray Train restarts the group from the last checkpoint\n")
    # The controller's warning about tearing down the group with the dead worker keeps its line, not its traceback.
    from ray.train.v2._internal.callbacks import backend_setup

    logger, seen = logging.getLogger(backend_setup.__name__), []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    try:
        try:
            raise ActorDiedError()
        except ActorDiedError:
            logger.warning("Graceful shutdown of backend failed. This is expected if one of the workers has crashed.", exc_info=True)
    finally:
        logger.removeHandler(handler)
        for f in logger.filters:
            f.until = 0.0
    assert len(seen) == 1 and seen[0].exc_info is None and seen[0].getMessage().startswith("Graceful shutdown")
    marker.write_text(json.dumps({"killed_at": time.time(), "killed_after_step": 6, "rank": 1, "recovery_s": 8.0}))
    EndRunOnUserError(str(marker)).after_exception(None, {1: ActorDiedError()})  # recovered: a real failure now
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- restart summary

RESTARTS = [
    {"restart": 1, "at": "2026-12-03T10:15:02+00:00", "resumed_from_step": 200, "steps_lost": 50, "recovery_s": 7.94,
     "world_size": 2, "cause": "fault_injection"},
    {"restart": 2, "at": "2026-12-03T10:31:40+00:00", "resumed_from_step": 0, "steps_lost": 3, "recovery_s": None,
     "world_size": 1, "cause": None},
]


def _local(iso: str) -> str:
    import datetime

    return datetime.datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def test_every_restart_is_listed_whatever_its_cause(tmp_path):
    path = tmp_path / "restarts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RESTARTS))
    assert format_restarts(read_restarts_since(str(path))) == [
        "restarts in this invocation: 2",
        f"  #1 at {_local(RESTARTS[0]['at'])}: resumed from step 200, 50 step(s) lost, back to training 7.9s after "
        "the failure, world size 2 (fault injection)",
        f"  #2 at {_local(RESTARTS[1]['at'])}: started over from scratch (no checkpoint), 3 step(s) lost, world size 1",
    ]


def test_only_the_restarts_appended_during_this_invocation_are_read(tmp_path):
    path = tmp_path / "restarts.jsonl"
    path.write_text(json.dumps(RESTARTS[0]) + "\n")
    offset = path.stat().st_size  # what run_training notes before fit()
    with open(path, "a") as f:
        f.write(json.dumps(RESTARTS[1]) + "\n" + '{"restart": 3, "at": "2026-')  # the last line cut short
    assert read_restarts_since(str(path), offset) == [RESTARTS[1]]
    assert read_restarts_since(str(tmp_path / "missing.jsonl")) == []
    assert format_restarts([]) == []
