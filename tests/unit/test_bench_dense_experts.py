"""bench/dense_experts.py --tiny: both paths agree and get timed (the crossover behind MoE.dense_max_tokens)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Multi-process or subprocess runs, seconds each: `make test-fast` skips them.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_dense_experts_bench_checks_agreement_and_times_both_paths(tmp_path):
    out = tmp_path / "dense.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "dense_experts.py"), "--tiny", "--out", str(out)], check=True,
                   capture_output=True, text=True, timeout=120)
    rows = json.loads(out.read_text())["rows"]
    assert [r["tokens"] for r in rows] == [1, 4, 16]
    for r in rows:
        assert r["rel_err"] < 1e-5 and r["grouped_us"] > 0 and r["dense_us"] > 0
        assert abs(r["dense_speedup"] - r["grouped_us"] / r["dense_us"]) < 1e-9
