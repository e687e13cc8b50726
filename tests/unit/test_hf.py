"""model/hf.py and model_dir.py against transformers' own implementations: tiny random models of
every supported architecture, built offline from configs (tests/tiny_hf.py), in fp32.

    .venv/bin/python -m pytest tests/unit/test_hf.py -q
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from raymoe.model import hf
from raymoe.model.transformer import MoETransformer
from raymoe.model_dir import export_hf, import_hf, load_weights, open_source
from raymoe.serve.engine import Engine, SamplingParams
from tiny_hf import ALL, CONFIGS, save

pytest.importorskip("transformers")

RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _tokens(B=2, S=40, seed=0):
    return torch.randint(3, 320, (B, S), generator=torch.Generator().manual_seed(seed))


def _raymoe(path) -> MoETransformer:
    src = open_source(str(path))
    model = MoETransformer(src.cfg.model)
    load_weights(model, src)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every tiny model of ALL saved once: name -> (directory, transformers model)."""
    out = {}
    for name in ALL:
        out[name] = save(name, tmp_path_factory.mktemp(name))
    return out


@pytest.mark.parametrize("name", list(ALL))
def test_logits_equal_transformers(saved, name):
    path, ref = saved[name]
    x = _tokens()
    with torch.no_grad():
        assert _rel(_raymoe(path)(x).logits, ref(x).logits) < RTOL


def _logits_with(path, **model_changes) -> torch.Tensor:
    import dataclasses

    src = open_source(path)
    model = MoETransformer(dataclasses.replace(src.cfg.model, **model_changes))
    load_weights(model, src)
    with torch.no_grad():
        return model.eval()(_tokens()).logits


@pytest.mark.parametrize("name, wrong", [
    ("DeepseekV3ForCausalLM", {"group_score": "max"}),          # V2's group rule on a V3 model
    ("DeepseekV2-grouped", {"group_score": "top2_sum"}),         # V3's group rule on a V2 model
    ("DeepseekV3ForCausalLM", {"rope_scaling": None}),          # YaRN and its softmax correction ignored
    ("Qwen3MoeForCausalLM", {"norm_topk_prob": False}),
])
def test_a_wrong_rule_would_fail_the_comparison(saved, name, wrong):
    """The tiny models are decisive enough that each mapping rule matters far above RTOL."""
    path, ref = saved[name]
    with torch.no_grad():
        assert _rel(_logits_with(path, **wrong), ref(_tokens()).logits) > 1e-3


def test_the_deepseek_correction_bias_and_rope_permutation_matter(saved):
    path, ref = saved["DeepseekV3ForCausalLM"]
    src = open_source(path)
    with torch.no_grad():
        want = ref(_tokens()).logits
        model = MoETransformer(src.cfg.model)
        load_weights(model, src)
        for moe in model.moe_layers():
            moe.router.expert_bias.zero_()
        assert _rel(model.eval()(_tokens()).logits, want) > 1e-3
        ckpt = hf.HFCheckpoint(path)
        plain = hf.HFSource(ckpt)
        plain.maps = {n: dataclasses.replace(m, kind="copy") if m.kind.startswith("rope") else m
                      for n, m in plain.maps.items()}
        model2 = MoETransformer(src.cfg.model)
        model2.load_state_dict({n: plain.tensor(n) for n in plain.names()})
        assert _rel(model2.eval()(_tokens()).logits, want) > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_decoding_through_the_engine_matches_generate(saved, name):
    path, ref = saved[name]
    cfg, model = open_source(path).cfg, _raymoe(path)
    engine = Engine(model, tokenizer=_NoEos(), max_batch=4, max_len=64)
    prompts = [[5, 9, 31, 7, 200, 11, 3], [44, 12, 90, 17, 18, 250, 6, 71, 33, 2 + 3, 8, 99], [301, 4, 60]]
    reqs = [engine.add_request(p, SamplingParams(max_tokens=10, temperature=0)) for p in prompts]
    while engine.has_work():
        engine.step()
    for p, req in zip(prompts, reqs):
        x = torch.tensor([p])
        # An explicit mask: with a pad id that occurs in the prompt, generate would mask real tokens.
        out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
        assert req.output_ids == out[0, len(p):].tolist(), f"{cfg.name}: prompt of {len(p)}"


class _NoEos:
    """Ids only (no text): the engine decodes deltas, and generate runs without an EOS."""

    eos_id = -1
    eos_ids = frozenset({-1})

    def decode(self, ids):
        return ""

    def encode(self, text):
        raise AssertionError("prompts are ids")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_loads_in_transformers_with_the_same_logits_and_reimport_is_bit_identical(saved, tmp_path, name):
    from transformers import AutoModelForCausalLM

    path, ref = saved[name]
    imported = tmp_path / "imported"
    import_hf(path, str(imported), log=lambda m: None)
    exported = tmp_path / "exported"
    arch = export_hf(str(imported), str(exported), log=lambda m: None)
    assert arch == name
    back = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    assert type(back).__name__ == name
    x = _tokens()
    with torch.no_grad():
        assert _rel(back(x).logits, ref(x).logits) < RTOL
    # The exported tensors are the original ones, bit for bit, rotary permutation undone included.
    original = load_file(os.path.join(path, "model.safetensors"))
    written = load_file(str(exported / "model.safetensors"))
    assert set(written) == set(original)
    assert all(torch.equal(written[k], original[k]) for k in original)
    again = tmp_path / "again"
    import_hf(str(exported), str(again), log=lambda m: None)
    first, second = load_file(str(imported / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
    assert (exported / "tokenizer.json").exists() and (again / "tokenizer.json").exists()


def test_sharded_checkpoint_imports_into_shards_and_reads_experts_lazily(tmp_path):
    path, ref = save("DeepseekV3ForCausalLM", tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    out = tmp_path / "model"
    import_hf(path, str(out), max_shard_bytes=100_000, log=lambda m: None)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    x = _tokens()
    with torch.no_grad():
        assert _rel(_raymoe(out)(x).logits, ref(x).logits) < RTOL
    # An expert-parallel rank owning experts 4..7 reads those rows only, from either format.
    src = open_source(str(out))
    rows = src.tensor("layers.1.ffn.experts.w13", experts=range(4, 8))
    assert torch.equal(rows, src.tensor("layers.1.ffn.experts.w13")[4:8])
    ckpt = hf.HFCheckpoint(path)
    direct = hf.HFSource(ckpt)
    assert torch.equal(direct.tensor("layers.1.ffn.experts.w13", experts=range(4, 8)), rows)
    assert ckpt.reads == [f"model.layers.1.mlp.experts.{e}.{proj}.weight" for proj in ("gate_proj", "up_proj") for e in range(4, 8)]


def test_fp8_block_dequantization_matches_a_hand_computation():
    torch.manual_seed(0)
    w = (torch.randn(300, 200) * 3).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2) + 0.5  # ceil(300/128) x ceil(200/128) blocks
    got = hf.dequantize_fp8(w, scale)
    want = torch.empty(300, 200)
    for i in range(300):
        for j in range(200):
            want[i, j] = float(w[i, j].float()) * float(scale[i // 128, j // 128])
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.bfloat16))
    with pytest.raises(hf.HFError, match="weight_scale_inv has shape"):
        hf.dequantize_fp8(w, torch.ones(2, 2))


def test_an_fp8_deepseek_v3_checkpoint_with_an_mtp_layer_imports_as_bf16(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    path, _ = saved["DeepseekV3ForCausalLM"]
    tensors = load_file(os.path.join(path, "model.safetensors"))
    fp8 = {}
    for k, v in tensors.items():  # quantize every projection as the official release does
        if k.endswith("proj.weight") and v.dim() == 2:
            rows, cols = -(-v.shape[0] // 128), -(-v.shape[1] // 128)
            scale = v.abs().amax().clamp(min=1e-6) / 448 * torch.ones(rows, cols)
            fp8[k] = (v / scale[0, 0]).to(torch.float8_e4m3fn)
            fp8[k + "_scale_inv"] = scale
        else:
            fp8[k] = v
    layers = json.loads(open(os.path.join(path, "config.json")).read())["num_hidden_layers"]
    fp8[f"model.layers.{layers}.eh_proj.weight"] = torch.zeros(4, 4)  # the MTP module: skipped
    q = tmp_path / "fp8"
    q.mkdir()
    save_file(fp8, str(q / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads(open(os.path.join(path, "config.json")).read())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                     "activation_scheme": "dynamic"}
    (q / "config.json").write_text(json.dumps(config))
    notes = []
    src = import_hf(str(q), str(tmp_path / "out"), log=notes.append)
    assert any("multi-token-prediction" in n for n in notes)
    w = src.tensor("layers.0.attn.wq_a.weight")
    k = "model.layers.0.self_attn.q_a_proj.weight"
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, (fp8[k].float() * fp8[k + "_scale_inv"][0, 0]).to(torch.bfloat16))
    # The reference: transformers on the same weights dequantized by hand, as a plain checkpoint.
    plain = tmp_path / "dequantized"
    plain.mkdir()
    hand = {k: (v.float() * fp8[k + "_scale_inv"][0, 0]).to(torch.bfloat16).float() if v.dtype == torch.float8_e4m3fn else v
            for k, v in fp8.items() if not k.endswith("_scale_inv") and ".layers.3." not in k}
    save_file(hand, str(plain / "model.safetensors"), metadata={"format": "pt"})
    (plain / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    ref = AutoModelForCausalLM.from_pretrained(str(plain)).eval()
    with torch.no_grad():
        assert _rel(_raymoe(tmp_path / "out").float()(_tokens()).logits, ref(_tokens()).logits) < RTOL


# ----------------------------------------------------------------------------- one clear error each


def _broken(tmp_path, saved, name="MixtralForCausalLM", config=None, drop=None):
    path, _ = saved[name]
    d = tmp_path / "broken"
    d.mkdir()
    tensors = load_file(os.path.join(path, "model.safetensors"))
    if drop:
        del tensors[drop]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads(open(os.path.join(path, "config.json")).read())
    cfg.update(config or {})
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def test_missing_tensor_is_one_clear_error(tmp_path, saved):
    d = _broken(tmp_path, saved, drop="model.layers.1.block_sparse_moe.experts.2.w3.weight")
    with pytest.raises(hf.HFError, match=r"no tensor model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight"):
        import_hf(d, str(tmp_path / "out"), log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_wrong_shape_is_one_clear_error_and_writes_nothing(tmp_path, saved):
    from raymoe.parallel.checkpoint import CheckpointError

    d = _broken(tmp_path, saved, config={"intermediate_size": 40})
    with pytest.raises(CheckpointError, match=r"layers\.0\.ffn\.experts\.w13 has shape \(4, 64, 96\), the model needs \(4, 64, 80\)"):
        _raymoe(d)
    with pytest.raises(hf.HFError, match=r"layers\.0\.ffn\.experts\.w13 \(from model\.layers\.0\.block_sparse_moe\.experts\.0\.w1"
                                         r"\.weight\) has shape \(4, 64, 96\), but config\.json implies \(4, 64, 80\)"):
        import_hf(d, str(tmp_path / "out"), log=lambda m: None)
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == ["broken"]


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, r"architectures='LlamaForCausalLM' is not supported"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}, r"rope_type='linear' is not supported"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
    ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5 is not supported"),
])
def test_unsupported_settings_name_the_key(tmp_path, saved, change, message):
    d = _broken(tmp_path, saved, config=change)
    with pytest.raises(hf.HFError, match=message):
        open_source(d)


@pytest.mark.parametrize("name, change, message", [
    ("DeepseekV2ForCausalLM", {"norm_topk_prob": True}, r"norm_topk_prob=True is ambiguous"),
    ("DeepseekV3ForCausalLM", {"scoring_func": "softmax"}, r"scoring_func='softmax' is not supported"),
    ("Qwen2MoeForCausalLM", {"use_sliding_window": True}, r"use_sliding_window=True is not supported"),
    ("OlmoeForCausalLM", {"clip_qkv": 8.0}, r"clip_qkv=8.0 is not supported"),
])
def test_architecture_specific_settings_raymoe_cannot_express_are_refused(tmp_path, saved, name, change, message):
    with pytest.raises(hf.HFError, match=message):
        open_source(_broken(tmp_path, saved, name, config=change))


def test_an_unmapped_tensor_is_refused(tmp_path, saved):
    path, _ = saved["MixtralForCausalLM"]
    d = tmp_path / "extra"
    d.mkdir()
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors["model.layers.0.self_attn.sinks"] = torch.zeros(4)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(hf.HFError, match=r"does not account for, e\.g\. model\.layers\.0\.self_attn\.sinks"):
        open_source(str(d))


def test_export_refuses_what_an_architecture_cannot_express(saved, tmp_path):
    path, _ = saved["Qwen2MoeForCausalLM"]
    with pytest.raises(hf.HFError, match="MixtralForCausalLM cannot express model"):
        export_hf(path, str(tmp_path / "out"), architecture="MixtralForCausalLM", log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_parameter_counts_of_an_hf_config_equal_the_built_transformers_model(saved):
    from raymoe.model.params import count_params

    for name, (path, ref) in saved.items():
        cfg = hf.model_config_from_hf(json.loads(open(os.path.join(path, "config.json")).read()))
        assert count_params(cfg).total == sum(p.numel() for p in ref.parameters()), name


class _Losses:
    def __init__(self):
        self.losses = {}

    def report(self, metrics, checkpoint_dir):
        self.losses[int(metrics["train/step"])] = metrics["train/loss"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_architecture_trains_from_its_checkpoint_starting_at_transformers_loss(saved, tmp_path, name):
    """The training loop (one process) with model.init_from: step 1's loss is transformers' loss on
    the same batch, in the checkpoint's own tokenizer; step 2 trains on."""
    import torch.nn.functional as F

    from raymoe.config import config_from_dict
    from raymoe.tokenizer import tokenizer_for
    from raymoe.train.data import BatchIterator, prepare_corpus
    from raymoe.train.loop import DistInfo, train
    from tiny_hf import SAMPLE_TEXT

    path, ref = saved[name]
    (tmp_path / "corpus.txt").write_text(SAMPLE_TEXT * 2)
    cfg = config_from_dict({
        "name": "ft", "output_dir": str(tmp_path), "model": {"init_from": path},
        "train": {"steps": 2, "batch_size": 2, "seq_len": 16, "lr": 1e-2, "warmup_steps": 0, "log_every": 1,
                  "val_every": 100, "val_batches": 1, "checkpoint_every": 100, "sample_tokens": 0},
        "data": {"source": str(tmp_path / "corpus.txt")},
    })
    corpus = prepare_corpus(cfg.data, cfg.data_cache_dir, 16, tokenizer=tokenizer_for(cfg))
    x, y = BatchIterator(corpus.tokens("train"), batch_size=2, seq_len=16, rank=0, world_size=1, seed=0).next_batch()
    with torch.no_grad():
        expected = float(F.cross_entropy(ref(x).logits.flatten(0, 1), y.flatten()))
    reporter = _Losses()
    train(cfg, corpus_dir=corpus.dir, reporter=reporter, info=DistInfo(0, 1, torch.device("cpu")))
    assert reporter.losses[1] == pytest.approx(expected, rel=RTOL)
    assert torch.isfinite(torch.tensor(reporter.losses[2])) and reporter.losses[2] != reporter.losses[1]


@pytest.mark.slow
def test_registered_import_is_an_mlflow_model_that_init_from_and_export_resolve(saved, tmp_path):
    """`raymoe import --register`: the model directory logged to MLflow with its source recorded;
    models:/ then works as model.init_from (architecture from the source) and as export's SOURCE."""
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    from raymoe.config import config_from_dict
    from raymoe.tracking import register_model_dir

    path, ref = saved["OlmoeForCausalLM"]
    import_hf(path, str(tmp_path / "model"), log=lambda m: None)
    uri = "sqlite:///" + str(tmp_path / "mlflow.db")
    registered = register_model_dir(str(tmp_path / "model"), "tiny-olmoe", tracking_uri=uri, source=path)
    assert registered == "models:/tiny-olmoe/1"
    run = MlflowClient(uri).get_run(MlflowClient(uri).get_model_version("tiny-olmoe", "1").run_id)
    assert run.data.tags["raymoe.source"] == path

    cfg = config_from_dict({"model": {"init_from": registered, "max_seq_len": 64}, "train": {"seq_len": 64},
                            "tracking": {"uri": uri}})
    assert cfg.model.qk_norm == "full" and cfg.model.num_experts == 8 and cfg.model.max_seq_len == 64
    with pytest.raises(Exception, match=r"model\.num_experts=4 contradicts model\.init_from"):
        config_from_dict({"model": {"init_from": registered, "num_experts": 4}, "tracking": {"uri": uri}})

    export_hf(registered, str(tmp_path / "exported"), tracking_uri=uri, log=lambda m: None)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported")).eval()
    with torch.no_grad():
        assert _rel(back(_tokens()).logits, ref(_tokens()).logits) < RTOL


# The released config.json files, as published (deepseek-ai/DeepSeek-V3 and DeepSeek-V2-Lite on the
# Hugging Face hub), trimmed of keys that do not describe the architecture.
DEEPSEEK_V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "num_nextn_predict_layers": 1, "attention_bias": False,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
}
DEEPSEEK_V2_LITE_CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
    "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "greedy", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "moe_layer_freq": 1,
    "first_k_dense_replace": 1, "norm_topk_prob": False, "scoring_func": "softmax", "hidden_act": "silu",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "attention_bias": False,
}


def test_the_released_deepseek_configs_map_to_the_published_sizes():
    from raymoe.config import load_config
    from raymoe.model.params import count_params

    v3 = hf.model_config_from_hf(DEEPSEEK_V3_CONFIG)
    configs = Path(__file__).resolve().parents[2] / "jobs" / "configs"
    shipped = load_config(configs / "deepseek-v3.yaml").model
    assert count_params(v3).total == count_params(shipped).total == 671_026_404_352
    assert (v3.num_expert_groups, v3.top_k_groups, v3.group_score, v3.route_scale) == (8, 4, "top2_sum", 2.5)
    assert v3.rope_scaling.factor == 40 and v3.max_seq_len == 163840
    # m = 0.1 * mscale_all_dim * ln(40) + 1 = 1.369; the softmax scale gains m^2 = 1.874 (REFERENCE.md).
    assert v3.rope_scaling.mla_softmax_multiplier == pytest.approx(1.874, rel=1e-3)
    lite = hf.model_config_from_hf(DEEPSEEK_V2_LITE_CONFIG)
    assert count_params(lite).total == count_params(load_config(configs / "deepseek-v2-lite.yaml").model).total
    assert lite.q_lora_rank == 0 and lite.num_expert_groups == 1 and lite.rope_scaling.mscale_all_dim == 0.707


def test_transformers_5_fused_expert_tensors_are_read_too(saved, tmp_path):
    """A checkpoint written from a transformers 5 state dict as it is in memory (experts fused into
    gate_up_proj [E, 2F, D] and down_proj [E, D, F]) rather than by save_pretrained."""
    path, ref = saved["Qwen3MoeForCausalLM"]
    fused = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused
    (tmp_path / "fused").mkdir()
    save_file(fused, str(tmp_path / "fused" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "fused" / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with torch.no_grad():
        assert _rel(_raymoe(tmp_path / "fused")(_tokens()).logits, ref(_tokens()).logits) < RTOL


def test_export_refuses_a_moved_selection_bias_that_the_architecture_cannot_carry(saved, tmp_path):
    from raymoe.model_dir import write_model_dir

    path, _ = saved["MixtralForCausalLM"]
    src = open_source(path)
    moved = ((n, src.tensor(n) + (0.01 if n.endswith("expert_bias") else 0)) for n in src.names())
    write_model_dir(str(tmp_path / "balanced"), src.cfg, moved, tokenizer_dir=path)
    with pytest.raises(hf.HFError, match=r"layers\.0\.ffn\.router\.expert_bias is not zero .* MixtralForCausalLM has no "
                                         r"selection bias to carry it \(only DeepseekV3ForCausalLM"):
        export_hf(str(tmp_path / "balanced"), str(tmp_path / "out"), log=lambda m: None)
    assert not (tmp_path / "out").exists()
