"""bench/dense_experts.py --tiny: the three inference paths agree and get timed, and each row says which one MoE.routed takes."""

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
        assert r["rel_err"] < 1e-5 and r["grouped_us"] > 0 and r["dense_us"] > 0 and r["padded_us"] > 0
        assert abs(r["dense_speedup"] - r["grouped_us"] / r["dense_us"]) < 1e-9
        assert abs(r["padded_speedup"] - r["grouped_us"] / r["padded_us"]) < 1e-9
        assert r["fastest"] == min(("grouped", "dense", "padded"), key=lambda k: r[f"{k}_us"])
        assert r["padding"] == 8 * r["capacity"] / (r["tokens"] * 2) and r["capacity"] <= r["tokens"]
    # The tiny MoE (8 experts, top-2): one token touches 2 of 8, which the grouped GEMM reads alone;
    # 4 tokens at C = 3 are 24 padded rows against 0.7 x 32 dense ones; 16 tokens pad little.
    assert [r["chosen"] for r in rows] == ["grouped", "dense", "padded"]
