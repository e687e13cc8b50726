"""MLflow tracking: one run per `raymoe train`, continued (same run id) when training resumes.

The driver opens the run and logs the resolved config; rank 0 of the worker group logs metrics
and the final artifacts into that run by id. The run id is remembered next to the Ray Train
checkpoints, so a resumed or restarted run continues the same MLflow run instead of forking.

Default store: `sqlite:///<output_dir>/mlflow.db` (MLflow 3 refuses a bare ./mlruns file store),
an absolute URI because Ray workers change directory. `tracking.uri` or $MLFLOW_TRACKING_URI
points at a server instead.

A server outage never stops training and loses nothing: what cannot be sent (metrics with their
own step and timestamp, params, tags, text, artifacts) waits in memory and is retried with
exponential backoff (1 s to 60 s; a failed attempt costs at most MLflow's client timeout), and is
sent when the server answers again or at `finish()`. One line says when the server went away,
one when it came back and how many points were delayed. If it is still away at `finish()`, the
pending records go to `mlflow_pending.jsonl` beside the checkpoints and one line names the
command that sends them later (`replay_pending`, `raymoe mlflow-replay PATH`); the run then
stays RUNNING on the server rather than reading FINISHED with holes.

    .venv/bin/python -m pytest tests/unit/test_tracking.py tests/unit/test_tracking_outage.py -q
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from typing import Any, Callable

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
PENDING_FILE = "mlflow_pending.jsonl"
"""Records MLflow did not take before the run ended, beside the checkpoints (`replay_pending`)."""

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""MLflow 3's UI reads this experiment tag to choose between its GenAI and its classic-ML views
(values `genai_development` and `custom_model_development`); untagged, it guesses from the runs and
shows training runs as GenAI "evaluation runs"."""
EXPERIMENT_KIND = "custom_model_development"

# Fail fast on an unreachable server instead of MLflow's default minutes of retries.
_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}

RETRY_S = (1.0, 60.0)
"""Backoff between send attempts while MLflow is unreachable: doubling from the first to the second."""
_MAX_IN_MEMORY = 200_000
"""Pending records kept in memory during an outage; older ones are appended to the pending file."""
_STAGE_MAX_BYTES = 1 << 30
"""Artifacts up to this size are copied aside when they cannot be sent at once (their source is
often a temporary directory); larger ones must still exist at their path when the server is back."""
# One log_batch request: MLflow caps a batch at 1000 metrics and at 100 params and 100 tags.
_METRICS_PER_REQUEST, _PARAMS_TAGS_PER_REQUEST = 1000, 100


def default_tracking_uri(uri: str | None, output_dir: str) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else the sqlite store under output_dir."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return "sqlite:///" + os.path.join(os.path.abspath(os.path.expanduser(output_dir)), "mlflow.db")


@contextlib.contextmanager
def process_tracking_uri(uri: str | None):
    """MLflow's process-wide tracking URI set to `uri` for the block, then put back as it was.

    Some MLflow 3 calls read only that URI (downloading runs:/<id>/model, which resolves to a
    logged model; registering a version from models:/<model id> in a local store), and
    mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI to the environment, where every later
    run of this process would find it: both are restored on the way out."""
    if not uri:
        yield
        return
    import mlflow
    from mlflow.tracking._tracking_service import utils  # the process-wide value, read back as it was

    before, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def tracking_uri(cfg: RunConfig) -> str:
    return default_tracking_uri(cfg.tracking.uri, cfg.output_dir)


def pending_path(cfg: RunConfig) -> str:
    """Where a run's unsent MLflow records are written when the server is away at the end."""
    return os.path.join(cfg.storage_path, cfg.name, PENDING_FILE)


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def replay_command(path: str) -> str:
    return f"raymoe mlflow-replay {path}"


def _client(uri: str):
    for k, v in _HTTP_ENV.items():
        os.environ.setdefault(k, v)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def param_value(value: Any) -> str:
    """A config value as an MLflow param, spelled as in the YAML config: `false`, `null`, `1.0e-05`,
    `[0.9, 0.95]` (flow style), strings as they are."""
    import yaml

    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=sys.maxsize, sort_keys=False)
    return text.removesuffix("\n...\n").strip()


# ----------------------------------------------------------------------------- pending records
# A record is one thing to send, as a dict that is also one line of the pending file:
#   {"kind": "metric", "run_id", "key", "value", "timestamp", "step"}  "param"/"tag": {"key", "value"}
#   "text": {"text", "artifact_file"}  "artifact": {"local_path", "artifact_path", "staged"?}
#   "terminate": {"status", "end_time"}; in the file each line also names its "uri".


def _permanent(e: BaseException) -> bool:
    """A failure that retrying cannot fix (MLflow rejected the request, a file is gone), as opposed
    to an unreachable or overloaded server."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        code = e.get_http_status_code()
        return 400 <= code < 500 and code not in (408, 429)
    return isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError))


def _request_len(records: list[dict], i: int) -> int:
    """How many records from index i go in one request: a run of metrics, or of params and tags,
    of the same run (up to MLflow's batch limits), else one."""
    first = records[i]
    kinds, cap = ({"metric"}, _METRICS_PER_REQUEST) if first["kind"] == "metric" else (
        ({"param", "tag"}, _PARAMS_TAGS_PER_REQUEST) if first["kind"] in ("param", "tag") else (set(), 1))
    n = 1
    while n < cap and i + n < len(records) and records[i + n]["kind"] in kinds and records[i + n]["run_id"] == first["run_id"]:
        n += 1
    return n


def _send(client, chunk: list[dict]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    first, run_id = chunk[0], chunk[0]["run_id"]
    kind = first["kind"]
    if kind in ("metric", "param", "tag"):
        client.log_batch(
            run_id,
            metrics=[Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"])) for r in chunk if r["kind"] == "metric"],
            params=[Param(r["key"], r["value"]) for r in chunk if r["kind"] == "param"],
            tags=[RunTag(r["key"], r["value"]) for r in chunk if r["kind"] == "tag"],
        )
    elif kind == "text":
        client.log_text(run_id, first["text"], first["artifact_file"])
    elif kind == "artifact":
        staged = first.get("staged")
        path = staged if staged and os.path.exists(staged) else first["local_path"]
        if not os.path.exists(path):
            raise FileNotFoundError(f"artifact {path} no longer exists")
        if os.path.isdir(path):
            client.log_artifacts(run_id, path, first["artifact_path"])
        else:
            client.log_artifact(run_id, path, first["artifact_path"])
        if staged:
            shutil.rmtree(os.path.dirname(staged), ignore_errors=True)
            try:  # the staging directory itself, once nothing else waits in it
                os.rmdir(os.path.dirname(os.path.dirname(staged)))
            except OSError:
                pass
    elif kind == "terminate":
        client.set_terminated(run_id, first["status"], end_time=first.get("end_time"))
    else:
        raise ValueError(f"unknown pending record kind {kind!r}")


class _Drained:
    """What one drain sent, and what could never be sent (MLflow refused it, its file is gone)."""

    def __init__(self) -> None:
        self.metrics = self.others = self.rejected = 0
        self.first_error: str | None = None


def _drain(records: list[dict], client_for: Callable[[dict], Any], done: _Drained) -> None:
    """Send records from the front, removing each request's records once MLflow took them (or
    refused them for good: counted in `done.rejected`). A transient failure propagates, leaving the
    unsent records in `records`."""
    i = 0
    try:
        while i < len(records):
            n = _request_len(records, i)
            chunk = records[i : i + n]
            try:
                _send(client_for(chunk[0]), chunk)
            except Exception as e:  # noqa: BLE001 - sorted into retry-later and refused
                if not _permanent(e):
                    raise
                done.rejected += n
                done.first_error = done.first_error or f"{type(e).__name__}: {str(e)[:200]}"
            else:
                metrics = sum(r["kind"] == "metric" for r in chunk)
                done.metrics += metrics
                done.others += n - metrics
            i += n
    finally:
        del records[:i]


def _read_pending(path: str) -> list[dict]:
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut short by a crash mid-write: nothing to recover from it
                warnings.warn(f"{path}: skipped a malformed line ({line[:80]!r})", stacklevel=2)
    return records


def _write_pending(path: str, records: list[dict], uri: str | None = None, append: bool = False) -> None:
    """`records` as JSON lines (with their uri); a rewrite replaces the file atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    target = path if append else path + ".tmp"
    with open(target, "a" if append else "w") as f:
        for r in records:
            f.write(json.dumps({"uri": uri, **r} if uri is not None and "uri" not in r else r) + "\n")
    if not append:
        os.replace(target, path)


def _send_pending_file(path: str, client_for: Callable[[dict], Any], done: _Drained, live_run: str | None = None) -> None:
    """Send a pending file's records; on a transient failure the file keeps exactly what is unsent.

    `live_run`: a run being logged to now, whose old final status (from an earlier attempt that
    ended during an outage) must not end it again; its tracker sets the status when it finishes."""
    if not os.path.exists(path):
        return
    records = [r for r in _read_pending(path) if not (r.get("kind") == "terminate" and r.get("run_id") == live_run)]
    try:
        _drain(records, client_for, done)
    except BaseException:
        _write_pending(path, records)
        raise
    os.remove(path)
    try:  # each staged copy went with its record; artifacts still waiting in memory keep theirs
        os.rmdir(_stage_dir(path))
    except OSError:
        pass


def _stage_dir(path: str) -> str:
    return os.path.splitext(path)[0] + "_artifacts"


def replay_pending(path: str, uri: str | None = None) -> int:
    """Send the records a tracker could not deliver (its pending file) to MLflow: metrics with
    their original steps and timestamps, params, tags, artifacts, and the run's final status.

    `uri`: the tracking server or store to send them to (default: the one each record names; give
    it when the server moved). Returns the number of metric points sent. Records MLflow refuses
    for good are dropped with one warning; if the server is unreachable this raises, and the file
    keeps exactly what was not sent, so running it again is safe. The file is removed when done.
    """
    clients: dict[str, Any] = {}

    def client_for(record: dict):
        target = uri or record.get("uri")
        if not target:
            raise ValueError(f"{path}: a record names no tracking URI; pass uri=")
        if target not in clients:
            clients[target] = _client(target)
        return clients[target]

    done = _Drained()
    _send_pending_file(path, client_for, done)
    if done.rejected:
        warnings.warn(f"MLflow could not take {done.rejected} record(s) from {path} ({done.first_error}); they are dropped", stacklevel=2)
    return done.metrics


def _pending_last_step(path: str, run_id: str, key: str) -> int:
    if not os.path.exists(path):
        return -1
    return max((int(r["step"]) for r in _read_pending(path)
                if r.get("kind") == "metric" and r.get("run_id") == run_id and r.get("key") == key), default=-1)


def _size(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class MlflowTracker:
    """Logs into one existing MLflow run by id, riding out server outages (see the module docstring).

    `pending_path`: where unsent records go if the server is still away at `finish()`/`close()`
    (default `~/.raymoe/mlflow_pending/<run_id>.jsonl`; runs opened here use `pending_path(cfg)`,
    beside the checkpoints). A pending file found there is sent first, whoever wrote it.
    `retry_s`: the backoff between attempts while MLflow is unreachable (first, longest).
    `log`: where the lines about an outage ending go (stderr by default); its start is a warning.
    """

    def __init__(self, uri: str, run_id: str, *, pending_path: str | None = None,
                 retry_s: tuple[float, float] = RETRY_S, log: Callable[[str], None] | None = None):
        self.uri, self.run_id = uri, run_id
        self.pending_path = pending_path or os.path.join(os.path.expanduser("~/.raymoe/mlflow_pending"), f"{run_id}.jsonl")
        self.registered: str | None = None
        """models:/<name>/<version> once the final model is registered."""
        self._retry_s = retry_s
        self._log = log or _stderr
        self._client = None
        self._pending: list[dict] = []
        self._spilled = 0  # metric points this tracker appended to the pending file
        self._down_since: float | None = None  # wall-clock start of the current outage
        self._backoff = 0.0
        self._next_try = 0.0  # time.monotonic() before which no attempt is made
        self._rejected = 0
        self._skip_through = -1
        self._resume_key: str | None = None  # resume_after_last_step could not ask the server yet

    # -- sending

    def _get_client(self):
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    def _went_away(self, e: BaseException, what: str) -> None:
        if self._down_since is None:
            self._down_since = time.time()
            self._backoff = self._retry_s[0]
            warnings.warn(f"MLflow at {self.uri} unavailable since {time.strftime('%H:%M:%S')} (during {what}: "
                          f"{type(e).__name__}: {str(e)[:200]}); training continues, buffering metrics, tags and "
                          f"artifacts and retrying every {self._retry_s[0]:g}-{self._retry_s[1]:g} s", stacklevel=4)
        else:
            self._backoff = min(self._retry_s[1], max(self._backoff * 2, self._retry_s[0]))
        self._next_try = time.monotonic() + self._backoff

    def _flush(self, what: str, force: bool = False, fresh: int = 0) -> bool:
        """Send what is pending (a pending file at our path first) unless we are backing off.
        True when nothing is left pending. `fresh`: metric points just logged, not delayed ones."""
        if not self._pending and self._resume_key is None and not os.path.exists(self.pending_path):
            return True  # nothing to send, and nothing learned about the server
        if not force and time.monotonic() < self._next_try:
            return False
        done = _Drained()
        try:
            if self._resume_key is not None:
                self._resume(self._resume_key)
            _send_pending_file(self.pending_path, lambda _: self._get_client(), done, live_run=self.run_id)
            self._spilled = 0
            _drain(self._pending, lambda _: self._get_client(), done)
        except Exception as e:  # noqa: BLE001 - tracking must never take training down
            self._went_away(e, what)
            return False
        finally:
            if done.rejected:
                self._rejected += done.rejected
                warnings.warn(f"MLflow at {self.uri} could not take {done.rejected} record(s) of run {self.run_id} during {what} "
                              f"({done.first_error}); they are dropped", stacklevel=3)
        if self._down_since is not None:
            others = f" and {done.others} other record(s)" if done.others else ""
            self._log(f"MLflow at {self.uri} is back at {time.strftime('%H:%M:%S')} after "
                      f"{time.time() - self._down_since:.0f} s: {max(0, done.metrics - fresh)} delayed metric point(s){others} sent")
            self._down_since = None
        self._next_try = 0.0
        return True

    def _add(self, records: list[dict], what: str) -> bool:
        self._pending.extend(records)
        if len(self._pending) > _MAX_IN_MEMORY:
            # A long outage: keep memory bounded, the oldest half waits on disk (sent first later).
            half = self._pending[: _MAX_IN_MEMORY // 2]
            try:
                _write_pending(self.pending_path, half, self.uri, append=True)
            except OSError:
                pass  # no room on disk either: it stays in memory
            else:
                del self._pending[: _MAX_IN_MEMORY // 2]
                self._spilled += sum(r["kind"] == "metric" for r in half)
        return self._flush(what, fresh=sum(r["kind"] == "metric" for r in records))

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        """An operation that cannot wait in the buffer (a query, a registration): tried once, after
        everything pending has been sent; None (and the outage handling) if MLflow is unreachable."""
        if not self._flush(what, force=True):
            warnings.warn(f"MLflow at {self.uri} is unavailable: {what} skipped", stacklevel=3)
            return None
        try:
            return fn(self._get_client(), *args, **kwargs)
        except Exception as e:  # noqa: BLE001
            if _permanent(e):
                warnings.warn(f"MLflow at {self.uri} refused {what} ({type(e).__name__}: {str(e)[:200]})", stacklevel=3)
            else:
                self._went_away(e, what)
            return None

    # -- the run

    def resume_after_last_step(self, key: str = "train/step") -> int:
        """After a restart, skip steps this run already logged (they are recomputed from the last
        checkpoint), so every metric's steps stay strictly increasing. Returns that last step.

        If MLflow is unreachable now, the question is asked again before anything is sent, and
        pending points at steps the run already has are dropped then."""
        try:
            self._resume(key)
        except Exception as e:  # noqa: BLE001
            self._resume_key = key
            self._went_away(e, "get_metric_history")
            self._skip_through = max(self._skip_through, _pending_last_step(self.pending_path, self.run_id, key))
        return self._skip_through

    def _resume(self, key: str) -> None:
        try:
            history = self._get_client().get_metric_history(self.run_id, key)
        except Exception as e:  # noqa: BLE001
            if not _permanent(e):
                raise
            history = []  # e.g. the run is gone: nothing to skip
        self._resume_key = None
        self._skip_through = max([int(m.step) for m in history] + [self._skip_through, _pending_last_step(self.pending_path, self.run_id, key)])
        self._pending = [r for r in self._pending if not (r["kind"] == "metric" and r["step"] <= self._skip_through
                                                          and not r["key"].startswith("elastic/"))]

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step <= self._skip_through:
            metrics = {k: v for k, v in metrics.items() if k.startswith("elastic/")}
            if not metrics:
                return
        ts = int(time.time() * 1000)  # the point's own time, kept however late it is sent
        self._add([{"kind": "metric", "run_id": self.run_id, "key": k, "value": float(v), "timestamp": ts, "step": int(step)}
                   for k, v in metrics.items()], "log_metrics")

    def log_params(self, params: dict[str, Any]) -> None:
        self._add([{"kind": "param", "run_id": self.run_id, "key": k, "value": param_value(v)} for k, v in params.items()], "log_params")

    def set_tag(self, key: str, value: str) -> None:
        self._add([{"kind": "tag", "run_id": self.run_id, "key": key, "value": str(value)}], "set_tag")

    def log_text(self, text: str, artifact_file: str) -> None:
        self._add([{"kind": "text", "run_id": self.run_id, "text": text, "artifact_file": artifact_file}], "log_text")

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        record = {"kind": "artifact", "run_id": self.run_id, "local_path": os.path.abspath(local_path), "artifact_path": artifact_path}
        if not self._add([record], "log_artifact"):
            self._stage(record)  # still pending: it was appended last, after anything spilled to disk

    def _stage(self, record: dict) -> None:
        """Copy an artifact that has to wait, so it survives its (often temporary) source."""
        src = record["local_path"]
        dst = os.path.join(_stage_dir(self.pending_path), uuid.uuid4().hex, os.path.basename(os.path.normpath(src)))
        try:
            if not os.path.exists(src) or _size(src) > _STAGE_MAX_BYTES:
                return
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, dst)
        except OSError:
            shutil.rmtree(os.path.dirname(dst), ignore_errors=True)
            return  # sent from its own path, if that still exists then
        record["staged"] = dst

    def close(self) -> bool:
        """Send everything pending now; if MLflow is still unreachable, write it to the pending
        file and say so in one line. True when nothing is left pending. What a worker calls when
        its part of the run is done (`finish` also ends the run)."""
        if self._flush("close", force=True):
            return True
        metrics = sum(r["kind"] == "metric" for r in self._pending) + self._spilled
        others = sum(r["kind"] != "metric" for r in self._pending)
        ends = any(r["kind"] == "terminate" for r in self._pending)
        try:
            _write_pending(self.pending_path, self._pending, self.uri, append=True)
        except OSError as e:
            warnings.warn(f"MLflow at {self.uri} still unreachable and {self.pending_path} not writable ({e}): "
                          f"{metrics} metric point(s) and {others} other record(s) of run {self.run_id} are lost when this process ends", stacklevel=3)
            return False
        self._pending.clear()
        self._spilled = 0
        warnings.warn(f"MLflow at {self.uri} still unreachable: {metrics} metric point(s) and {others} other record(s) of run "
                      f"{self.run_id} written to {self.pending_path}; "
                      + ("the run stays RUNNING there until " if ends else "")
                      + f"`{replay_command(self.pending_path)}` sends them", stacklevel=3)
        return False

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is pending, then end the run with `status`. Records MLflow refused leave the
        run tagged `raymoe.tracking.incomplete` (and a warning) rather than silently FINISHED."""
        if self._rejected:
            self.set_tag("raymoe.tracking.incomplete", f"{self._rejected} record(s) MLflow could not take, see the training log")
        self._pending.append({"kind": "terminate", "run_id": self.run_id, "status": status, "end_time": int(time.time() * 1000)})
        self.close()

    @property
    def ok(self) -> bool:
        """MLflow answered the last attempt and nothing is waiting to be sent."""
        return self._down_since is None and not self._pending and not self._spilled

    @property
    def pending(self) -> int:
        """Metric points logged but not yet in MLflow."""
        return sum(r["kind"] == "metric" for r in self._pending) + self._spilled


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
            _log_params(client, run_id, config_params(cfg))
            client.log_text(run_id, config_yaml, CONFIG_ARTIFACT)
            os.makedirs(os.path.dirname(id_file), exist_ok=True)
            with open(id_file, "w") as f:
                json.dump({"run_id": run_id, "tracking_uri": uri}, f)
            log(f"MLflow run {run_id} in experiment {cfg.tracking.experiment!r} ({uri})")
        return MlflowTracker(uri, run_id, pending_path=pending_path(cfg), log=log)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"MLflow tracking at {uri} is unavailable ({type(e).__name__}: {str(e)[:200]}); training continues without tracking")
        return None


def _experiment_id(client, name: str, output_dir: str | None, uri: str) -> str:
    """The experiment called `name`, created if missing; either way tagged as model development
    (EXPERIMENT_KIND_TAG), unless someone already chose a kind for it."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    local = uri.startswith(("sqlite:", "file:"))
    artifacts = "file://" + os.path.join(output_dir, "mlartifacts") if (local and output_dir) else None
    return client.create_experiment(name, artifact_location=artifacts, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def open_parent_run(cfg: RunConfig, log=print) -> MlflowTracker | None:
    """The MLflow run of a whole `raymoe tune` search; trials are its nested children."""
    uri = tracking_uri(cfg)
    try:
        client = _client(uri)
        exp_id = _experiment_id(client, cfg.tracking.experiment, cfg.output_dir, uri)
        run = client.create_run(exp_id, run_name=f"{cfg.name} (search)", tags={"raymoe.search": cfg.name, "mlflow.source.name": "raymoe tune"})
        _log_params(client, run.info.run_id, config_params(cfg, search=True))
        client.log_text(run.info.run_id, cfg.to_yaml(), CONFIG_ARTIFACT)
        log(f"MLflow search run {run.info.run_id} in experiment {cfg.tracking.experiment!r} ({uri})")
        return MlflowTracker(uri, run.info.run_id, pending_path=pending_path(cfg), log=log)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"MLflow tracking at {uri} is unavailable ({type(e).__name__}: {str(e)[:200]}); searching without tracking")
        return None


def open_child_run(uri: str, experiment: str, parent_run_id: str | None, name: str, params: dict, cfg: RunConfig | None) -> MlflowTracker | None:
    """A trial's run, nested under the search's run (MLflow's mlflow.parentRunId tag).

    Params: the sampled values as `trial.<key>` (in YAML spelling), then the trial's whole config
    without the tune: section, which the parent run holds."""
    if parent_run_id is None:
        return None
    try:
        client = _client(uri)
        exp_id = client.get_run(parent_run_id).info.experiment_id
        run = client.create_run(exp_id, run_name=name, tags={"mlflow.parentRunId": parent_run_id, "raymoe.trial": name})
        sampled = {f"trial.{k}": param_value(v.item() if hasattr(v, "item") else v) for k, v in params.items()}
        _log_params(client, run.info.run_id, {**sampled, **(config_params(cfg) if cfg is not None else {})})
        return MlflowTracker(uri, run.info.run_id, pending_path=pending_path(cfg) if cfg is not None else None)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"MLflow child run for {name} failed ({type(e).__name__}: {str(e)[:200]}); the trial runs untracked")
        return None


def config_params(cfg: RunConfig, *, search: bool = False) -> dict[str, str]:
    """The config as MLflow params: dotted keys, values in YAML spelling (`param_value`).

    Left out: the serve: section (how the model is served later, not how this run trained it) and,
    unless this is a search's own run (`search`), the tune: section, which only `raymoe tune` reads.
    `parallel.expert_degree` is the degree the workers use, resolved from scaling.num_workers as
    `raymoe.parallel.mesh.resolve_expert_degree` does. For an elastic group ([min, max] workers) it
    stays `auto`, and `parallel.expert_degree_at_min_workers` gives the degree at the minimum; the
    degree actually used at each size is the workers' `elastic/expert_degree` metric.
    """
    from raymoe.parallel.mesh import resolve_expert_degree

    flat = {k: v for k, v in cfg.flat().items() if not k.startswith("serve.") and (search or not k.startswith("tune."))}
    lo, hi = cfg.scaling.worker_range
    try:
        degree = resolve_expert_degree(cfg.parallel.expert_degree, lo, cfg.model.num_experts)
    except ValueError:  # a fixed degree that does not fit; config validation reports it
        degree = None
    if degree is not None:
        if lo == hi:
            flat["parallel.expert_degree"] = degree
        elif cfg.parallel.expert_degree == "auto":
            flat["parallel.expert_degree_at_min_workers"] = degree
    return {k: param_value(v) for k, v in flat.items()}


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), _PARAMS_TAGS_PER_REQUEST):
        client.log_batch(run_id, params=items[i : i + _PARAMS_TAGS_PER_REQUEST])


def _tick_step(n: int, max_labels: int = 64) -> int:
    """Label every index up to max_labels of them, else every 2nd, 4th, 8th ... so at most max_labels."""
    step = 1
    while -(-n // step) > max_labels:
        step *= 2
    return step


def expert_load_figure(load_history: list[dict[str, Any]]):
    """The expert-load heatmap as a matplotlib Figure (None without history): MoE layers down,
    experts across, each cell the layer's share of routed tokens relative to an even split.

    Every expert and every layer gets an integer tick label (up to 64 of them; beyond, every 2nd,
    4th, 8th ...), and the figure grows with the labels so they stay readable."""
    if not load_history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    total = np.sum([np.asarray(h["load"], dtype=np.float64) for h in load_history], axis=0)
    share = total / np.maximum(total.sum(axis=1, keepdims=True), 1)
    num_layers, num_experts = share.shape
    x_step, y_step = _tick_step(num_experts), _tick_step(num_layers)
    x_labels, y_labels = -(-num_experts // x_step), -(-num_layers // y_step)
    # ~0.2 in per expert label and ~0.3 in per layer label, plus room for axis labels and the colorbar.
    fig, ax = plt.subplots(figsize=(min(24.0, max(6.0, 2.5 + 0.2 * x_labels)), min(24.0, max(3.0, 1.8 + 0.3 * y_labels))))
    im = ax.imshow(share * num_experts, aspect="auto", cmap="viridis", interpolation="nearest")
    x_ticks, y_ticks = list(range(0, num_experts, x_step)), list(range(0, num_layers, y_step))
    ax.set_xticks(x_ticks, [str(e) for e in x_ticks], fontsize=8 if x_labels <= 32 else 7, rotation=90 if x_labels > 16 else 0)
    ax.set_yticks(y_ticks, [str(layer) for layer in y_ticks], fontsize=8)
    ax.set_xlabel("expert" if x_step == 1 else f"expert (labelled every {x_step})")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"expert load / mean, steps {load_history[0]['step']}-{load_history[-1]['step']}")
    fig.colorbar(im, ax=ax, label="load relative to an even split")
    fig.tight_layout()
    return fig


def expert_load_heatmap(load_history: list[dict[str, Any]], out_png: str) -> bool:
    """Heatmap of each MoE layer's share of tokens per expert over the whole run (matplotlib)."""
    try:
        fig = expert_load_figure(load_history)
    except ImportError:
        return False
    if fig is None:
        return False
    import matplotlib.pyplot as plt

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
            logged = _log_model(tracker, mdir)
            if cfg.tracking.registered_model:
                register_model(tracker, cfg.tracking.registered_model, logged)
        history_path = os.path.join(checkpoint_dir, LOAD_HISTORY)
        if os.path.exists(history_path):
            tracker.log_artifact(history_path)
            with open(history_path) as f:
                history = json.load(f)
            png = os.path.join(d, LOAD_HEATMAP)
            if expert_load_heatmap(history, png):
                tracker.log_artifact(png)


def _log_model(tracker: MlflowTracker, model_dir: str):
    """The model directory as the run's MLflow model (mlflow_model.py: a pyfunc around it, listed
    under the run's logged models); with MLflow away, the plain directory waits in the tracker's
    buffer instead. Returns the LoggedModel, or None."""
    from raymoe.mlflow_model import log_pyfunc_model

    logged = tracker._call("log_model", lambda c: log_pyfunc_model(c, tracker.run_id, model_dir, MODEL_ARTIFACT))
    if logged is None:
        tracker.log_artifact(model_dir, MODEL_ARTIFACT)
    return logged


def register_model(tracker: MlflowTracker, name: str, logged=None) -> str | None:
    """A new version of registered model `name`: of the run's logged model when there is one (the
    version's "Source Model" in the UI), else of its model/ artifacts; returns its URI."""

    def create(c):
        from mlflow.exceptions import MlflowException

        try:
            c.create_registered_model(name)
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                raise
        if logged is not None:
            from raymoe.mlflow_model import register_logged_model

            return register_logged_model(c, name, logged)
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
    registered = register_model(tracker, name, _log_model(tracker, model_dir))
    tracker.finish("FINISHED" if registered else "FAILED")
    return registered


def print_where_to_look(uri: str, run_id: str | None, out=sys.stdout) -> None:
    if run_id:
        print(f"MLflow run: {run_id}", file=out)
    print(f"MLflow UI:  {ui_command(uri)}", file=out)
