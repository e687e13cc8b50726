"""The training loop's metric windows in 2 processes (gloo, expert degree 2, no Ray): validation's
all-to-all traffic stays out of the next step's `moe/a2a_bytes`."""

from __future__ import annotations

import json
import statistics

import pytest

from gloo import free_port, spawn, train_and_record
from raymoe.config import config_from_dict
from raymoe.train.data import prepare_corpus

# Multi-process or subprocess runs, seconds each: `make test-fast` skips them.
pytestmark = pytest.mark.slow


def make_cfg(out_dir):
    return config_from_dict({
        "name": "a2a",
        "output_dir": str(out_dir),
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_seq_len": 32, "num_experts": 4,
                  "top_k": 2, "expert_intermediate_size": 16, "first_k_dense_layers": 0},
        "scaling": {"num_workers": 2},
        # Four validation micro-batches per training micro-batch: counted, they would make the
        # step after each validation five times the others.
        "train": {"steps": 12, "batch_size": 2, "seq_len": 16, "lr": 3e-3, "warmup_steps": 1, "log_every": 1,
                  "val_every": 3, "val_batches": 4, "checkpoint_every": 1000, "sample_tokens": 0},
        "data": {"max_bytes": 200_000},
    })


def test_a2a_bytes_show_no_spike_after_validation(tmp_path):
    cfg = make_cfg(tmp_path)
    corpus = prepare_corpus(cfg.data, cfg.data_cache_dir, cfg.train.seq_len)
    out = tmp_path / "bytes.json"
    spawn(train_and_record, (2, free_port(), cfg.to_dict(), corpus.dir, str(out), "moe/a2a_bytes"), 2)
    by_step = {int(k): v for k, v in json.loads(out.read_text()).items()}
    assert sorted(by_step) == list(range(1, 13))
    median = statistics.median(by_step.values())
    assert median > 0
    # Steps 4, 7, 10 follow a validation.
    assert all(median / 1.5 <= v <= median * 1.5 for v in by_step.values()), (median, by_step)
