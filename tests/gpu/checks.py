"""GPU checks, plain functions that raise AssertionError: the training loop under NCCL at world size 1
through build, train, checkpoint, resume and export (full and LoRA), the grouped GEMM
(`torch._grouped_mm`) against the per-segment fallback in bf16, forward and backward, and
`raymoe plan`'s per-rank bytes against the CUDA allocator's peak over a training step, and the
serving engine's decode steps replayed as CUDA graphs against the same steps run eagerly, and no
host sync in a dropless MoE layer, a whole training step or an eager decode forward.

Two ways to run them, both skipped or refused without CUDA:

    python -m pytest tests/gpu                     # tests/gpu/test_gpu.py wraps each check
    python tests/gpu/checks.py OUT_DIR             # no pytest needed: writes OUT_DIR/gpu-checks.json
    python tests/gpu/checks.py OUT_DIR --rehearse  # the loop checks on CPU with gloo (bf16 autocast)

They need no Ray, MLflow or transformers (the lent GPU machine has none): platform/ on PYTHONPATH
and safetensors + tokenizers importable (`../shared/tools/gpu-bundle.sh .gpu hf`).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "..", "platform"), os.path.join(HERE, "..")]

from reporters import KeepingReporter  # noqa: E402

MODEL = {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "max_seq_len": 128, "attention": "mla", "kv_lora_rank": 64,
         "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "first_k_dense_layers": 1,
         "dense_intermediate_size": 256, "num_experts": 8, "top_k": 2, "expert_intermediate_size": 64,
         "score_func": "sigmoid", "route_scale": 2.5, "num_expert_groups": 4, "top_k_groups": 2}
TRAIN = {"steps": 6, "batch_size": 4, "seq_len": 64, "lr": 3e-3, "warmup_steps": 1, "log_every": 1, "val_every": 3,
         "val_batches": 1, "checkpoint_every": 3, "sample_tokens": 0, "precision": "bf16"}
GROUPED_SHAPES = [(256, 128), (2048, 1408)]  # (D, F): a small one and DeepSeek-16B's expert shape
DEVICE = "cuda"  # --rehearse: "cpu", with gloo


def init_nccl() -> None:
    """A one-rank NCCL process group on cuda:0, so every collective of the loop goes through NCCL."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if DEVICE == "cpu":
        dist.init_process_group("gloo", rank=0, world_size=1)
        return
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))


def _train_and_resume(root: str, cfg) -> tuple[KeepingReporter, list[float], list[float]]:
    from raymoe.train.data import prepare_run_data
    from raymoe.train.loop import DistInfo, train

    corpus = prepare_run_data(cfg).dir
    info = DistInfo(0, 1, torch.device(DEVICE, 0) if DEVICE == "cuda" else torch.device("cpu"))
    straight = KeepingReporter(os.path.join(root, "a"))
    train(cfg, corpus_dir=corpus, reporter=straight, info=info)
    resumed = KeepingReporter(os.path.join(root, "b"))
    train(cfg, corpus_dir=corpus, reporter=resumed, resume_dirs=[straight.checkpoint(3)], info=info)
    a = [m["train/loss"] for m, _ in straight.reports if m["train/step"] > 3]
    b = [m["train/loss"] for m, _ in resumed.reports]
    return straight, a, b


def check_full_training_under_nccl_checkpoints_resumes_and_exports(root: str) -> None:
    from raymoe.config import config_from_dict
    from raymoe.model_dir import export_hf, export_model_dir, open_model

    init_nccl()
    cfg = config_from_dict({"name": "gpu", "output_dir": root, "model": MODEL, "train": TRAIN, "data": {"max_bytes": 400_000}})
    straight, a, b = _train_and_resume(root, cfg)
    assert len(a) == len(b) == 3 and all(abs(x - y) < 2e-2 for x, y in zip(a, b)), (a, b)  # bf16 kernels
    assert straight.reports[-1][0]["train/loss"] < straight.reports[0][0]["train/loss"]
    out = export_model_dir(straight.checkpoint(6), os.path.join(root, "model"), log=lambda m: None)
    _, model, _, _ = open_model(out.path, device=DEVICE)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 256, (2, 16), device=DEVICE)).logits).all()
    export_hf(straight.checkpoint(6), os.path.join(root, "hf"), log=lambda m: None)
    assert os.path.exists(os.path.join(root, "hf", "config.json"))


def check_lora_under_nccl_holds_the_base_in_bf16_and_resumes(root: str) -> None:
    from raymoe.config import config_from_dict
    from raymoe.model.transformer import MoETransformer
    from raymoe.model_dir import open_model, write_model_dir

    init_nccl()
    base = config_from_dict({"name": "base", "model": MODEL, "train": TRAIN})
    m = MoETransformer(base.model)
    m.init_weights(seed=1)
    write_model_dir(os.path.join(root, "base"), base, m.state_dict().items())
    cfg = config_from_dict({"name": "gpu-lora", "output_dir": root, "model": {"init_from": os.path.join(root, "base")},
                            # rank 4: rows of 8 bytes in bf16, which _grouped_mm refuses; the fallback takes them
                            "lora": {"rank": 4, "targets": ["attention", "dense_ffn", "shared_experts", "routed_experts"]},
                            "train": TRAIN, "data": {"max_bytes": 400_000}})
    straight, a, b = _train_and_resume(root, cfg)
    assert all(abs(x - y) < 2e-2 for x, y in zip(a, b)), (a, b)
    _, merged, _, _ = open_model(straight.checkpoint(6), device=DEVICE)
    with torch.no_grad():
        assert torch.isfinite(merged(torch.randint(0, 256, (2, 16), device=DEVICE)).logits).all()


def check_grouped_mm_equals_the_per_segment_fallback_in_bf16(D: int, Fh: int) -> dict:
    from raymoe.model.moe import grouped_mm, grouped_mm_segments

    assert hasattr(torch, "_grouped_mm"), "this torch has no _grouped_mm"
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    counts = torch.tensor([37, 0, 128, 5, 0, 64, 200, 1], device=DEVICE)
    x = torch.randn(int(counts.sum()), D, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(8, D, Fh, device="cuda", generator=gen) / D**0.5).bfloat16().requires_grad_()
    fast = grouped_mm(x, w, counts)
    g = torch.randn_like(fast)
    gx, gw = torch.autograd.grad(fast, (x, w), g)
    slow = grouped_mm_segments(x, w, counts)
    sx, sw = torch.autograd.grad(slow, (x, w), g)
    errors = {name: ((p.float() - q.float()).norm() / q.float().norm()).item()
              for name, p, q in (("out", fast, slow), ("grad_x", gx, sx), ("grad_w", gw, sw))}
    assert all(e < 1e-2 for e in errors.values()), errors
    return errors


def check_memory_plan_against_cuda_peak(checkpointing: int) -> dict:
    """raymoe plan's per-rank total against torch.cuda.max_memory_allocated over a second training
    step (forward, backward, AdamW) of one rank, bf16 autocast, a small-gpu.yaml-like shape."""
    from raymoe.config import config_from_dict
    from raymoe.model.transformer import MoETransformer
    from raymoe.parallel.memory import Layout, rank_memory
    from raymoe.train.loop import build_optimizer

    model_cfg = {**MODEL, "hidden_size": 512, "num_layers": 4, "num_heads": 8, "kv_lora_rank": 128, "num_experts": 32,
                 "top_k": 4, "num_expert_groups": 1, "top_k_groups": 1, "expert_intermediate_size": 256,
                 "dense_intermediate_size": 1408, "max_seq_len": 1024, "vocab_size": 32768}
    cfg = config_from_dict({"name": "plan", "model": model_cfg, "train": {**TRAIN, "batch_size": 8, "seq_len": 1024,
                                                                           "activation_checkpointing": checkpointing}})
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model = MoETransformer(cfg.model).to(DEVICE)
    model.init_weights(seed=0)
    model.train()
    model.checkpoint_every = checkpointing
    opt = build_optimizer(list(model.named_parameters()), cfg.train, torch.device(DEVICE))
    tokens = torch.randint(0, cfg.model.vocab_size, (8, 1025), device=DEVICE)
    for step in range(2):
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(tokens[:, :-1], targets=tokens[:, 1:])
            loss = out.token_loss.mean() + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - start
    planned = rank_memory(cfg, 1, Layout(1, "replicate", checkpointing), device_type="cuda")
    result = {"measured_peak_bytes": measured, "planned_total_bytes": planned.total, "ratio": planned.total / measured,
              "planned": {k: getattr(planned, k) for k in ("params", "grads", "optimizer", "activations", "transient")}}
    del model, opt, out, loss
    torch.cuda.empty_cache()
    # The plan sums grads and activations (both never peak together) and stands in for kernels'
    # workspaces by its headroom: it should land near the measured peak, not on it.
    assert 0.6 < result["ratio"] < 1.6, result
    return result


def check_dropless_moe_layer_makes_no_host_sync() -> dict:
    """A dropless MoE layer's forward and backward on one GPU under torch.cuda.set_sync_debug_mode
    ("error"): routing, counting (scatter-add, not bincount), permute (no boolean index when every
    slot is kept), grouped GEMMs and combine must not read anything back to the host."""
    from raymoe.config import config_from_dict
    from raymoe.model.moe import MoE

    cfg = config_from_dict({"name": "sync", "model": {**MODEL, "capacity_factor": None}}).model
    layer = MoE(cfg).to(DEVICE)
    torch.nn.init.normal_(layer.experts.w13, std=0.02)
    torch.nn.init.normal_(layer.experts.w2, std=0.02)
    x = torch.randn(4, 256, cfg.hidden_size, device=DEVICE, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        layer(x)  # warm-up: lazy initializations may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, aux, _ = layer(x)
        (y.float().square().mean() + aux).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"tokens": 4 * 256, "grad_norm": float(x.grad.norm())}


def check_training_step_makes_no_host_sync(_root: str) -> dict:
    """Whole training steps as train/loop.py's train_step runs them on one GPU, with dropless
    routing (the default), under torch.cuda.set_sync_debug_mode("error"): the bf16 autocast forward
    with the LM head and loss fused (train/loss.py), the balance loss, backward, gradient
    clipping, fused AdamW, zero_grad and the routers' bias update from the step's loads. One
    warm-up step first (lazy initializations may sync once). The same step on the same batch
    three times, so the loss must fall. On the CPU rehearsal the steps run without the sync check."""
    from raymoe.config import config_from_dict
    from raymoe.model.transformer import MoETransformer
    from raymoe.train.loop import build_optimizer

    run = config_from_dict({"name": "sync-step", "train": TRAIN, "model": {
        **MODEL, "balance": {"bias_update_rate": 0.001, "seq_aux_loss_coef": 1e-4}}})
    with torch.device(DEVICE):
        model = MoETransformer(run.model)
    model.init_weights(seed=0)
    model.train()
    opt = build_optimizer(list(model.named_parameters()), run.train, torch.device(DEVICE))
    batch = torch.randint(0, run.model.vocab_size, (4, 65), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    x, y = batch[:, :-1], batch[:, 1:]

    def step() -> torch.Tensor:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = model(x, targets=y)
            loss = out.token_loss.mean() + out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for moe, stats in zip(model.moe_layers(), out.moe_stats):
            moe.router.update_bias(stats.tokens_per_expert)
        return loss.detach()

    losses = [step()]
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        losses += [step(), step()]
    finally:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    values = [float(v) for v in losses]
    assert all(math.isfinite(v) for v in values) and values[-1] < values[0], values
    return {"losses": values, "moe_layers": len(model.moe_layers()), "checked_steps": 2 if DEVICE == "cuda" else 0}

def check_latent_decode_matches_the_expanded_form_in_bf16(_root: str) -> dict:
    """MLA decode steps in latent space (MLAttention.absorb, docs/PERFORMANCE.md lever 7) against
    the expanded form, both with bf16 weights and cache, each held to the fp32 expanded logits of
    8 decode steps of 4 rows: the latent form may not round worse than the expanded one."""
    import copy

    from raymoe.config import config_from_dict
    from raymoe.model.attention import MLAttention
    from raymoe.model.transformer import KVCache, MoETransformer

    cfg = config_from_dict({"model": MODEL}).model
    with torch.device(DEVICE):
        fp32 = MoETransformer(cfg)
    fp32.init_weights(seed=0)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    bf16.rope_cos.data, bf16.rope_sin.data = fp32.rope_cos.clone(), fp32.rope_sin.clone()
    x = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    slots = torch.arange(4, device=DEVICE)

    def decode(model, absorb):
        MLAttention.absorb = absorb
        cache = KVCache(model.eval(), 4, 64)
        with torch.inference_mode():
            model(x[:, :16], cache, slots, torch.arange(16, device=DEVICE).expand(4, 16))
            return torch.stack([model(x[:, p : p + 1], cache, slots, torch.full((4, 1), p, device=DEVICE)).logits[:, 0]
                                for p in range(16, 24)]).float()

    try:
        ref = decode(fp32, False)
        err = {name: ((decode(bf16, absorb) - ref).norm() / ref.norm()).item()
               for name, absorb in (("latent", True), ("expanded", False))}
        err["fp32_latent"] = ((decode(fp32, True) - ref).norm() / ref.norm()).item()
    finally:
        MLAttention.absorb = True
    assert err["fp32_latent"] < 1e-5 and err["latent"] <= 1.5 * err["expanded"] + 1e-3, err
    return err


def _bf16_serving_model(**overrides):
    """MODEL with seeded weights in bf16, on DEVICE, in eval mode, its RoPE tables kept in fp32 (as
    bench/decode.py casts a model): what the serving checks decode with."""
    from raymoe.config import config_from_dict
    from raymoe.model.transformer import MoETransformer

    with torch.device(DEVICE):
        model = MoETransformer(config_from_dict({"model": {**MODEL, **overrides}}).model)
    model.init_weights(seed=0)
    cos, sin = model.rope_cos.clone(), model.rope_sin.clone()
    model = model.to(torch.bfloat16).eval()
    model.rope_cos.data, model.rope_sin.data = cos, sin
    return model


def check_cuda_graph_decode_replays_the_eager_static_steps(_root: str) -> dict:
    """Engine(cuda_graphs=True) (serve/graphs.py) in bf16: six greedy requests of unequal prompts
    joining and leaving a batch of 4, rows crossing from the 64-key bucket into the next. The
    captured graphs' tokens and expert loads must be those of the same static steps run eagerly
    (capture off); the dynamic engine's tokens are compared too (bf16 near-ties may differ with
    the padded shapes). Reports the decode seconds of each (one run each: a check, not the benchmark).
    Top-2 routing keeps the experts' bf16 sums (index_add_ from zero, two terms) order-independent."""
    from raymoe.serve.engine import Engine, SamplingParams
    from raymoe.tokenizer import ByteTokenizer

    model = _bf16_serving_model(max_seq_len=160)
    prompts = ["def f(x):", "import os", "a", "class A:\n    pass", "while True:", "b = 1"]
    lengths = [70, 20, 9, 90, 33, 12]

    def run(mode: str, engine=None):
        engine = engine or Engine(model, ByteTokenizer(), max_batch=4, max_len=150, cuda_graphs=mode != "dynamic")
        if mode == "static-eager":
            engine.graphs.capture = False
        reqs, steps = [], 0
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        while len(reqs) < len(prompts) or engine.has_work():
            if steps % 5 == 0 and len(reqs) < len(prompts):
                reqs.append(engine.add_request(prompts[len(reqs)], SamplingParams(max_tokens=lengths[len(reqs)], temperature=0)))
            engine.step()
            steps += 1
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return [r.output_ids for r in reqs], engine.load, time.perf_counter() - t0, engine

    eager_ids, eager_load, eager_s, _ = run("static-eager")
    graph_ids, graph_load, graph_s, engine = run("graphs")
    graph_again_ids, _, graph_again_s, _ = run("graphs", engine)  # the same engine again: replays only
    dynamic_ids, dynamic_load, dynamic_s, _ = run("dynamic")
    same = lambda a, b: sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(map(len, a))  # noqa: E731
    out = {"graphs_captured": sorted(engine.graphs.graphs), "capture_s": round(engine.graphs.capture_s, 3),
           "seconds": {"static_eager": round(eager_s, 3), "graphs_first_run": round(graph_s, 3),
                       "graphs_second_run": round(graph_again_s, 3), "dynamic": round(dynamic_s, 3)},
           "tokens_same_as_static_eager": same(graph_ids, eager_ids), "tokens_same_as_dynamic": same(graph_ids, dynamic_ids),
           "loads_equal_static_eager": bool(torch.equal(graph_load, eager_load)),
           "loads_equal_dynamic": bool(torch.equal(graph_load, dynamic_load))}
    assert [len(ids) for ids in graph_ids] == lengths, out
    # Replays and eager runs launch the same kernels on the same shapes, so the tokens should be
    # identical; a near-tie flipped by a kernel choice under capture would change the rest of its
    # row only, hence the 0.8 floor (the exact fraction is recorded). Loads follow the tokens.
    assert out["tokens_same_as_static_eager"] >= 0.8 and graph_again_ids == graph_ids, out
    assert out["loads_equal_static_eager"] or out["tokens_same_as_static_eager"] < 1.0, out
    assert DEVICE != "cuda" or len(out["graphs_captured"]) >= 3, out
    return out


def check_eager_decode_forward_makes_no_host_sync(_root: str) -> dict:
    """The engine's eager (uncaptured) decode forward in bf16 under torch.cuda.set_sync_debug_mode
    ("error"): routing, the grouped experts, the cache's write and read and the key count (from
    the engine, not positions.max()) read nothing back; sampling's one copy of the tokens is
    outside the model. On the CPU rehearsal the same step runs without the sync check."""
    from raymoe.serve.engine import Engine, SamplingParams
    from raymoe.tokenizer import ByteTokenizer

    model = _bf16_serving_model()
    engine = Engine(model, ByteTokenizer(), max_batch=4, max_len=64)
    for prompt in ("def f", "import os", "x"):
        engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0))
    engine.step()  # prefill (one forward per prompt length) and lazy initializations
    engine.step()
    forward = model.forward

    def checked(*args, **kwargs):
        if DEVICE != "cuda":
            return forward(*args, **kwargs)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return forward(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    model.forward = checked
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    return {"decode_steps_checked": steps}


def all_checks(grouped: bool = True) -> list[tuple[str, object, tuple]]:
    """(name, function, arguments after the scratch directory) of every check."""
    out = [(f.__name__, f, ()) for f in (check_full_training_under_nccl_checkpoints_resumes_and_exports,
                                         check_lora_under_nccl_holds_the_base_in_bf16_and_resumes,
                                         check_latent_decode_matches_the_expanded_form_in_bf16,
                                         check_cuda_graph_decode_replays_the_eager_static_steps,
                                         check_eager_decode_forward_makes_no_host_sync,
                                         check_training_step_makes_no_host_sync)]
    if grouped:
        out += [(f"check_grouped_mm_equals_the_per_segment_fallback_in_bf16[{d}x{f}]",
                 lambda _root, d=d, f=f: check_grouped_mm_equals_the_per_segment_fallback_in_bf16(d, f), ())
                for d, f in GROUPED_SHAPES]
        out.append(("check_dropless_moe_layer_makes_no_host_sync", lambda _root: check_dropless_moe_layer_makes_no_host_sync(), ()))
        out += [(f"check_memory_plan_against_cuda_peak[ac={ac}]",
                 lambda _root, ac=ac: check_memory_plan_against_cuda_peak(ac), ()) for ac in (0, 1)]
    return out


def main(out_dir: str, rehearse: bool = False) -> int:
    global DEVICE
    if rehearse:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check (--rehearse runs the loop checks on CPU)", file=sys.stderr)
        return 2
    os.makedirs(out_dir, exist_ok=True)
    results = []
    for name, fn, args in all_checks(grouped=not rehearse):
        t0 = time.time()
        try:
            value = fn(tempfile.mkdtemp(prefix="raymoe-gpu-"), *args)
            results.append({"check": name, "ok": True, "s": round(time.time() - t0, 2), "value": value})
        except Exception:  # noqa: BLE001 - every failure is recorded; the other checks still run
            results.append({"check": name, "ok": False, "s": round(time.time() - t0, 2), "error": traceback.format_exc()[-3000:]})
        print(json.dumps(results[-1])[:600], flush=True)
        # After every check: a run stopped by a time limit (bench/gpu_run.sh) keeps what it checked.
        with open(os.path.join(out_dir, "gpu-checks.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (rehearsal)", "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--rehearse"]
    sys.exit(main(args[0] if args else os.environ.get("OUT", "gpu-out"), rehearse="--rehearse" in sys.argv))
