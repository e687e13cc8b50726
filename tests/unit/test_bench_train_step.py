"""bench/train_step.py --tiny, as a user runs it: raymoe and transformers' DeepseekV3 train the same
weights on the same batch, the logits agree before anything is timed, and the JSON holds real figures.

    .venv/bin/python -m pytest tests/unit/test_bench_train_step.py -q
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raymoe.config import model_config_from_section
from raymoe.model.params import train_flops_per_token

# Multi-process or subprocess runs, seconds each: `make test-fast` skips them.
pytestmark = pytest.mark.slow

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "train_step.py"


def test_tiny_train_step_bench_checks_parity_and_reports_real_figures(tmp_path):
    out = tmp_path / "train_step-tiny.json"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--block", "2", "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert elapsed < 90, f"--tiny took {elapsed:.0f}s"
    r = json.loads(out.read_text())
    assert r["schedule"] == "interleaved" and r["block"] == 2  # two steps of each a round, the second timed

    # Every transformers variant that ran matched raymoe's fp32 logits before it was timed.
    assert r["parity"]["passed"] is True
    assert r["parity"]["relative_error"] and all(0 <= e < 1e-4 for e in r["parity"]["relative_error"].values())
    rows = r["implementations"]
    hf = [k for k in rows if k.startswith("transformers[")]
    assert "raymoe" in rows and hf, rows.keys()
    assert {k[len("transformers["):-1] for k in hf} <= set(r["parity"]["relative_error"])

    # FLOPs per token are the model's, from the config the JSON records.
    cfg = model_config_from_section(r["shape"]["model"])
    expected = train_flops_per_token(cfg, r["shape"]["seq_len"])
    assert r["flops_per_token"] == pytest.approx(expected, rel=1e-12)
    for name, row in rows.items():
        assert row["tokens_per_s"] > 0 and row["step_ms_median"] > 0, name
        assert row["tokens_per_s"] == pytest.approx(r["shape"]["tokens_per_step"] / (row["step_ms_median"] / 1e3), rel=1e-9)
        assert row["flops_per_token"] == pytest.approx(expected, rel=1e-12)
        assert 0 < row["mfu"] < 1 and row["achieved_flops_per_s"] == pytest.approx(expected * row["tokens_per_s"], rel=1e-9)
        assert row["peak_memory_bytes"] > row["param_bytes"] > 0 and row["peak_memory_method"]
        assert len(row["step_ms_all"]) == r["steps"]
        # Same weights, same batch, same loss: the first step's cross-entropy agrees (fp32 on CPU).
        assert row["loss_first"] == pytest.approx(rows["raymoe"]["loss_first"], rel=1e-5), name
        assert row["params"] == rows["raymoe"]["params"], name
    assert r["dense_rate"]["flops_per_s"] > 0

    # One ratio per transformers implementation timed, each positive.
    assert set(r["ratios"]) == set(hf)
    for name, ratio in r["ratios"].items():
        assert min(ratio["tokens_per_s"], ratio["tokens_per_s_best"], ratio["step_time"], ratio["peak_memory"]) > 0, name
        assert ratio["tokens_per_s"] == pytest.approx(rows["raymoe"]["tokens_per_s"] / rows[name]["tokens_per_s"])
        # the per-round ratio of the interleaved schedule (CPU default): step i of both ran in round i
        per_round = [t / b for t, b in zip(rows[name]["step_ms_all"], rows["raymoe"]["step_ms_all"])]
        assert min(per_round) <= ratio["tokens_per_s_paired"] <= max(per_round)
        assert ratio["tokens_per_s_paired"] == pytest.approx(statistics.median(per_round))
