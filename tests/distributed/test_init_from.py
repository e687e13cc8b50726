"""Training from a Hugging Face checkpoint (model.init_from), multi-process with gloo, no Ray: the
real training loop at expert degree 2 starts from exactly transformers' loss on the same batch, so
every rank loaded its part of the imported weights (its own experts only) correctly. (One process:
tests/unit/test_hf.py, for every architecture.)"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gloo import free_port, spawn, train_and_record
from raymoe.config import config_from_dict
from raymoe.tokenizer import tokenizer_for
from raymoe.train.data import BatchIterator, prepare_corpus
from tiny_hf import SAMPLE_TEXT, save

# Multi-process or subprocess runs, seconds each: `make test-fast` skips them.
pytestmark = pytest.mark.slow

GLOBAL_BATCH = 4


def _cfg(out_dir, hf_dir, corpus, world):
    return config_from_dict({
        "name": "init-from", "output_dir": str(out_dir),
        "model": {"init_from": hf_dir, "max_seq_len": 64},
        "scaling": {"num_workers": world},
        "train": {"steps": 1, "batch_size": GLOBAL_BATCH // world, "seq_len": 16, "lr": 1e-3, "warmup_steps": 0,
                  "log_every": 1, "val_every": 1000, "val_batches": 1, "checkpoint_every": 1000, "sample_tokens": 0},
        "data": {"source": corpus, "val_fraction": 0.2},
    })


def test_an_imported_model_starts_from_transformers_loss_at_expert_degree_2(tmp_path):
    hf_dir, ref = save("DeepseekV3ForCausalLM", tmp_path / "hf")
    (tmp_path / "corpus").mkdir()
    with open(tmp_path / "corpus" / "docs.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"# file {i}\n" + SAMPLE_TEXT[i * 7: i * 7 + 160]}) + "\n")
    cfg = _cfg(tmp_path / "out", hf_dir, str(tmp_path / "corpus"), 1)
    corpus = prepare_corpus(cfg.data, cfg.data_cache_dir, cfg.train.seq_len, tokenizer=tokenizer_for(cfg))
    assert corpus.manifest["tokenizer"].startswith("hf-")  # the checkpoint's own tokenizer, not bytes

    x, y = BatchIterator(corpus.tokens("train"), batch_size=GLOBAL_BATCH, seq_len=16, rank=0, world_size=1,
                         seed=0).next_batch()
    with torch.no_grad():
        expected = float(F.cross_entropy(ref(x).logits.flatten(0, 1), y.flatten()))

    out = tmp_path / "losses.json"
    cfg = _cfg(tmp_path / "out", hf_dir, str(tmp_path / "corpus"), 2)
    assert cfg.parallel.expert_degree == "auto"  # 2 ranks, 8 experts: 4 each
    spawn(train_and_record, (2, free_port(), cfg.to_dict(), corpus.dir, str(out), "train/loss"), 2)
    loss = json.loads(out.read_text())["1"]
    assert abs(loss - expected) / expected < 1e-5, (loss, expected)
