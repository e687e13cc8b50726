"""An MLflow outage mid-run against a real `mlflow server` subprocess (sqlite store, artifacts
served over HTTP): killed and restarted on the same port and store, no metric point is lost and
each keeps its own step; a server still gone at the end leaves a pending file that replays.

    .venv/bin/python -m pytest tests/unit/test_tracking_outage.py -q

One server start costs seconds (the first, which creates the store's tables, about twice a
restart), so the module shares one store and port and restarts the server in place.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings

import pytest

from raymoe.config import config_from_dict
from raymoe.tracking import MlflowTracker, open_run, pending_path, replay_command, replay_pending

pytestmark = pytest.mark.slow

MLFLOW = os.path.join(os.path.dirname(sys.executable), "mlflow")


class Server:
    """`mlflow server` in its own process group, so a kill takes its workers with it."""

    def __init__(self, root, port: int):
        self.root, self.port = root, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90) -> None:
        # The job runner (a dozen huey consumers) is for GenAI jobs; without it a start is seconds shorter.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--default-artifact-root", "mlflow-artifacts:/", "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"mlflow server did not come up on {self.uri}:\n{(self.root / 'server.log').read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this test started, nothing else
        if self.proc is not None:
            self.proc.wait()
        self.proc = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        # tracking._client sets these with setdefault; restore the environment afterwards.
        for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
            mp.delenv(k, raising=False)
        srv = Server(root, _free_port())
        srv.start()
        try:
            yield srv
        finally:
            srv.kill()


def _open(server, tmp_path, name: str):
    cfg = config_from_dict({"name": name, "output_dir": str(tmp_path), "scaling": {"num_workers": 1},
                            "tracking": {"uri": server.uri, "experiment": "outage"}})
    lines: list[str] = []
    tracker = open_run(cfg, cfg.to_yaml(), log=lines.append)
    assert tracker is not None
    return cfg, tracker, lines


def _loss(step: int) -> float:
    return 10.0 - step / 8


def _log(tracker, step: int) -> None:
    tracker.log_metrics({"train/loss": _loss(step), "train/step": step}, step=step)


def test_every_point_logged_while_the_server_is_down_reaches_the_run(server, tmp_path):
    from mlflow.tracking import MlflowClient

    if server.proc is None:
        server.start()
    cfg, tracker, lines = _open(server, tmp_path, "outage")
    for step in range(10):
        _log(tracker, step)
    assert tracker.ok

    server.kill()
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(10, 20):
            _log(tracker, step)
        slowest_s = time.monotonic() - t0
        # A worker restarted during the outage recomputes steps 5-9 from its checkpoint: it cannot
        # ask which steps the run has yet, so it asks before it sends anything.
        restarted = MlflowTracker(server.uri, tracker.run_id, pending_path=str(tmp_path / "restarted.jsonl"))
        assert restarted.resume_after_last_step() == -1
        for step in range(5, 10):
            restarted.log_metrics({"train/loss": 99.0, "train/step": step}, step=step)
    down = [str(w.message) for w in record if "unavailable since" in str(w.message)]
    assert len(down) == 2 and server.uri in down[0]  # one line per tracker, not one per step
    assert slowest_s < 5, slowest_s  # 10 steps: one failed request, then buffering
    assert tracker.pending == 20 and not tracker.ok

    server.start()  # same port, same store
    for step in range(20, 30):
        _log(tracker, step)
    assert tracker.ok and tracker.pending == 0
    (back,) = [line for line in lines if "is back" in line]
    assert back.startswith(f"MLflow at {server.uri} is back at ") and "20 delayed metric point(s) sent" in back
    assert restarted.close() and restarted.pending == 0
    tracker.finish()

    client = MlflowClient(server.uri)
    history = client.get_metric_history(tracker.run_id, "train/loss")
    # All 30 points, each once, at its own step with its own value (the restarted worker's
    # recomputed 5-9 were dropped, the run already had them).
    assert sorted((m.step, m.value) for m in history) == [(s, _loss(s)) for s in range(30)]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert not os.path.exists(pending_path(cfg))


def test_points_pending_when_the_run_ends_replay_into_the_server_once_it_is_back(server, tmp_path):
    from mlflow.tracking import MlflowClient

    if server.proc is None:
        server.start()
    cfg, tracker, _ = _open(server, tmp_path, "never-back")
    for step in range(5):
        _log(tracker, step)
    server.kill()
    notes = tmp_path / "notes.txt"
    notes.write_text("written during the outage")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(5, 15):
            _log(tracker, step)
        tracker.set_tag("raymoe.note", "outage")
        tracker.log_artifact(str(notes))
        tracker.finish()
    path = pending_path(cfg)
    assert path == os.path.join(cfg.storage_path, "never-back", "mlflow_pending.jsonl") and os.path.exists(path)
    (end,) = [str(w.message) for w in record if "still unreachable" in str(w.message)]
    assert f"20 metric point(s) and 3 other record(s) of run {tracker.run_id} written to {path}" in end
    assert replay_command(path) in end

    server.start()
    client = MlflowClient(server.uri)
    assert client.get_run(tracker.run_id).info.status == "RUNNING"  # not FINISHED with holes
    assert replay_pending(path) == 20  # the URI is in the file
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, _loss(s)) for s in range(15)]
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["raymoe.note"] == "outage"
    assert "notes.txt" in {a.path for a in client.list_artifacts(tracker.run_id)}
    assert not os.path.exists(path)
