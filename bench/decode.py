"""Greedy decode throughput: raymoe's continuous-batching Engine against transformers' generate, on
identical weights, the same prompts and the same number of new tokens, in one process.

    python bench/decode.py                           # CPU: 4 layers, hidden 256, MLA, 16 experts top-4; batch 1/16/64, 32+32 tokens, fp32, 2 threads
    python bench/decode.py --shape cpu-e64           # the same with 64 experts top-6 (expert hidden 64)
    python bench/decode.py --shape gpu               # jobs/configs/small-gpu.yaml's shape with a 32K vocab (1.26B), bf16, cuda, 128+128 tokens
    python bench/decode.py --tiny                    # seconds: the smoke test tests/unit/test_bench_decode.py runs
    python bench/decode.py --batches 1,8 --new-tokens 16 --impls eager,grouped_mm --out /tmp/d.json
    python bench/decode.py --mla-expanded           # also raymoe with decode steps in the expanded MLA form (the lever's A/B)
    python bench/decode.py --compile                # also raymoe with MoETransformer.compile_decode (transformers stays eager)
    python bench/decode.py --unpadded               # also raymoe without the padded experts path (MoE.padded off: lever 14's A/B)
    python bench/decode.py --cuda-graphs            # also raymoe with Engine(cuda_graphs=True): static decode steps, replayed as CUDA graphs on a GPU

Needs torch, transformers, safetensors and tokenizers; neither Ray nor MLflow (raymoe.serve.engine
and raymoe.model_dir import neither; the JSON records what was imported).

Method:
- Weights: a transformers DeepseekV3ForCausalLM is built from raymoe.model.hf.hf_config_from_model
  of the shape's model config, with transformers' own random init (std --init-std), saved with
  save_pretrained and read back by raymoe (model_dir.open_source + load_weights: what `raymoe
  import` does). Both models then hold the same numbers. Logits of both, on 2 x 32 tokens in fp32,
  must agree to a relative error < 1e-4 for every experts implementation that runs in fp32, or the
  script stops. In bf16 both models are cast the same way: every tensor to bf16 except what
  transformers keeps in fp32 when it loads a bf16 DeepSeek-V3 (router weights and correction
  biases) and the RoPE frequency tables.
- transformers variants: "eager" (a Python loop over the experts hit) and every experts function
  registered in transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS (5.x: batched_mm, grouped_mm,
  deepgemm, sonicmoe), selected with model.set_experts_implementation(name) (the same value
  `from_pretrained(..., experts_implementation=name)` takes). Each is tried with one forward in the
  benchmark dtype; what cannot run here (a missing kernel, CUDA only, bf16 only) is listed under
  `unavailable` with the reason. --impls chooses which are timed; "eager" runs once in fp32 either
  way, as the parity reference. Note: on a non-CPU device, generate itself switches "grouped_mm"
  to "batched_mm" for the decode steps (GenerationMixin._optimize_model_for_decode), so there the
  grouped_mm row is grouped prefill + batched decode. Default attention (sdpa) and KV cache
  (DynamicCache), no compile.
- Prompts: B rows of P random byte ids (seeded), the same for every side; equal lengths, so no
  padding; transformers gets an explicit all-ones attention_mask. Greedy on both sides (raymoe
  temperature 0; transformers do_sample=False). Exactly N new tokens per row on both: EOS is off
  (transformers: eos_token_id None in config and generation config; raymoe: a byte tokenizer
  whose EOS id -1 is never produced, no stop strings); the script checks every row got N tokens.
- One run: raymoe adds B requests to an Engine(max_batch=B) and calls step() until done (the
  first step prefills all B prompts in one forward and yields the first tokens; each later step is
  one decode forward over the batch). transformers runs one generate(max_new_tokens=N). Time to
  first token (TTFT) = start to the first token of the batch on the host (raymoe: end of the
  first step; transformers: a streamer's first put of generated tokens, which already waits for
  the device). decode time = total - TTFT; decode tokens/s = B x (N - 1) / decode time (the tokens
  after the first); end-to-end tokens/s = B x N / total. Per batch size: one warm-up run of every
  side, then --repeats rounds of one run per side, in an order shuffled every round (seeded; the
  side that follows transformers' generate starts on cold caches); medians are reported, and
  the paired ratio: the median over repeats of the two sides' decode times in the same round.
  raymoe's figures include what a server does per token (detokenizing the text delta, expert-load
  counters); transformers' generate returns ids only.
- Agreement: the fraction of the B x N generated tokens identical between raymoe and each
  transformers implementation (position by position), the mean common prefix / N, and the
  teacher-forced agreement: the fraction of that implementation's tokens raymoe picks too when fed
  its history (one forward over prompt + its tokens). Greedy in fp32 gives ~1.0 for all three. In
  bf16 a random-init model's top two logits are often closer than the rounding (both sides are
  ~6% off fp32 in relative logit error), and one flip changes the rest of its row, so generated
  agreement can fall well below 0.5 while teacher-forced stays ~0.9+. Below 0.5 the comparison is
  broken (generated agreement in fp32, teacher-forced in any dtype): the JSON is written, `ok` is
  false and the script exits 1.

Prints a table and writes JSON to bench/results/decode.json (decode-tiny.json, decode-<shape>.json;
--out: a .json path or a directory). The JSON is written after every batch size too (`complete`
false until the end), so a run stopped by a time limit (bench/gpu_run.sh) keeps the batch sizes it
finished; batch sizes run in the order --batches gives. With --cuda-graphs, a capture or replay
that fails leaves that side out of its batch size (`graphs_error`) and costs no other figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "platform"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; a kernel fetch fails fast instead of waiting on a network

import torch  # noqa: E402

from raymoe.config import model_config_from_section  # noqa: E402
from raymoe.model.attention import MLAttention  # noqa: E402
from raymoe.model.hf import hf_config_from_model  # noqa: E402
from raymoe.model.moe import MoE  # noqa: E402
from raymoe.model.transformer import MoETransformer  # noqa: E402
from raymoe.model_dir import load_weights, open_source  # noqa: E402
from raymoe.serve.engine import Engine, SamplingParams  # noqa: E402
from raymoe.tokenizer import ByteTokenizer  # noqa: E402

# What the raymoe side pulled in: the benchmark must run where Ray and MLflow are not installed.
RAYMOE_IMPORTED = sorted(m for m in ("ray", "mlflow") if m in sys.modules)
# Other work on the CPUs ruins CPU timings (torch's thread pool spins on busy cores): recorded with them.
LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

import transformers  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

ARCH = "DeepseekV3ForCausalLM"
_DEEPSEEK = dict(attention="mla", q_lora_rank=0, first_k_dense_layers=1, num_shared_experts=1, score_func="sigmoid",
                 norm_topk_prob=True, route_scale=2.5)
SHAPES = {
    # name: (model section, prompt tokens, new tokens, batches, dtype, device, repeats)
    "tiny": (dict(_DEEPSEEK, vocab_size=260, hidden_size=64, num_layers=2, max_seq_len=128, num_heads=2, kv_lora_rank=16,
                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, dense_intermediate_size=128, num_experts=4,
                  top_k=2, expert_intermediate_size=32), 8, 8, "1,4,16", "fp32", "cpu", 1),
    "cpu": (dict(_DEEPSEEK, vocab_size=260, hidden_size=256, num_layers=4, max_seq_len=256, num_heads=4, kv_lora_rank=64,
                 qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, dense_intermediate_size=704, num_experts=16,
                 top_k=4, expert_intermediate_size=128), 32, 32, "1,16,64", "fp32", "cpu", 5),
    # jobs/configs/small-gpu.yaml's model with a 32K vocabulary: the 1.26B shape of the transformers comparison.
    "gpu": (dict(_DEEPSEEK, vocab_size=32768, hidden_size=1024, num_layers=12, max_seq_len=2048, num_heads=16,
                 kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, dense_intermediate_size=2816,
                 num_experts=64, num_shared_experts=2, top_k=6, expert_intermediate_size=512), 128, 128, "1,16,64",
            "bf16", "cuda", 3),
}
SHAPES["cpu-e64"] = (dict(SHAPES["cpu"][0], num_experts=64, top_k=6, expert_intermediate_size=64), *SHAPES["cpu"][1:])
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Kept in fp32 under bf16/fp16, on each side: what transformers' from_pretrained keeps for DeepSeek-V3
# (_keep_in_fp32_modules_strict) and the RoPE tables.
KEEP_FP32 = {"raymoe": ("router.weight", "router.expert_bias", "rope_cos", "rope_sin"),
             "transformers": ("mlp.gate.weight", "e_score_correction_bias", "inv_freq")}
PARITY_TOL = 1e-4
MIN_AGREEMENT = 0.5


class NoEosTokenizer(ByteTokenizer):
    """The byte tokenizer with an EOS id no model produces: every request runs to max_tokens.
    (decode keeps ids 0..255 and drops the rest, so it serves any vocabulary.)"""

    eos_id = -1
    eos_ids = frozenset({-1})


class FirstTokenClock(BaseStreamer):
    """generate() puts the prompt, then each step's new tokens (on the host, after the device caught up)."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cast_(model: torch.nn.Module, dtype: torch.dtype, keep: tuple[str, ...]) -> None:
    """Every floating tensor to `dtype` except those whose name contains one of `keep`."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not any(k in name for k in keep):
            t.data = t.data.to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def implementations() -> list[str]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager"] + sorted(ALL_EXPERTS_FUNCTIONS.keys())


def short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"


def build(model_section: dict, device: torch.device, init_std: float, work: str):
    """(transformers model, raymoe model), same weights, fp32, eval, on `device`."""
    cfg = model_config_from_section(model_section)
    hf_dict = hf_config_from_model(cfg, ARCH)
    hf_dict.update(eos_token_id=None, bos_token_id=None, pad_token_id=None, initializer_range=init_std)
    config = transformers.DeepseekV3Config(**hf_dict)
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.DeepseekV3ForCausalLM(config)
    hf.eval()
    gc_ = hf.generation_config
    gc_.eos_token_id = gc_.bos_token_id = gc_.pad_token_id = None
    hf.save_pretrained(work)
    src = open_source(work)
    with torch.device(device):
        ours = MoETransformer(src.cfg.model)
    load_weights(ours, src)
    return hf, ours.eval(), src.cfg.model


def run_raymoe(engine: Engine, prompts: torch.Tensor, n: int, device: torch.device) -> dict:
    params = SamplingParams(max_tokens=n, temperature=0.0, seed=0)
    sync(device)
    t0 = time.perf_counter()
    reqs = [engine.add_request(row, params) for row in prompts.tolist()]
    first = None
    while engine.has_work():
        engine.step()
        if first is None:
            sync(device)
            first = time.perf_counter()
    sync(device)
    t1 = time.perf_counter()
    ids = [r.output_ids for r in reqs]
    bad = [(r.finish_reason, len(r.output_ids)) for r in reqs if len(r.output_ids) != n or r.finish_reason != "length"]
    if bad:
        raise SystemExit(f"raymoe stopped early: {bad[:3]} (wanted {n} tokens per row)")
    return {"ttft_s": first - t0, "total_s": t1 - t0, "ids": ids}


def run_transformers(hf, prompts: torch.Tensor, n: int, device: torch.device) -> dict:
    x = prompts.to(device)
    clock = FirstTokenClock()
    sync(device)
    t0 = time.perf_counter()
    out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                      streamer=clock)
    sync(device)
    t1 = time.perf_counter()
    new = out[:, x.shape[1]:]
    if new.shape[1] != n:
        raise SystemExit(f"transformers generated {new.shape[1]} tokens per row, wanted {n}")
    return {"ttft_s": clock.first - t0, "total_s": t1 - t0, "ids": new.cpu().tolist()}


def summarize(runs: list[dict], b: int, n: int) -> dict:
    ttft = statistics.median(r["ttft_s"] for r in runs)
    total = statistics.median(r["total_s"] for r in runs)
    decode = statistics.median(r["total_s"] - r["ttft_s"] for r in runs)
    return {"ttft_ms": 1e3 * ttft, "total_ms": 1e3 * total, "decode_ms": 1e3 * decode,
            "decode_tokens_per_s": b * (n - 1) / decode, "tokens_per_s": b * n / total,
            "runs_total_ms": [round(1e3 * r["total_s"], 3) for r in runs],
            "runs_decode_ms": [1e3 * (r["total_s"] - r["ttft_s"]) for r in runs]}


def paired(theirs: dict, ours: dict) -> float:
    """Median over repeats of theirs / ours decode time: repeat i of every side ran in the same
    round, so this cancels a busy spell of a shared machine that the ratio of medians only dilutes."""
    return statistics.median(t / o for t, o in zip(theirs["runs_decode_ms"], ours["runs_decode_ms"]))


@torch.no_grad()
def forced_agreement(model: MoETransformer, prompts: torch.Tensor, ids: list[list[int]], device: torch.device) -> float:
    """Fraction of `ids` (another side's greedy tokens) that `model` picks too when fed that side's
    history (one forward over prompt + ids): agreement step by step, without one flip's cascade."""
    gen = torch.tensor(ids)
    seq = torch.cat([prompts, gen], dim=1).to(device)
    logits = model(seq[:, :-1]).logits[:, prompts.shape[1] - 1:]
    return float((logits.argmax(-1).cpu() == gen).float().mean())


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(fraction of positions equal, mean common prefix / length)."""
    same = total = prefix = 0
    for ra, rb in zip(a, b):
        eq = [x == y for x, y in zip(ra, rb)]
        same += sum(eq)
        total += len(eq)
        prefix += (eq.index(False) if False in eq else len(eq)) / len(eq)
    return same / total, prefix / len(a)


def versions() -> dict:
    import safetensors
    import tokenizers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "safetensors": safetensors.__version__, "tokenizers": tokenizers.__version__}
    try:
        out["raymoe_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["raymoe_commit"] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"], default="cpu")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model, 8+8 tokens, batch 1/4/16 (smoke test)")
    ap.add_argument("--device", default=None, help="default: cuda for --shape gpu, else cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 for --shape gpu, else fp32")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,16,64; tiny 1,4,16)")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per side and batch size (after one warm-up)")
    ap.add_argument("--impls", default=None, help="transformers experts implementations to time (default: all registered; 'eager' runs once for fp32 parity either way)")
    ap.add_argument("--init-std", type=float, default=0.02, help="transformers' initializer_range for the random weights")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    ap.add_argument("--mla-expanded", action="store_true",
                    help="also time raymoe with MLAttention.absorb off (decode steps rebuild per-head keys and values)")
    ap.add_argument("--unpadded", action="store_true",
                    help="also time raymoe with MoE.padded off (inference keeps the dense and grouped expert paths only)")
    ap.add_argument("--compile", action="store_true",
                    help="also time raymoe with its decode steps through torch.compile (compile_decode); the warm-up compiles")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also time raymoe with Engine(cuda_graphs=True): decode steps padded to static shapes and, on a GPU, "
                         "replayed as CUDA graphs (captured in the warm-up); on a CPU the same steps run eagerly")
    ap.add_argument("--out", default=None, help="a .json path or a directory (default bench/results/)")
    args = ap.parse_args()
    shape = "tiny" if args.tiny else args.shape
    section, P, N, batches, dtype_name, device_name, repeats = SHAPES[shape]
    P, N = args.prompt_len or P, args.new_tokens or N
    batches = [int(b) for b in (args.batches or batches).split(",")]
    dtype_name, repeats = args.dtype or dtype_name, args.repeats or repeats
    device = torch.device(args.device or device_name)
    dtype = DTYPES[dtype_name]
    if N < 2:
        raise SystemExit("--new-tokens must be >= 2 (decode time is what follows the first token)")
    section = dict(section, max_seq_len=max(section["max_seq_len"], P + N + 1))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory(prefix="raymoe-decode-") as work:
        hf, ours, mcfg = build(section, device, args.init_std, work)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"shape {shape}: {n_params / 1e6:.1f}M parameters, {mcfg.num_layers} layers, hidden {mcfg.hidden_size}, "
          f"{mcfg.num_experts} experts top-{mcfg.top_k}, vocab {mcfg.vocab_size}; {dtype_name} on {device}; "
          f"prompts {P}, new tokens {N}, batches {batches}")

    # Parity in fp32, then the benchmark dtype; an implementation that cannot run there is left out.
    x = torch.randint(0, 256, (2, min(32, P)), generator=torch.Generator().manual_seed(1)).to(device)
    timed = args.impls.split(",") if args.impls else implementations()
    # transformers' eager experts are the fp32 parity reference, run once whether or not they are timed
    wanted = timed if "eager" in timed else ["eager"] + timed
    parity_fp32, parity, fp32_errors, unavailable, impls = {}, {}, {}, {}, []
    with torch.no_grad():
        ref = ours(x).logits
        for impl in wanted:
            try:
                hf.set_experts_implementation(impl)
                parity_fp32[impl] = rel_err(hf(x).logits, ref)
            except Exception as e:  # noqa: BLE001 - a kernel that is not there raises whatever it raises
                parity_fp32[impl] = None
                fp32_errors[impl] = short(e)
        failed = {k: v for k, v in parity_fp32.items() if v is not None and not v < PARITY_TOL}
        if failed:
            raise SystemExit(f"logits of raymoe and transformers differ in fp32 (relative error {failed}, limit {PARITY_TOL}): "
                             "the weights are not the same model")
        if parity_fp32.get("eager") is None:
            raise SystemExit(f"transformers' eager experts did not run: {fp32_errors.get('eager')}")
        ref_fp32, vs_fp32 = ref, {}
        if dtype != torch.float32:
            cast_(hf, dtype, KEEP_FP32["transformers"])
            cast_(ours, dtype, KEEP_FP32["raymoe"])
            ref = ours(x).logits
            vs_fp32["raymoe"] = rel_err(ref, ref_fp32)
        for impl in timed:
            try:
                hf.set_experts_implementation(impl)
                logits = hf(x).logits
                parity[impl] = rel_err(logits, ref)
                if dtype != torch.float32:
                    vs_fp32[impl] = rel_err(logits, ref_fp32)
                impls.append(impl)
            except Exception as e:  # noqa: BLE001
                unavailable[impl] = short(e)
    print("logits relative error, fp32: " + ", ".join(f"{k} {v:.1e}" for k, v in parity_fp32.items() if v is not None)
          + (f"; {dtype_name}: " + ", ".join(f"{k} {v:.1e}" for k, v in parity.items()) + "; each side against fp32: "
             + ", ".join(f"{k} {v:.1e}" for k, v in vs_fp32.items()) if dtype != torch.float32 else ""))
    for impl, why in unavailable.items():
        print(f"transformers experts_implementation={impl!r} unavailable: {why}")

    compiled_fns = []
    if args.compile:
        ours.compile_decode()
        compiled_fns = [b.decode_fn for b in ours.layers]
        for b in ours.layers:
            b.decode_fn = None

    tok = NoEosTokenizer()
    rows = {}
    ok = True

    cpu = platform.processor() or platform.machine()
    dev = (f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
           else f"cpu ({cpu}), {torch.get_num_threads()} threads")
    cmd = "python bench/decode.py" + (" --tiny" if args.tiny else "") + " " + " ".join(
        a for a in sys.argv[1:] if a != "--tiny" and not a.startswith("--out") and a != args.out)
    run_versions = versions()  # a git subprocess among them: once, not at every save
    if args.out and args.out.endswith(".json"):
        path = args.out
    else:
        path = os.path.join(args.out or os.path.join(HERE, "results"), "decode.json" if shape == "cpu" else f"decode-{shape}.json")

    def save(complete: bool) -> None:
        """Write the JSON: after every batch size (`complete` false), so a run stopped by a time limit
        (bench/gpu_run.sh) keeps the batch sizes it finished, and once more at the end."""
        result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": cmd.strip(), "versions": run_versions, "device": dev,
                  "shape": shape, "model": {**section, "parameters": n_params, "hf_architecture": ARCH},
                  "dtype": dtype_name, "init_std": args.init_std, "prompt_tokens": P, "new_tokens": N, "batches": batches,
                  "repeats": repeats, "implementations": impls, "unavailable": unavailable,
                  "logits_relative_error": {"fp32": parity_fp32, **({dtype_name: parity} if dtype_name != "fp32" else {})}, "fp32_errors": fp32_errors,
                  "logits_relative_error_against_fp32": vs_fp32,
                  "raymoe_imported": RAYMOE_IMPORTED, "load_average_at_start": LOAD_AT_START, "rows": rows, "ok": ok, "complete": complete,
                  "notes": ["decode_tokens_per_s = batch x (new_tokens - 1) / (total - TTFT); tokens_per_s = batch x new_tokens / total",
                            "ratio_* = raymoe / transformers implementation (ttft: lower is better for raymoe)",
                            "ratio_decode_paired = median over repeats of (that side's decode time / raymoe's) in the same round",
                            "on a non-CPU device transformers' generate decodes grouped_mm as batched_mm"]}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        if complete:
            print(f"wrote {path}")

    for B in batches:
        prompts = torch.randint(0, 256, (B, P), generator=torch.Generator().manual_seed(100 + B))
        engine = Engine(ours, tok, max_batch=B, max_len=P + N + 1)
        graphed = Engine(ours, tok, max_batch=B, max_len=P + N + 1, cuda_graphs=True) if args.cuda_graphs else None
        sides = (["raymoe"] + (["raymoe-mla-expanded"] if args.mla_expanded else []) + (["raymoe-unpadded"] if args.unpadded else [])
                 + (["raymoe-compiled"] if args.compile else []) + (["raymoe-graphs"] if args.cuda_graphs else []) + impls)
        runs = {s: [] for s in sides}

        def once(side: str) -> dict:
            if side == "raymoe":
                return run_raymoe(engine, prompts, N, device)
            if side == "raymoe-graphs":
                return run_raymoe(graphed, prompts, N, device)
            if side == "raymoe-compiled":
                for b, fn in zip(ours.layers, compiled_fns):
                    b.decode_fn = fn
                try:
                    return run_raymoe(engine, prompts, N, device)
                finally:
                    for b in ours.layers:
                        b.decode_fn = None
            switch = {"raymoe-unpadded": (MoE, "padded"), "raymoe-mla-expanded": (MLAttention, "absorb")}.get(side)
            if switch:  # a class-wide A/B switch, off for this side's run only
                with mock.patch.object(*switch, False):
                    return run_raymoe(engine, prompts, N, device)
            hf.set_experts_implementation(side)
            return run_transformers(hf, prompts, N, device)

        warmup_s, graphs_error = {}, None

        def attempt(side: str) -> dict | None:
            """One run of `side`; None where the CUDA-graph side fails (in its warm-up's capture or
            in a later replay), which is then left out of this batch size: that failure must not
            cost the other sides' figures. Any other side's failure stops the script."""
            nonlocal graphs_error
            try:
                return once(side)
            except Exception as e:  # noqa: BLE001
                if side != "raymoe-graphs":
                    raise
                graphs_error = short(e)
                print(f"batch {B}: raymoe with CUDA graphs failed, left out: {graphs_error}", flush=True)
                sides.remove(side)
                return None

        with torch.no_grad():
            for s in list(sides):  # warm-up: allocator, kernels, lazy inits (compiling, capturing)
                if (run := attempt(s)) is not None:
                    warmup_s[s] = run["total_s"]
            for r in range(repeats):
                # A new order every round (seeded): the side that follows transformers' generate
                # meets cold caches. In a fixed order raymoe's batch-1 TTFT read 13-20 ms, the same
                # engine run right after it 9-11 ms; a rotated order still keeps each side's
                # predecessor, so the order is shuffled.
                for s in random.Random(r).sample(sides, len(sides)):
                    if (run := attempt(s)) is not None:
                        runs[s].append(run)
        row = {"raymoe": summarize(runs["raymoe"], B, N), "transformers": {}, "ratio_decode": {}, "ratio_end_to_end": {},
               "ratio_decode_paired": {}, "ratio_ttft": {}, "token_agreement": {}, "prefix_agreement": {}, "forced_agreement": {}}
        ours_ids = runs["raymoe"][-1]["ids"]
        row["warmup_s"] = warmup_s
        if args.compile:
            c = row["raymoe_compiled"] = summarize(runs["raymoe-compiled"], B, N)
            row["ratio_decode_compiled"] = {}  # per transformers implementation, below
            row["compiled_to_eager"] = c["decode_tokens_per_s"] / row["raymoe"]["decode_tokens_per_s"]
            row["compiled_token_agreement"] = agreement(ours_ids, runs["raymoe-compiled"][-1]["ids"])[0]
        if graphs_error is not None:
            row["graphs_error"] = graphs_error
        elif args.cuda_graphs:
            g = row["raymoe_graphs"] = summarize(runs["raymoe-graphs"], B, N)
            row["ratio_decode_graphs"] = {}  # per transformers implementation, below
            row["graphs_to_eager"] = g["decode_tokens_per_s"] / row["raymoe"]["decode_tokens_per_s"]
            row["graphs_to_eager_paired"] = paired(row["raymoe"], g)
            row["graphs_token_agreement"] = agreement(ours_ids, runs["raymoe-graphs"][-1]["ids"])[0]
            row["graphs_captured"] = sorted(graphed.graphs.graphs)
            row["graphs_capture_s"] = graphed.graphs.capture_s
        if args.mla_expanded:
            e = row["raymoe_mla_expanded"] = summarize(runs["raymoe-mla-expanded"], B, N)
            row["ratio_decode_to_mla_expanded"] = row["raymoe"]["decode_tokens_per_s"] / e["decode_tokens_per_s"]
            row["mla_expanded_token_agreement"] = agreement(ours_ids, runs["raymoe-mla-expanded"][-1]["ids"])[0]
        if args.unpadded:
            u = row["raymoe_unpadded"] = summarize(runs["raymoe-unpadded"], B, N)
            row["ratio_decode_to_unpadded"] = row["raymoe"]["decode_tokens_per_s"] / u["decode_tokens_per_s"]
            row["ratio_decode_to_unpadded_paired"] = paired(u, row["raymoe"])
            row["unpadded_token_agreement"] = agreement(ours_ids, runs["raymoe-unpadded"][-1]["ids"])[0]
        for impl in impls:
            t = row["transformers"][impl] = summarize(runs[impl], B, N)
            row["ratio_decode"][impl] = row["raymoe"]["decode_tokens_per_s"] / t["decode_tokens_per_s"]
            row["ratio_decode_paired"][impl] = paired(t, row["raymoe"])
            row["ratio_end_to_end"][impl] = row["raymoe"]["tokens_per_s"] / t["tokens_per_s"]
            row["ratio_ttft"][impl] = row["raymoe"]["ttft_ms"] / t["ttft_ms"]
            same, prefix = agreement(ours_ids, runs[impl][-1]["ids"])
            forced = forced_agreement(ours, prompts, runs[impl][-1]["ids"], device)
            row["token_agreement"][impl], row["prefix_agreement"][impl] = same, prefix
            row["forced_agreement"][impl] = forced
            if args.compile:
                row["ratio_decode_compiled"][impl] = row["raymoe_compiled"]["decode_tokens_per_s"] / t["decode_tokens_per_s"]
            if "raymoe_graphs" in row:
                row["ratio_decode_graphs"][impl] = row["raymoe_graphs"]["decode_tokens_per_s"] / t["decode_tokens_per_s"]
            # In fp32 greedy runs must coincide. Below it, one near-tie flipped by rounding changes the
            # rest of its row, so only the step-by-step (teacher-forced) agreement is held to the bar.
            ok = ok and forced >= MIN_AGREEMENT and (dtype != torch.float32 or same >= MIN_AGREEMENT)
        rows[str(B)] = row
        save(complete=False)
        print(f"batch {B} done: raymoe {row['raymoe']['decode_tokens_per_s']:.0f} decode tok/s"
              + "".join(f", x{v:.2f} {k}" for k, v in row["ratio_decode_paired"].items())
              + (f", graphs x{row['graphs_to_eager_paired']:.2f} eager" if "graphs_to_eager_paired" in row else ""), flush=True)
        del engine, graphed
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{'batch':>5} {'side':22} {'decode tok/s':>13} {'TTFT ms':>9} {'total ms':>10} {'e2e tok/s':>10} "
          f"{'raymoe/this':>12} {'paired':>7} {'same tokens':>12} {'forced':>7}")
    for B, row in rows.items():
        r = row["raymoe"]
        print(f"{B:>5} {'raymoe Engine':22} {r['decode_tokens_per_s']:>13.0f} {r['ttft_ms']:>9.1f} {r['total_ms']:>10.1f} "
              f"{r['tokens_per_s']:>10.0f}")
        if "raymoe_compiled" in row:
            c = row["raymoe_compiled"]
            print(f"{'':>5} {'raymoe, compiled':22} {c['decode_tokens_per_s']:>13.0f} {c['ttft_ms']:>9.1f} {c['total_ms']:>10.1f} "
                  f"{c['tokens_per_s']:>10.0f} {row['compiled_to_eager']:>11.2f}x {row['compiled_token_agreement']:>12.3f}"
                  f"   (warm-up with compiling {row['warmup_s']['raymoe-compiled']:.1f} s; vs hf "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in row["ratio_decode_compiled"].items()) + ")")
        if "raymoe_graphs" in row:
            g = row["raymoe_graphs"]
            print(f"{'':>5} {'raymoe, CUDA graphs':22} {g['decode_tokens_per_s']:>13.0f} {g['ttft_ms']:>9.1f} {g['total_ms']:>10.1f} "
                  f"{g['tokens_per_s']:>10.0f} {row['graphs_to_eager']:>11.2f}x {row['graphs_to_eager_paired']:>6.2f}x "
                  f"{row['graphs_token_agreement']:>12.3f}   ({len(row['graphs_captured'])} graphs captured in "
                  f"{row['graphs_capture_s']:.1f} s; vs hf " + ", ".join(f"{k} {v:.2f}x" for k, v in row["ratio_decode_graphs"].items()) + ")")
        elif "graphs_error" in row:
            print(f"{'':>5} {'raymoe, CUDA graphs':22} failed: {row['graphs_error']}")
        if "raymoe_mla_expanded" in row:
            e = row["raymoe_mla_expanded"]
            print(f"{'':>5} {'raymoe, MLA expanded':22} {e['decode_tokens_per_s']:>13.0f} {e['ttft_ms']:>9.1f} {e['total_ms']:>10.1f} "
                  f"{e['tokens_per_s']:>10.0f} {row['ratio_decode_to_mla_expanded']:>11.2f}x {row['mla_expanded_token_agreement']:>12.3f}")
        if "raymoe_unpadded" in row:
            u = row["raymoe_unpadded"]
            print(f"{'':>5} {'raymoe, unpadded':22} {u['decode_tokens_per_s']:>13.0f} {u['ttft_ms']:>9.1f} {u['total_ms']:>10.1f} "
                  f"{u['tokens_per_s']:>10.0f} {row['ratio_decode_to_unpadded']:>11.2f}x {row['ratio_decode_to_unpadded_paired']:>6.2f}x "
                  f"{row['unpadded_token_agreement']:>12.3f}")
        for impl, t in row["transformers"].items():
            print(f"{'':>5} {'hf ' + impl:22} {t['decode_tokens_per_s']:>13.0f} {t['ttft_ms']:>9.1f} {t['total_ms']:>10.1f} "
                  f"{t['tokens_per_s']:>10.0f} {row['ratio_decode'][impl]:>11.2f}x {row['ratio_decode_paired'][impl]:>6.2f}x "
                  f"{row['token_agreement'][impl]:>12.3f} "
                  f"{row['forced_agreement'][impl]:>7.3f}")
    print("raymoe/this: ratio of decode tokens/s (medians); paired: median over repeats of the same round's ratio; same tokens: fraction of generated tokens equal to raymoe's; "
          "forced: fraction raymoe picks too when fed that side's history")

    save(complete=True)
    if not ok:
        low = {B: {k: (round(r["token_agreement"][k], 3), round(v, 3)) for k, v in r["forced_agreement"].items()}
               for B, r in rows.items()}
        raise SystemExit(f"token agreement (generated, teacher-forced) below {MIN_AGREEMENT}: {low}; "
                         "the two sides are not generating from the same model")


if __name__ == "__main__":
    main()
