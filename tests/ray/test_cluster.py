"""A real two-node Ray cluster on this machine, driven the way a user drives one.

`ray start --head` and a second `ray start --address=...` (each its own process tree, temp dir and
CPU), token authentication on with a private token, and an `mlflow server` (SQLite backend,
proxied artifact store), all on free ports. `raymoe submit train` sends a small elastic
expert-parallel training job (1 to 2 workers) through the Ray Jobs SDK; its two Ray Train workers
start one on each node with the submitted runtime env (uploaded raymoe, tracking URI). After the
first checkpoint the worker node is killed outright (its whole process tree, SIGKILL): the group
restarts smaller (2 -> 1 workers, expert degree 2 -> 1) from that checkpoint on the head and the
job still succeeds, with the run's metrics, artifacts and model version on the MLflow server.
Everything it started is killed by process session at the end, even on failure; it never runs
`ray stop`, which would take down every other Ray instance on the machine.

    .venv/bin/python -m pytest tests/ray/test_cluster.py -q
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")]

REPO = Path(__file__).resolve().parents[2]
BIN = os.path.dirname(sys.executable)
RAYMOE = os.path.join(BIN, "raymoe")


@dataclass
class LoopbackCluster:
    dashboard: str
    """The head's Ray dashboard (job submission API), http://127.0.0.1:PORT."""
    mlflow: str
    """The MLflow tracking server, http://127.0.0.1:PORT."""
    artifacts: Path
    """The server's --artifacts-destination."""
    client_env: dict
    """Environment of a client on this machine: the token path, but not RAY_AUTH_MODE."""
    token: str
    node_ids: list[str]
    """Alive nodes, head first."""
    kill_worker_node: Callable[[], None]
    """SIGKILL the worker node's whole process tree (raylet and the workers on it)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    """Every process in session `sid`: what a `start_new_session` child and its descendants are,
    including Ray workers that moved to their own process group."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _kill_sessions(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        for pid in _session_pids(p.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _http_status(url: str, token: str | None = None) -> int | None:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def _wait(what: str, ready, procs: list[subprocess.Popen], logs: list[Path], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        dead = [p.args[:3] for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(f"--- {log}\n{log.read_text()[-2000:]}" for log in logs if log.exists())
            pytest.fail(f"{what} did not come up ({'exited: ' + str(dead) if dead else 'timed out'})\n{tails}")
        time.sleep(0.3)


def _ray_list(kind: str, cluster_env: dict, dashboard: str, *filters: str) -> list[dict]:
    """The public state CLI (`ray list nodes|actors`), authenticated with the cluster's token."""
    args = [os.path.join(BIN, "ray"), "list", kind, "--address", dashboard, "--format", "json", "--detail"]
    for f in filters:
        args += ["--filter", f]
    r = subprocess.run(args, check=False, env=dict(cluster_env, RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


@pytest.fixture
def loopback_cluster(tmp_path):
    procs: list[subprocess.Popen] = []
    # Ray's unix sockets live under its temp dir: keep the path short (sun_path is 108 bytes).
    ray_tmp = Path(tempfile.mkdtemp(prefix="rmc-", dir="/tmp"))
    try:
        token = secrets.token_hex(32)
        token_path = tmp_path / "auth_token"
        token_path.write_text(token)
        token_path.chmod(0o600)
        # Nothing from this shell's Ray or MLflow settings leaks in; `python` in a job is this venv's.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        env.update(PATH=BIN + os.pathsep + env.get("PATH", ""), RAY_AUTH_TOKEN_PATH=str(token_path))
        ports = {k: _free_port() for k in ("gcs", "dashboard", "client", "agent_head", "agent_worker", "mlflow")}
        # Token auth on, explicitly; RAY_ADDRESS so that Ray's own address auto-detection inside
        # the cluster (the state API in Train's placement-group cleaner) finds this cluster and not
        # another Ray instance running on the same machine.
        node_env = dict(env, RAY_AUTH_MODE="token", RAY_ADDRESS=f"127.0.0.1:{ports['gcs']}")
        # A lost node is declared dead after 3 missed health checks 0.5 s apart (Ray's default:
        # 5 missed, 3 s apart). Ray Train polls its workers every 0.5 s and, after the node goes,
        # first retries the old size, giving up when the placement group is not ready in 5 s (the
        # default 60 s is how long a shrink would otherwise wait); no preemption-watcher actor.
        node_env.update(RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="3",
                        RAY_health_check_initial_delay_ms="1000", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5",
                        RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="5", RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")
        logs = {k: tmp_path / f"{k}.log" for k in ("mlflow", "head", "worker")}

        def launch(args: list[str], log: Path, env: dict) -> subprocess.Popen:
            with open(log, "w") as out:
                p = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
            procs.append(p)
            return p

        artifacts = tmp_path / "artifacts"
        mlflow = f"http://127.0.0.1:{ports['mlflow']}"
        launch([os.path.join(BIN, "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(ports["mlflow"]),
                "--workers", "1"], logs["mlflow"], env)
        common = ["--block", "--num-cpus=1", "--object-store-memory=200000000", "--disable-usage-stats"]
        launch([os.path.join(BIN, "ray"), "start", "--head", *common, "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
                f"--ray-client-server-port={ports['client']}", f"--dashboard-agent-listen-port={ports['agent_head']}",
                f"--temp-dir={ray_tmp / 'head'}"], logs["head"], node_env)
        dashboard = f"http://127.0.0.1:{ports['dashboard']}"
        _wait("the head node", lambda: "Ray runtime started" in logs["head"].read_text(), procs, list(logs.values()))
        # One CPU per node and one CPU per Ray Train worker: two workers must use both nodes.
        worker = launch([os.path.join(BIN, "ray"), "start", *common, f"--address=127.0.0.1:{ports['gcs']}",
                         f"--dashboard-agent-listen-port={ports['agent_worker']}", f"--temp-dir={ray_tmp / 'worker'}"],
                        logs["worker"], node_env)
        _wait("the worker node", lambda: "Ray runtime started" in logs["worker"].read_text(), procs, list(logs.values()))
        _wait("the MLflow server", lambda: _http_status(f"{mlflow}/health") == 200, procs, list(logs.values()))
        _wait("the dashboard", lambda: _http_status(f"{dashboard}/api/version", token) == 200, procs, list(logs.values()))

        nodes = _ray_list("nodes", env, dashboard, "state=ALIVE")
        nodes.sort(key=lambda n: not n["is_head_node"])
        assert len(nodes) == 2, nodes
        yield LoopbackCluster(dashboard=dashboard, mlflow=mlflow, artifacts=artifacts, client_env=env, token=token,
                              node_ids=[n["node_id"] for n in nodes], kill_worker_node=lambda: _kill_sessions([worker]))
    finally:
        _kill_sessions(procs)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _raymoe(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([RAYMOE, *args], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _artifacts(client, run_id, path=None):
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def _kill_node_after_first_checkpoint(c: LoopbackCluster, out: Path, killed: dict, stop: threading.Event) -> None:
    """Once every rank's files of the first checkpoint are in storage (rank 0's manifest can
    arrive before the other rank's shard: a kill then leaves an unfinished checkpoint, which
    tests/unit/test_checkpoint.py covers), kill the worker node."""
    from raymoe.parallel.checkpoint import unfinished

    try:
        while not stop.is_set():
            manifests = [m for m in out.glob("runs/*/checkpoint_*/manifest.json") if unfinished(str(m.parent)) is None]
            if manifests:
                killed["first_checkpoint_world"] = json.loads(manifests[0].read_text())["state"]["world_size"]
                c.kill_worker_node()
                killed["at"] = time.time()
                return
            time.sleep(0.1)
    except Exception as e:  # shown by the test's assertion on `killed`, not lost in a thread
        killed["error"] = repr(e)


def test_submitted_elastic_job_survives_losing_a_node_and_tracks_to_the_mlflow_server(loopback_cluster, tmp_path):
    c = loopback_cluster
    # Token authentication is really on: the job API refuses a request without the token.
    assert _http_status(f"{c.dashboard}/api/jobs/") == 401

    killed, stop = {}, threading.Event()
    killer = threading.Thread(target=_kill_node_after_first_checkpoint, args=(c, tmp_path / "out", killed, stop))
    killer.start()
    t0 = time.monotonic()
    try:
        r = _raymoe(
            "submit", "train", "jobs/configs/demo.yaml", "--address", c.dashboard, "--tracking-uri", c.mlflow,
            "--set", f"output_dir={tmp_path / 'out'}", "--set", "name=cluster-e2e", "--set", "scaling.num_workers=[1, 2]",
            "--set", "train.steps=20", "--set", "train.warmup_steps=5", "--set", "train.log_every=10",
            "--set", "train.val_every=10", "--set", "train.val_batches=1", "--set", "train.checkpoint_every=10",
            "--set", "train.fault_injection=null", "--set", "train.sample_tokens=8", "--set", "data.max_bytes=300000",
            "--set", "tracking.experiment=cluster-e2e", "--set", "tracking.registered_model=raymoe-cluster-e2e",
            # Spaces, quotes and '#' must survive the entrypoint's shell and YAML.
            "--set", "train.sample_prompt='# a b'",
            env=c.client_env, timeout=300,
        )
    finally:
        stop.set()
        killer.join()
    print(r.stdout[-6000:])
    print(f"raymoe submit: {time.monotonic() - t0:.1f}s")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    job_id = next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("job: "))
    assert f"job {job_id}: SUCCEEDED" in r.stdout
    assert "done: step 20" in r.stdout  # the followed logs
    # Started on both nodes; the step-10 checkpoint's group of 2 resumed as 1 on the head.
    assert killed.get("first_checkpoint_world") == 2, (killed, r.stdout[-4000:])
    assert "expert degree 2; now 1 and 1" in r.stdout, r.stdout[-4000:]
    assert "restarts in this invocation: 1" in r.stdout and "world size 1" in r.stdout

    status = _raymoe("jobs", "status", job_id, "--address", c.dashboard, env=c.client_env)
    assert status.returncode == 0 and status.stdout.startswith(f"{job_id}: SUCCEEDED"), status.stdout + status.stderr
    logs = _raymoe("jobs", "logs", job_id, "--address", c.dashboard, env=c.client_env)
    assert logs.returncode == 0 and "done: step 20" in logs.stdout
    missing = _raymoe("jobs", "stop", "raysubmit_nosuchjob", "--address", c.dashboard, env=c.client_env)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"raymoe: no job 'raysubmit_nosuchjob' on the cluster at {c.dashboard}: see raymoe jobs list --address {c.dashboard}"]

    # The first group had a Ray Train worker on each node, the second one on the head; each
    # worker had the runtime env the submission built.
    workers = _ray_list("actors", c.client_env, c.dashboard, "class_name=RayTrainWorker")
    assert sorted(w["node_id"] for w in workers) == sorted([*c.node_ids, c.node_ids[0]]), (workers, c.node_ids)
    for w in workers:
        runtime_env = json.loads(w["serialized_runtime_env"])
        assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == c.mlflow
        assert len(runtime_env["py_modules"]) == 1 and runtime_env["working_dir"].startswith("gcs://")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(c.mlflow)
    exp = client.get_experiment_by_name("cluster-e2e")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["raymoe.run"] == "cluster-e2e"
    assert run.data.params["train.sample_prompt"] == "# a b"
    assert run.data.params["scaling.num_workers"] == "[1, 2]"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [10, 20]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [10, 20]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "elastic/world_size")][-1] == 1.0
    assert [m.value for m in client.get_metric_history(run.info.run_id, "elastic/expert_degree")][-1] == 1.0
    (restarted,) = client.get_metric_history(run.info.run_id, "elastic/restarts")
    assert restarted.step == 10
    print(f"worker node killed -> group resumed at world size 1: {restarted.timestamp / 1000 - killed['at']:.1f} s")
    assert client.get_metric_history(run.info.run_id, "moe/load_imbalance")
    names = _artifacts(client, run.info.run_id)
    for name in ("config.yaml", "expert_load.json"):
        assert name in names, (name, names)
    from raymoe.model_dir import open_source

    model = open_source(f"runs:/{run.info.run_id}/model", tracking_uri=c.mlflow)  # the run's MLflow model
    assert {"config.yaml", "model.safetensors"} <= set(os.listdir(model.path))
    # Through the server's artifact proxy into its destination, not into a node's local mlruns/.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert (c.artifacts / exp.experiment_id / run.info.run_id / "artifacts" / "config.yaml").is_file()
    assert list(c.artifacts.rglob("model.safetensors"))
    (version,) = client.search_model_versions("name='raymoe-cluster-e2e'")
    assert version.run_id == run.info.run_id
