"""bench/expert_hop.py --tiny: every part of a routed-serving hop is timed, at the call sizes stated."""

import importlib.util
import json
from pathlib import Path

import pytest

# Multi-process or subprocess runs, seconds each: `make test-fast` skips them.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_expert_hop_bench_times_the_channel_round_trip(tmp_path):
    spec = importlib.util.spec_from_file_location("expert_hop", ROOT / "bench" / "expert_hop.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "hop.json"
    assert bench.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    points = result["shapes"]["tiny"]
    assert [p["rows"] for p in points] == list(bench.ROWS)
    for p in points:
        assert p["bytes"] == p["rows"] * 64 * 4  # fp32 on CPU
        assert p["channel_round_trip_ms"] > 0 and p["device_copy_ms"] > 0
        assert p["host_round_trip_ms"] == 0.0  # a CPU router has nothing to copy
