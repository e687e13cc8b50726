"""Restarts are visible (train/faults.py): a start that finds the previous one unfinished prints
one `raymoe: restart` line, logs elastic/* at the resumed step and appends to restarts.jsonl;
fault injection announces its kill and really SIGKILLs the worker. One process, no Ray: a
"failure" is an exception from a step callback, or the injected SIGKILL in a subprocess."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from raymoe.config import config_from_dict
from raymoe.train.data import prepare_corpus
from raymoe.train.faults import RESTARTS_FILE, read_recovery, read_restarts
from raymoe.train.loop import DistInfo, train
from reporters import KeepingReporter, RecordingTracker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEYS = {"restart", "at", "resumed_from_step", "steps_lost", "recovery_s", "world_size", "cause"}
CPU = DistInfo(0, 1, torch.device("cpu"))


def tiny_cfg(tmp_path, **train):
    return config_from_dict({
        "name": "restarts",
        "output_dir": str(tmp_path),
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_seq_len": 32, "num_experts": 4,
                  "top_k": 2, "expert_intermediate_size": 16, "first_k_dense_layers": 1, "dense_intermediate_size": 32},
        "train": {"steps": 10, "batch_size": 2, "seq_len": 16, "lr": 3e-3, "warmup_steps": 1, "log_every": 2,
                  "val_every": 5, "val_batches": 1, "checkpoint_every": 5, "sample_tokens": 0, **train},
        "data": {"max_bytes": 200_000},
    })


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    cfg = tiny_cfg(tmp_path_factory.mktemp("corpus"))
    return prepare_corpus(cfg.data, cfg.data_cache_dir, cfg.train.seq_len).dir


class Crash(Exception):
    pass


class CrashAfter:
    """A step callback that fails the run after `step`, as a lost worker would."""

    def __init__(self, step):
        self.step = step

    def on_train_start(self, start):
        pass

    def on_step_begin(self, step):
        pass

    def on_step_end(self, step):
        if step == self.step:
            raise Crash(step)

    def on_train_end(self, step):
        pass




def restart_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("raymoe: restart")]


def test_a_worker_lost_before_the_first_checkpoint_restarts_from_scratch_and_says_so(tmp_path, corpus_dir, capsys):
    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(Crash):
        train(cfg, corpus_dir=corpus_dir, reporter=KeepingReporter(tmp_path / "a"), info=CPU, callbacks=[CrashAfter(3)])
    assert restart_lines(capsys.readouterr().out) == []  # a first start is not a restart

    tracker = RecordingTracker()
    result = train(cfg, corpus_dir=corpus_dir, reporter=KeepingReporter(tmp_path / "b"), tracker=tracker, info=CPU)
    assert result.step == 10
    (line,) = restart_lines(capsys.readouterr().out)
    assert line.startswith("raymoe: restart 1 of run restarts: from scratch (no checkpoint yet); 3 steps lost; recovered in "), line
    assert "since the failure (timed from the end of the last step before it); now 1 worker" in line

    (record,) = read_restarts(os.path.join(cfg.storage_path, cfg.name))
    assert set(record) == KEYS
    assert {k: record[k] for k in KEYS - {"at", "recovery_s"}} == {
        "restart": 1, "resumed_from_step": 0, "steps_lost": 3, "world_size": 1, "cause": None}
    assert 0 < record["recovery_s"] < 60
    assert datetime.datetime.fromisoformat(record["at"]).tzinfo is not None
    # MLflow (the tracker) gets them at the resumed step: step 0 here.
    elastic = tracker.elastic()
    assert elastic["elastic/restarts"] == (1, 0) and elastic["elastic/steps_lost"] == (3, 0)
    assert elastic["elastic/recovery_s"] == (record["recovery_s"], 0) and elastic["elastic/world_size"] == (1, 0)


def test_restarts_resume_from_the_last_checkpoint_are_numbered_and_a_finished_run_continued_is_not_one(tmp_path, corpus_dir, capsys):
    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path)
    run_dir = os.path.join(cfg.storage_path, cfg.name)
    first = KeepingReporter(tmp_path / "a")
    with pytest.raises(Crash):
        train(cfg, corpus_dir=corpus_dir, reporter=first, info=CPU, callbacks=[CrashAfter(7)])
    ckpt5 = first.checkpoint(5)
    with pytest.raises(Crash):
        train(cfg, corpus_dir=corpus_dir, reporter=KeepingReporter(tmp_path / "b"), resume_dirs=[ckpt5], info=CPU,
              callbacks=[CrashAfter(9)])
    tracker = RecordingTracker()
    last = KeepingReporter(tmp_path / "c")
    train(cfg, corpus_dir=corpus_dir, reporter=last, tracker=tracker, resume_dirs=[ckpt5], info=CPU)

    lines = restart_lines(capsys.readouterr().out)
    assert len(lines) == 2
    assert lines[0].startswith(f"raymoe: restart 1 of run restarts: resumed from step 5 (checkpoint {ckpt5}); 2 steps lost; ")
    assert lines[1].startswith(f"raymoe: restart 2 of run restarts: resumed from step 5 (checkpoint {ckpt5}); 4 steps lost; ")
    records = read_restarts(run_dir)
    assert [(r["restart"], r["resumed_from_step"], r["steps_lost"], r["cause"]) for r in records] == [(1, 5, 2, None), (2, 5, 4, None)]
    assert tracker.elastic()["elastic/restarts"] == (2, 5) and tracker.elastic()["elastic/steps_lost"] == (4, 5)

    # Finished, then continued on purpose (more steps, or a resumed search): not a restart.
    more = config_from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "steps": 12}})
    tracker = RecordingTracker()
    train(more, corpus_dir=corpus_dir, reporter=KeepingReporter(tmp_path / "d"), tracker=tracker,
          resume_dirs=[last.checkpoint(10)], info=CPU)
    assert restart_lines(capsys.readouterr().out) == []
    assert len(read_restarts(run_dir)) == 2
    # As before restarts were tracked: a resume logs the checkpoint's count of resumes.
    assert tracker.elastic() == {"elastic/restarts": (2, 10), "elastic/world_size": (1, 10), "elastic/expert_degree": (1, 10)}


KILLED_RUN = """
import json, sys
import torch
from raymoe.config import config_from_dict
from raymoe.train.loop import DistInfo, train
from reporters import KeepingReporter

cfg = config_from_dict(json.loads(sys.argv[1]))
torch.set_num_threads(1)
train(cfg, corpus_dir=sys.argv[2], reporter=KeepingReporter(sys.argv[3]), info=DistInfo(0, 1, torch.device("cpu")),
      fault_marker=sys.argv[4])
"""


@pytest.mark.slow
def test_fault_injection_announces_the_kill_really_kills_and_the_restart_names_it(tmp_path, corpus_dir, capsys):
    cfg = tiny_cfg(tmp_path, log_every=1, fault_injection={"kill_rank": 0, "at_step": 3})
    marker = os.path.join(cfg.storage_path, cfg.name, "fault_injected.json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "platform"), os.path.join(ROOT, "tests")])}
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(cfg.to_dict()), corpus_dir, str(tmp_path / "a"), marker],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    # Said before the step that ends in the kill; nothing of that step is logged.
    assert lines[-2].startswith("step     2/10")
    assert lines[-1] == ("raymoe: fault injection: worker 0 will kill itself (SIGKILL) after step 3 to show recovery; "
                         "Ray will print the worker's death below, and the run continues from its last checkpoint")
    with open(marker) as f:
        killed = json.load(f)
    assert killed["killed_after_step"] == 3 and killed["rank"] == 0

    # The restarted worker (same config): the marker says the kill happened, so it does not fire again.
    torch.set_num_threads(1)
    tracker = RecordingTracker()
    train(cfg, corpus_dir=corpus_dir, reporter=KeepingReporter(tmp_path / "b"), tracker=tracker, info=CPU, fault_marker=marker)
    out = capsys.readouterr().out
    (line,) = restart_lines(out)
    assert line.startswith("raymoe: restart 1 of run restarts: from scratch (no checkpoint yet); 3 steps lost; recovered in ")
    assert "(worker 0 killed by fault injection after step 3)" in line
    assert "fault injection" not in out.replace(line, "")
    (record,) = read_restarts(os.path.join(cfg.storage_path, cfg.name))
    assert record["cause"] == "fault_injection" and record["steps_lost"] == 3 and record["recovery_s"] > 0
    # What `raymoe train` prints at the end of a fault-injection run.
    assert read_recovery(marker) == {**killed, "resumed_from_step": 0, "steps_lost": 3, "recovery_s": record["recovery_s"]}
    assert tracker.elastic()["elastic/recovery_s"] == (record["recovery_s"], 0)


def test_read_restarts_skips_a_line_cut_short_and_is_empty_without_restarts(tmp_path):
    assert read_restarts(str(tmp_path)) == []
    line = {"restart": 1, "at": "2026-12-03T10:00:00+00:00", "resumed_from_step": 0, "steps_lost": 3, "recovery_s": None,
            "world_size": 2, "cause": None}
    with open(tmp_path / RESTARTS_FILE, "w") as f:
        f.write(json.dumps(line) + "\n" + '{"restart": 2, "at": "2026-')
    assert read_restarts(str(tmp_path)) == [line]
