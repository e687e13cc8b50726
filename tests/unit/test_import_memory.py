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

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")


def test_peak_memory_of_an_import_stays_near_the_largest_tensor(tmp_path):
    spec = importlib.util.spec_from_file_location("import_memory", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.measure(layers=2, hidden=512, experts=8, expert_hidden=1024, vocab=2048, shard_bytes=16 << 20, work=str(tmp_path))
    assert r["model_mib"] > 100 and r["largest_tensor_mib"] == 16
    # One stacked expert tensor being filled plus one output shard: ~2x the largest tensor.
    assert r["peak_over_baseline_mib"] < 4 * r["largest_tensor_mib"], r
    assert r["peak_over_baseline_mib"] < 0.4 * r["model_mib"], r
