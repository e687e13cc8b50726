"""Stand-ins for what Ray Train and MLflow do, for tests that run the training loop without them
(tests/unit, tests/gpu)."""

from __future__ import annotations

import os
import shutil


class KeepingReporter:
    """Copies every reported checkpoint aside, as Ray Train's storage would."""

    def __init__(self, root):
        self.root = root
        self.reports: list[tuple[dict, str | None]] = []

    def report(self, metrics, checkpoint_dir):
        kept = None
        if checkpoint_dir:
            kept = os.path.join(self.root, f"ckpt-{int(metrics['train/step']):04d}")
            shutil.copytree(checkpoint_dir, kept)
        self.reports.append((dict(metrics), kept))

    def checkpoint(self, step):
        return next(d for m, d in self.reports if d and m["train/step"] == step)


class MergingReporter:
    """For multi-process runs: every rank's metrics by step and, with `keep`, every rank's part of
    each checkpoint copied into one directory per step, as Ray Train merges them."""

    def __init__(self, keep: str | None = None):
        import torch.distributed as dist

        self.keep, self.metrics, self._dist = keep, {}, dist

    def report(self, metrics, checkpoint_dir):
        step = int(metrics["train/step"])
        self.metrics[step] = dict(metrics)
        if checkpoint_dir and self.keep:
            shutil.copytree(checkpoint_dir, f"{self.keep}/step{step}", dirs_exist_ok=True)
        self._dist.barrier()  # nobody deletes its part before every rank has copied


class RecordingTracker:
    """The loop's MLflow tracker, keeping what it was given."""

    run_id = None

    def __init__(self):
        self.logged: list[tuple[dict, int]] = []

    def log_metrics(self, metrics, step):
        self.logged.append((dict(metrics), step))

    def log_artifact(self, *args, **kwargs):
        pass

    def elastic(self) -> dict:
        """elastic/* key -> (value, step) of its last logging."""
        return {k: (v, step) for m, step in self.logged for k, v in m.items() if k.startswith("elastic/")}
