"""Failures around the training loop: injected kills, and making every restart visible.

Two step callbacks for `train.loop.train` (the loop adds both itself):

- `FaultInjector`: `train.fault_injection: {kill_rank, at_step}` SIGKILLs that worker once per
  run, right after that step. Rank 0 announces it first in one line, so the tracebacks Ray prints
  for the dead worker read as the expected demo they are.
- `RestartWatch` (rank 0; a no-op elsewhere): tells a restart from a first start or a deliberate
  continuation, and on a restart prints one `raymoe: restart N of run X: ...` line, logs
  `elastic/restarts`, `elastic/steps_lost`, `elastic/recovery_s` at the resumed step, and appends
  one line to `<run dir>/restarts.jsonl`, which the driver reads back with `read_restarts`.

How a restart is detected: rank 0 writes `<run dir>/attempt.json` (run dir = `storage_path/name`,
where the checkpoints are) at every start and marks it finished when the loop returns; a start
that finds the previous one unfinished is a restart, whatever the cause: a killed or lost worker,
an error, a stopped driver. (Ray Train 2.60 tells a worker nothing about attempts:
`ray.train.get_context()` has world rank and size, no attempt number.) `<run dir>/last_step.json`,
rewritten after every step, holds the last step and when it finished: the best known time of a
failure that was not injected.

restarts.jsonl, one JSON object per restart, appended once the first step after it finished:

    {"restart": 1,                  # how many restarts this run has had, this one included
     "at": "2026-12-03T10:15:02+00:00",   # when the restarted group started (UTC)
     "resumed_from_step": 200,      # the checkpoint's step; 0 = from scratch
     "steps_lost": 50,              # steps finished before the failure that are computed again
     "recovery_s": 7.9,             # failure -> end of the first step after it; null if unknown
     "world_size": 2,               # workers of the restarted group
     "cause": "fault_injection"}    # or null: not known from inside the workers

A restart that itself fails before finishing a step leaves no line; the next one still counts it.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from raymoe.train.loop import TrainStart

ATTEMPT_FILE = "attempt.json"
LAST_STEP_FILE = "last_step.json"
LAST_STEP_BYTES = 64  # a fixed-size record, padded with spaces (still valid JSON)
RESTARTS_FILE = "restarts.jsonl"
FAULT_INJECTION = "fault_injection"
PARK_TIMEOUT_S = 300.0
"""How long the other ranks wait to be stopped after the injected kill before giving up."""


def read_restarts(run_dir: str) -> list[dict[str, Any]]:
    """Every restart of the run in `run_dir` (storage_path/name), oldest first; [] if none."""
    return read_restarts_since(os.path.join(run_dir, RESTARTS_FILE))


def read_restarts_since(path: str, offset: int = 0) -> list[dict[str, Any]]:
    """The restart records appended to `path` after byte `offset` (all if the file was replaced
    by a shorter one); a line cut short (a worker killed while appending), or not JSON, is skipped."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(offset if offset <= f.tell() else 0)
            data = f.read()
    except OSError:
        return []
    out = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def read_recovery(marker: str) -> dict[str, Any] | None:
    """What fault injection recorded for a run: kill step, rank, recovery_s, steps_lost (or None)."""
    info = _read_json(marker)
    return info if info is not None and "recovery_s" in info else None


def _read_json(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj: dict[str, Any]) -> None:
    # Replaced whole: a worker killed mid-write leaves the previous version, never half of one.
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


class FaultInjector:
    """train.fault_injection on every rank: the kill rank SIGKILLs itself after `at_step`, once per
    run (the marker file, on storage every rank sees, makes it once).

    The other ranks do not run into the dead peer: they wait, outside any collective, for Ray
    Train (or torchrun) to stop them, so Ray reports one dead worker rather than also a
    "connection closed by peer" traceback from each survivor.
    """

    def __init__(self, fault, *, rank: int, world_size: int, marker: str | None, log: Callable[[str], None]):
        self.fault, self.rank, self.world_size, self.marker, self.log = fault, rank, world_size, marker, log
        self.armed = False

    def on_train_start(self, start: TrainStart) -> None:
        pass

    def on_step_begin(self, step: int) -> None:
        # Decided before the step: the kill rank writes the marker only after it, and no rank can
        # finish the step before every rank has started it (its collectives), so all ranks agree.
        if step != self.fault.at_step or self.marker is None or os.path.exists(self.marker):
            return
        if self.fault.kill_rank >= self.world_size:  # an elastic group restarted smaller
            self.log(f"raymoe: fault injection skipped: no worker {self.fault.kill_rank} in a group of {self.world_size}")
            return
        self.armed = True
        self.log(f"raymoe: fault injection: worker {self.fault.kill_rank} will kill itself (SIGKILL) after step {step} "
                 "to show recovery; Ray will print the worker's death below, and the run continues from its last checkpoint")

    def on_step_end(self, step: int) -> None:
        if not self.armed or step != self.fault.at_step:
            return
        self.armed = False
        sys.stdout.flush()
        sys.stderr.flush()
        if self.rank == self.fault.kill_rank:
            os.makedirs(os.path.dirname(self.marker), exist_ok=True)
            _write_json(self.marker, {"killed_at": time.time(), "killed_after_step": step, "rank": self.rank})
            os.kill(os.getpid(), signal.SIGKILL)
        deadline = time.monotonic() + PARK_TIMEOUT_S
        while time.monotonic() < deadline:
            time.sleep(0.5)
        raise RuntimeError(f"fault injection: worker {self.fault.kill_rank} was killed after step {step}, but nothing stopped "
                           f"this worker within {PARK_TIMEOUT_S:.0f} s (Ray Train and torchrun stop a group that lost a worker)")

    def on_train_end(self, step: int) -> None:
        pass


class RestartWatch:
    """Rank 0's record of the run's starts (see the module docstring); every method is a no-op on
    other ranks. Made at the very start of a worker's `train`, before the model is built, so a
    start that fails while building still counts as started."""

    def __init__(self, run_dir: str, run_name: str, *, rank: int, world_size: int, fault_marker: str | None,
                 tracker, log: Callable[[str], None]):
        self.active = rank == 0
        if not self.active:
            return
        self.run_dir, self.run_name, self.world_size = run_dir, run_name, world_size
        self.fault_marker, self.tracker, self.log = fault_marker, tracker, log
        self.attempt_path = os.path.join(run_dir, ATTEMPT_FILE)
        self.previous = _read_json(self.attempt_path)
        self.previous_step = _read_json(os.path.join(run_dir, LAST_STEP_FILE))
        self.is_restart = self.previous is not None and not self.previous.get("finished", False)
        restarts = int(self.previous.get("restarts", 0)) if self.previous else 0
        self.restarts = restarts + 1 if self.is_restart else restarts
        self.started_at = time.time()
        self.pending: dict[str, Any] | None = None
        self._last_step_fd: int | None = None
        self.attempt = {"restarts": self.restarts, "started_at": self.started_at, "world_size": world_size, "finished": False}
        os.makedirs(run_dir, exist_ok=True)
        _write_json(self.attempt_path, self.attempt)

    def on_train_start(self, start: TrainStart) -> None:
        if not self.active:
            return
        step, checkpoint = start.step, start.checkpoint
        self.attempt.update(resumed_step=step, loaded_at=time.time())
        _write_json(self.attempt_path, self.attempt)
        # Rewritten in place after every step: one pwrite of a fixed-size record (microseconds),
        # not a new file. Cut short by a crash it only loses the failure's time, not the restart.
        self._last_step_fd = os.open(os.path.join(self.run_dir, LAST_STEP_FILE), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        if checkpoint is not None or self.is_restart:
            # A deliberate continuation logs the checkpoint's resume count, as before restarts were tracked.
            self.tracker.log_metrics({"elastic/restarts": self.restarts if self.is_restart else start.resumes,
                                      "elastic/world_size": self.world_size, "elastic/expert_degree": start.expert_degree}, step=step)
        if not self.is_restart:
            return
        prev = self.previous
        marker = _read_json(self.fault_marker)
        # The injected kill explains this restart if it happened during the previous start.
        by_fault = marker is not None and marker.get("killed_at", 0) >= prev.get("started_at", 0)
        last = self.previous_step if (self.previous_step or {}).get("at", 0) >= prev.get("started_at", 0) else None
        if by_fault:
            failed_at, last_step = marker["killed_at"], marker["killed_after_step"]
            timed_from = f"worker {marker['rank']} killed by fault injection after step {last_step}"
        elif last is not None:
            # The cause is not known in here; the best known time is the previous start's last step.
            failed_at, last_step = last["at"], last["step"]
            timed_from = "timed from the end of the last step before it"
        else:
            failed_at, last_step = prev.get("loaded_at"), prev.get("resumed_step")
            timed_from = "timed from when the previous start had loaded, before its first step"
        last_step = step if last_step is None else int(last_step)
        self.pending = {"restart": self.restarts, "at": _iso(self.started_at), "resumed_from_step": step,
                        "steps_lost": max(0, last_step - step), "recovery_s": None, "world_size": self.world_size,
                        "cause": FAULT_INJECTION if by_fault else None,
                        "_failed_at": failed_at, "_timed_from": timed_from, "_checkpoint": checkpoint,
                        "_marker": marker if by_fault else None}

    def on_step_begin(self, step: int) -> None:
        pass

    def on_step_end(self, step: int) -> None:
        if not self.active:
            return
        now = time.time()
        os.pwrite(self._last_step_fd, json.dumps({"step": step, "at": now}).ljust(LAST_STEP_BYTES).encode(), 0)
        if self.pending is not None:
            self._report_restart(now)

    def on_train_end(self, step: int) -> None:
        if not self.active:
            return
        if self.pending is not None:  # resumed at its last step: nothing ran, recovery unmeasured
            self._report_restart(None)
        if self._last_step_fd is not None:
            os.close(self._last_step_fd)
            self._last_step_fd = None
        self.attempt.update(finished=True, finished_at=time.time())
        _write_json(self.attempt_path, self.attempt)

    def _report_restart(self, first_step_at: float | None) -> None:
        p, self.pending = self.pending, None
        failed_at, timed_from = p.pop("_failed_at"), p.pop("_timed_from")
        checkpoint, marker = p.pop("_checkpoint"), p.pop("_marker")
        if first_step_at is not None and failed_at is not None:
            p["recovery_s"] = round(first_step_at - failed_at, 3)
        step = p["resumed_from_step"]
        where = f"resumed from step {step} (checkpoint {checkpoint})" if checkpoint else "from scratch (no checkpoint yet)"
        took = (f"recovered in {p['recovery_s']:.1f} s since the failure ({timed_from})" if p["recovery_s"] is not None
                else "no step left to run" if first_step_at is None
                else "recovery time unknown (the previous start failed while loading)")
        self.log(f"raymoe: restart {p['restart']} of run {self.run_name}: {where}; {_count(p['steps_lost'], 'step')} lost; "
                 f"{took}; now {_count(p['world_size'], 'worker')}")
        metrics = {"elastic/steps_lost": p["steps_lost"]}
        if p["recovery_s"] is not None:
            metrics["elastic/recovery_s"] = p["recovery_s"]
        self.tracker.log_metrics(metrics, step=step)
        with open(os.path.join(self.run_dir, RESTARTS_FILE), "a") as f:
            f.write(json.dumps(p) + "\n")
        if marker is not None and "recovery_s" not in marker and p["recovery_s"] is not None:
            # What `raymoe train` prints at the end of a run with fault injection (read_recovery).
            _write_json(self.fault_marker, {**marker, "resumed_from_step": step, "steps_lost": p["steps_lost"],
                                            "recovery_s": p["recovery_s"]})
