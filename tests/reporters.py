"""A training-loop reporter for tests that run the loop without Ray (tests/unit, tests/gpu)."""

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
