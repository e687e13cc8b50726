"""Elastic: a node leaves mid-run, so the group restarts smaller (2 -> 1 workers, expert degree
2 -> 1) from the last checkpoint and still finishes.

Ray allows one cluster per process and the session's local Ray is not multi-node, so this test
runs its own two-node `ray.cluster_utils.Cluster` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.slow]

SCRIPT = textwrap.dedent('''
    import glob, json, os, sys, threading, time
    import ray
    from ray.cluster_utils import Cluster
    from raymoe.config import config_from_dict
    from raymoe.ray_train import run_training

    out = sys.argv[1]
    cfg = config_from_dict({
        "name": "elastic", "output_dir": out,
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_seq_len": 32, "num_experts": 8,
                  "top_k": 2, "expert_intermediate_size": 16},
        # One worker per node: four worker processes on two cores made this the slowest test.
        "scaling": {"num_workers": [1, 2], "max_failures": 3},
        "train": {"steps": 20, "batch_size": 2, "seq_len": 32, "warmup_steps": 2, "log_every": 5,
                  "val_every": 10, "val_batches": 1, "checkpoint_every": 5, "sample_tokens": 0},
        "data": {"max_bytes": 300000},
    })
    # Notice a removed node in seconds rather than Ray's default ~minute of missed health checks.
    fast_health = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 1000}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": fast_health})
    extra = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    # Ray Train sizes an elastic group from the resources it sees at start: make sure that is both nodes.
    while ray.cluster_resources().get("CPU", 0) < 2:
        time.sleep(0.2)
    time.sleep(2)
    result = {}
    trainer = threading.Thread(target=lambda: result.update(outcome=run_training(cfg)))
    trainer.start()
    # Take the second node away once the first checkpoint exists.
    run_dir = os.path.join(cfg.storage_path, cfg.name)
    while not glob.glob(os.path.join(run_dir, "checkpoint_*", "manifest.json")):
        time.sleep(0.2)
    first = glob.glob(os.path.join(run_dir, "checkpoint_*", "manifest.json"))[0]
    print("FIRST_CHECKPOINT_WORLD " + str(json.load(open(first))["state"]["world_size"]), flush=True)
    cluster.remove_node(extra)
    print("NODE_REMOVED_AT " + repr(time.time()), flush=True)
    trainer.join()
    o = result["outcome"]
    print("RESULT " + json.dumps({"step": o.step, "run_id": o.mlflow_run_id, "uri": o.tracking_uri}))
    ray.shutdown()
    cluster.shutdown()
''')


def test_group_resumes_smaller_after_a_node_leaves_and_finishes(tmp_path):
    # After the node goes, Ray Train first tries the old size and waits out its worker-group start
    # timeout (60 s by default) before shrinking; 20 s is ample for a worker to start here.
    env = {**os.environ, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=480, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["step"] == 20
    assert "FIRST_CHECKPOINT_WORLD 2" in proc.stdout, proc.stdout[-3000:]  # started on both nodes

    from mlflow.tracking import MlflowClient

    client = MlflowClient(result["uri"])
    sizes = [m.value for m in client.get_metric_history(result["run_id"], "elastic/world_size")]
    degrees = [m.value for m in client.get_metric_history(result["run_id"], "elastic/expert_degree")]
    assert sizes and sizes[-1] == 1.0, (sizes, proc.stdout[-3000:])
    assert degrees[-1] == 1.0, degrees
    removed_at = float(next(l for l in proc.stdout.splitlines() if l.startswith("NODE_REMOVED_AT ")).split()[1])
    restarted = client.get_metric_history(result["run_id"], "elastic/restarts")[0]
    print(f"node removed -> group resumed at world size 1: {restarted.timestamp / 1000 - removed_at:.1f} s")
    steps = [m.step for m in client.get_metric_history(result["run_id"], "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 20
    assert "world size 2" in proc.stdout and "now 1 and 1" in proc.stdout
