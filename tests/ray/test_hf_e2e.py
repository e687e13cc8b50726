"""A Hugging Face checkpoint end to end on the session's local Ray, as a user runs it: `raymoe
import`, two expert-parallel training steps on Ray Train with model.init_from (its own BPE
tokenizer, routing bias carried over), the result registered in MLflow and served routed over HTTP;
the served greedy completion equals transformers' `generate` on the exported trained weights."""

from __future__ import annotations

import json
import os

import httpx
import pytest
import torch

from raymoe.config import config_from_dict
from raymoe.model_dir import export_hf, import_hf, open_source
from raymoe.ray_train import run_training
from raymoe.tokenizer import HFTokenizer
from tiny_hf import SAMPLE_TEXT, save

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_imported_deepseek_trains_expert_parallel_then_serves_what_transformers_generates(ray_cluster, serve_url, tmp_path):
    from ray import serve
    from transformers import AutoModelForCausalLM

    from raymoe.serve.deployments import build_app
    from raymoe.serve.settings import ServeSettings

    hf_dir, _ = save("DeepseekV3ForCausalLM", tmp_path / "hf")
    imported = import_hf(hf_dir, str(tmp_path / "model"), log=lambda m: None)
    bias_before = imported.tensor("layers.1.ffn.router.expert_bias")
    assert bias_before.abs().sum() > 0  # DeepSeek's correction bias came along

    (tmp_path / "corpus").mkdir()
    with open(tmp_path / "corpus" / "docs.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": SAMPLE_TEXT[i * 5: i * 5 + 200]}) + "\n")
    cfg = config_from_dict({
        "name": "hf-e2e", "output_dir": str(tmp_path / "out"),
        "model": {"init_from": str(tmp_path / "model"), "max_seq_len": 64},
        "scaling": {"num_workers": 2}, "parallel": {"expert_degree": 2},
        "train": {"steps": 2, "batch_size": 2, "seq_len": 32, "lr": 1e-3, "warmup_steps": 0, "log_every": 1,
                  "val_every": 2, "val_batches": 1, "checkpoint_every": 2, "sample_prompt": "def ", "sample_tokens": 4},
        "data": {"source": str(tmp_path / "corpus"), "val_fraction": 0.2},
        "tracking": {"experiment": "hf-e2e", "registered_model": "tiny-deepseek"},
    })
    outcome = run_training(cfg)
    assert outcome.step == 2 and outcome.train_loss is not None and outcome.registered_model
    trained = open_source(outcome.checkpoint_path)
    assert torch.equal(trained.tensor("layers.1.ffn.router.expert_bias"), bias_before)  # rate 0 for imports: kept
    assert not torch.equal(trained.tensor("layers.1.ffn.experts.w13"), imported.tensor("layers.1.ffn.experts.w13"))

    # Serve what MLflow registered (weights, config and tokenizer travel together), routed.
    settings = ServeSettings.of(outcome.registered_model, tracking_uri=outcome.tracking_uri, mode="routed",
                             num_groups=2, router_cpus=0.5, group_cpus=0.25)
    serve.run(build_app(settings), name="hf", route_prefix="/hf")
    prompt = "def add(a, b):"
    with httpx.Client(timeout=120) as http:
        out = http.post(f"{serve_url}/hf/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
    tok = HFTokenizer(str(tmp_path / "model"))
    assert out["usage"]["prompt_tokens"] == len(tok.encode(prompt))

    # The same trained weights through transformers: export the run (its newest checkpoint), load, generate.
    export_hf(os.path.join(cfg.storage_path, cfg.name), str(tmp_path / "exported"), log=lambda m: None)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported")).eval()
    ids = torch.tensor([tok.encode(prompt)])
    gen = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    new = gen[0, ids.shape[1]:].tolist()
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    assert len(new) > 0 and out["usage"]["completion_tokens"] == len(new)
    assert out["choices"][0]["text"] == tok.decode(new)
    serve.delete("hf")
