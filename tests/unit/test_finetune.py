"""Fine-tuning with LoRA through the real training loop, one process, no Ray: checkpoints hold only
what trains, resume is exact, the base is checked, and every way of reading the result (merged
source, exported model directory) gives base + adapters."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from safetensors import safe_open

from raymoe.config import config_from_dict
from raymoe.model.lora import apply_lora, is_adapter
from raymoe.model.transformer import MoETransformer
from raymoe.model_dir import ModelSourceError, export_model_dir, open_model, write_model_dir
from raymoe.parallel.checkpoint import BaseModelChanged, checkpoint_tensor, read_manifest
from raymoe.train.data import prepare_run_data
from raymoe.train.loop import DistInfo, train
from reporters import KeepingReporter

MODEL = {"hidden_size": 48, "num_layers": 2, "num_heads": 4, "max_seq_len": 64, "num_experts": 4, "top_k": 2,
         "expert_intermediate_size": 32, "first_k_dense_layers": 1, "dense_intermediate_size": 96,
         "balance": {"bias_update_rate": 0.01}}
TRAIN = {"steps": 8, "batch_size": 4, "seq_len": 32, "lr": 1e-2, "warmup_steps": 0, "log_every": 2, "val_every": 4,
         "val_batches": 1, "checkpoint_every": 4, "sample_tokens": 0}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    cfg = config_from_dict({"name": "base", "output_dir": str(root), "model": MODEL, "train": TRAIN})
    model = MoETransformer(cfg.model)
    model.init_weights(seed=3)
    write_model_dir(str(root / "model"), cfg, model.state_dict().items())
    return str(root / "model")


def _cfg(tmp_path, base, train=None, **lora):
    return config_from_dict({"name": "ft", "output_dir": str(tmp_path), "model": {"init_from": base},
                             "lora": {"rank": 4, "alpha": 8, "targets": ["attention", "dense_ffn", "shared_experts",
                                                                         "routed_experts"], **lora},
                             "train": {**TRAIN, **(train or {})}, "data": {"max_bytes": 300_000}})


def test_a_lora_run_saves_only_adapters_resumes_exactly_and_merges_into_its_base(tmp_path, base_dir):
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, base_dir, train={"checkpoint_every": 3})  # checkpoints at steps 3, 6 and 8
    corpus = prepare_run_data(cfg).dir
    info = DistInfo(0, 1, torch.device("cpu"))
    straight = KeepingReporter(tmp_path / "a")
    train(cfg, corpus_dir=corpus, reporter=straight, info=info)
    ckpt = straight.checkpoint(8)

    # Only adapters and the buffers (selection biases) are saved, moments only for adapters.
    with safe_open(os.path.join(ckpt, "dense.safetensors"), "pt") as f:
        keys = set(f.keys())
    weights = {k for k in keys if not k.startswith("opt/")}
    assert weights and all(is_adapter(k) or k.endswith("expert_bias") for k in weights), weights
    assert {k.split("/")[1] for k in keys if k.startswith("opt/")} <= {k for k in weights if is_adapter(k)}
    ckpt_bytes = sum(os.path.getsize(os.path.join(ckpt, n)) for n in os.listdir(ckpt))
    base_bytes = os.path.getsize(os.path.join(base_dir, "model.safetensors"))
    assert ckpt_bytes < base_bytes / 2, (ckpt_bytes, base_bytes)
    assert read_manifest(ckpt)["state"]["extra"]["base"]["init_from"] == base_dir
    # The base's bias_update_rate (0.01) kept moving the selection bias, and the checkpoint holds it: after
    # an odd number of steps of +-0.01 an expert's bias cannot be back at 0 (after an even number it can).
    bias = checkpoint_tensor(straight.checkpoint(3), read_manifest(straight.checkpoint(3)), "layers.1.ffn.router.expert_bias")
    assert float(bias.abs().min()) > 0

    # Resume from the step-6 adapter checkpoint: the same losses as the uninterrupted run.
    resumed = KeepingReporter(tmp_path / "b")
    train(cfg, corpus_dir=corpus, reporter=resumed, resume_dirs=[straight.checkpoint(6)], info=info)
    after = [m["train/loss"] for m, _ in straight.reports if m["train/step"] > 6]
    assert after == pytest.approx([m["train/loss"] for m, _ in resumed.reports], abs=1e-6)
    first = straight.reports[0][0]["train/loss"]
    assert straight.reports[-1][0]["train/loss"] < first  # the adapters learned something

    # Reference: base weights + this checkpoint's adapters in an adapted model, unmerged.
    _, base_model, _, _ = open_model(base_dir)
    ref = MoETransformer(base_model.cfg)
    ref.load_state_dict(base_model.state_dict())
    apply_lora(ref, cfg.lora)
    manifest = read_manifest(ckpt)
    with torch.no_grad():
        for name, p in ref.state_dict().items():
            if name in weights or (is_adapter(name) and ".experts." in name):
                p.copy_(checkpoint_tensor(ckpt, manifest, name))
    ref.eval()
    x = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(x).logits
        base_logits = base_model(x).logits
    assert (expected - base_logits).abs().max() > 1e-3  # the adapters moved the model

    _, merged, _, src = open_model(ckpt)  # what `raymoe serve CKPT` loads: the base with adapters merged
    assert not src.cfg.lora.enabled and "merged" in src.notes[0]
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, expected, rtol=1e-5, atol=1e-5)
    out = export_model_dir(ckpt, str(tmp_path / "merged"), log=lambda m: None)  # `raymoe export --format raymoe`
    _, exported, _, _ = open_model(out.path)
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_changed_base_is_refused_on_resume_and_on_read(tmp_path, base_dir):
    import shutil

    base = str(tmp_path / "base-copy")
    shutil.copytree(base_dir, base)
    cfg = _cfg(tmp_path, base, targets=["attention"])
    # Routing-bias updates off for the fine-tune, merged into the base's balancing settings.
    cfg = config_from_dict({**cfg.to_dict(), "model": {"init_from": base, "balance": {"bias_update_rate": 0.0}}})
    assert cfg.model.balance.bias_update_rate == 0.0 and cfg.model.balance == dataclasses.replace(
        config_from_dict({"model": MODEL, "train": TRAIN}).model.balance, bias_update_rate=0.0)
    corpus = prepare_run_data(cfg).dir
    info = DistInfo(0, 1, torch.device("cpu"))
    rep = KeepingReporter(tmp_path / "a")
    train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4)), corpus_dir=corpus, reporter=rep, info=info)
    manifest = read_manifest(rep.checkpoint(4))
    assert float(checkpoint_tensor(rep.checkpoint(4), manifest, "layers.1.ffn.router.expert_bias").abs().max()) == 0.0
    assert rep.reports[-1][0]["memory/optimizer_state_bytes"] > 0
    # Another model written over the base (same shapes, other weights).
    other = MoETransformer(cfg.model)
    other.init_weights(seed=99)
    shutil.rmtree(base)
    write_model_dir(base, config_from_dict({"name": "b", "model": MODEL, "train": TRAIN}), other.state_dict().items())
    with pytest.raises(BaseModelChanged, match="model.init_from now has"):
        train(cfg, corpus_dir=corpus, reporter=KeepingReporter(tmp_path / "b"), resume_dirs=[rep.checkpoint(4)], info=info)
    with pytest.raises(ModelSourceError, match="the base model changed since training"):
        open_model(rep.checkpoint(4))


def test_tune_searches_the_lora_keys(tmp_path, base_dir):
    from raymoe.tune import apply_params

    cfg = config_from_dict({"name": "search", "output_dir": str(tmp_path), "model": {"init_from": base_dir},
                            "lora": {"rank": 4}, "train": TRAIN,
                            "tune": {"space": {"lora.rank": {"choice": [2, 8]}, "lora.alpha": {"uniform": [4, 32]},
                                               "train.lr": {"loguniform": [1e-4, 1e-2]}}}})
    trial = apply_params(cfg.to_dict(), {"lora.rank": 8, "lora.alpha": 20.0, "train.lr": 3e-3}, "trial 1")
    assert (trial.lora.rank, trial.lora.scale, trial.train.lr) == (8, 2.5, 3e-3)
    assert trial.model_hash() != cfg.model_hash()  # another adapter shape: its checkpoints are its own


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_lora_sft_on_a_hugging_face_checkpoint_exports_merged_weights_that_transformers_loads(tmp_path):
    """The path a user takes: a Hugging Face MoE and its tokenizer (with its own chat template),
    LoRA on instruction data, `raymoe export` back to Hugging Face: from_pretrained gives the logits
    of base + adapters."""
    import json

    from transformers import AutoModelForCausalLM

    from raymoe.model_dir import export_hf
    from tiny_hf import save

    hf_dir, original = save("DeepseekV3ForCausalLM", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    with open(tmp_path / "chats.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"count to {i % 5 + 2}"},
                                             {"role": "assistant", "content": " ".join(str(k) for k in range(1, i % 5 + 3))}]}) + "\n")
    cfg = config_from_dict({
        "name": "hf-ft", "output_dir": str(tmp_path / "out"), "model": {"init_from": hf_dir},
        "lora": {"rank": 4, "alpha": 8, "targets": ["attention", "dense_ffn", "shared_experts", "routed_experts"]},
        "train": {**TRAIN, "steps": 4, "seq_len": 64, "checkpoint_every": 4},
        "data": {"format": "sft", "source": str(tmp_path / "chats.jsonl"), "val_fraction": 0.2},
    })
    corpus = prepare_run_data(cfg)
    assert corpus.manifest["tokenizer"].startswith("hf-")  # the checkpoint's tokenizer and its template
    rep = KeepingReporter(tmp_path / "r")
    train(cfg, corpus_dir=corpus.dir, reporter=rep, info=DistInfo(0, 1, torch.device("cpu")))

    export_hf(rep.checkpoint(4), str(tmp_path / "export"), log=lambda m: None)
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    assert type(exported).__name__ == "DeepseekV3ForCausalLM"
    assert "chat_template" in json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())
    _, merged, _, _ = open_model(rep.checkpoint(4))
    x = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, ours, before = exported(x).logits, merged(x).logits, original.eval()(x).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert (theirs - before).abs().max() > 1e-3  # the adapters are in the exported weights


def test_full_fine_tuning_with_frozen_parts_leaves_them_exactly_as_the_base_had_them(tmp_path, base_dir):
    cfg = config_from_dict({"name": "frozen", "output_dir": str(tmp_path), "model": {"init_from": base_dir},
                            "train": {**TRAIN, "steps": 4, "checkpoint_every": 4, "freeze": ["embeddings", "router"]},
                            "data": {"max_bytes": 300_000}})
    rep = KeepingReporter(tmp_path / "r")
    train(cfg, corpus_dir=prepare_run_data(cfg).dir, reporter=rep, info=DistInfo(0, 1, torch.device("cpu")))
    ckpt = rep.checkpoint(4)
    manifest = read_manifest(ckpt)
    _, base, _, _ = open_model(base_dir)
    own = base.state_dict()
    for name in ("embed.weight", "lm_head.weight", "layers.1.ffn.router.weight"):
        assert torch.equal(checkpoint_tensor(ckpt, manifest, name), own[name]), name
    for name in ("layers.0.attn.wq.weight", "layers.1.ffn.experts.w13"):
        assert not torch.equal(checkpoint_tensor(ckpt, manifest, name), own[name]), name
    with safe_open(os.path.join(ckpt, "dense.safetensors"), "pt") as f:
        assert "opt/embed.weight/exp_avg" not in f.keys() and "opt/layers.0.attn.wq.weight/exp_avg" in f.keys()
