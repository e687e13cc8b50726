"""`raymoe import` streams: its peak resident memory tracks the largest tensor, not the model
(bench/import_memory.py measures it at 3.4 GB; docs/models.md has the figures).

    .venv/bin/python -m pytest tests/unit/test_import_memory.py -q
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "import_memory.py"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")]


def test_peak_memory_of_an_import_stays_near_the_largest_tensor(tmp_path):
    spec = importlib.util.spec_from_file_location("import_memory", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.measure(layers=7, hidden=512, experts=8, expert_hidden=1024, vocab=2048, shard_bytes=16 << 20, work=str(tmp_path))
    bound = 5 * r["largest_tensor_mib"]
    # The bound is far below the model: an import that held the model (or a shard's mapped pages
    # per tensor read) would exceed it.
    assert r["largest_tensor_mib"] == 32 and r["model_mib"] > 2 * bound
    # One stacked expert tensor being filled plus one output shard: ~2-3x the largest tensor.
    assert r["peak_over_baseline_mib"] < bound, r
