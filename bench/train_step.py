"""Whole training steps of the same DeepSeek-style MoE in raymoe and in Hugging Face transformers
(DeepseekV3ForCausalLM): same weights, same batch, same process.

    python bench/train_step.py                              # CPU: 4 layers, hidden 256, 64 experts top-6, batch 4 x 256, fp32, 2 threads
    python bench/train_step.py --experts 16                 # the same with 16 routed experts top-4
    python bench/train_step.py --shape gpu --device cuda    # the 1.26B-total reference shape, batch 8 x 2048, bf16 autocast
    python bench/train_step.py --tiny                       # seconds: the smoke test (tests/unit/test_bench_train_step.py)
    python bench/train_step.py --impls grouped_mm --compile # plus raymoe with its blocks through torch.compile

Method. The transformers model is built from `hf_config_from_model(cfg.model, "DeepseekV3ForCausalLM")`
(transformers' own random init, seed 0) and saved with save_pretrained; raymoe opens that directory
(model_dir.open_source + load_weights: the mapping `raymoe import` uses) and every transformers
variant is loaded from it with from_pretrained, so all start from identical weights. Before any
timing, each variant's fp32 logits on the benchmark batch must match raymoe's (relative error
< 1e-4); a variant that does not is not timed and the script exits 1.

A step is what the training loop does on one rank: forward, loss, backward, AdamW step,
zero_grad(set_to_none=True). raymoe: cross-entropy of the next token + the model's balance loss
(model/moe.py; the router bias update is not run). transformers: the model's own loss
(labels with shift_labels = the same targets, so both average the same B * S predictions).
AdamW with the same hyperparameters (raymoe: train/loop.py build_optimizer, weight decay on
matrices only; transformers: the same lr/betas/eps/decay on every parameter), fused on both sides
(CUDA and CPU: what raymoe's loop uses). raymoe's cross-entropy is the loop's: forward(targets=)
runs the LM head and the loss as one (train/loss.py linear_cross_entropy); transformers' is
F.cross_entropy over fp32 logits. --compile adds a row, raymoe[compiled]: the
same model with MoETransformer.compile_blocks (inductor; the first step compiles, untimed).
bf16 autocast on CUDA, fp32 on CPU. Each implementation gets a fresh model and optimizer, runs
one probe step (an implementation that cannot train here is reported, not timed), --warmup steps,
then --steps timed steps (synchronized on CUDA); the median is reported. Schedule: on CPU all
models stay resident and each round runs one step of each, in an order shuffled every round
(seeded), so a busy spell of a shared machine hits all alike and no side always follows the same
one (--block K: K steps of each in a row per round, the first untimed, so the timed steps are
steady-state ones as in a run of one model rather than steps after another model's, on cold
caches); on CUDA (memory) one implementation after another, each freed before the next
(--schedule chooses). In the interleaved schedule step i of every implementation
ran in round i, so "x paired" (ratios[...]["tokens_per_s_paired"]) is the median over rounds of
the two steps' ratio: a busy spell hits both steps of a round and cancels out.

transformers variants: `attn_implementation="sdpa"`, and every experts implementation the
installed version registers for DeepseekV3 (`experts_implementation=` of from_pretrained, i.e.
config._experts_implementation; "eager" is the per-expert loop of the modeling file, the others come
from transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS). One that cannot run here (a missing
kernel, a dtype it refuses, or more memory than the device has, e.g. batched_mm's per-slot weight
copies) is listed with the reason instead of a time.

Figures: FLOPs per token are raymoe.model.params.train_flops_per_token (6 x activated matmul params
+ attention); MFU divides the achieved FLOP/s by the dense matmul rate measured in this run (CPU:
fp32 1024^3, CUDA: bf16 8192^3; the best of several, so on a busy CPU it can read low). Peak
memory: CUDA max_memory_allocated of each step less what other implementations held, the max over
its steps; CPU an estimate (params + grads + AdamW state + the unique storages autograd saved for
backward in one extra step, via saved_tensors_hooks), not a measured peak. Under bf16 autocast
transformers' grouped_mm experts likely run in the weights' dtype, fp32 here: it casts the input to
the weight, and torch._grouped_mm is no autocast op (checked on CPU). raymoe casts its expert
weights to bf16. Each library does this with fp32 master weights, and it is part of what is measured.
Prints a table and writes JSON to bench/results/train_step.json (CPU shape; -e16k4, -gpu, -tiny for
the others) or --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "platform"))
# No hub access: an experts implementation that wants a kernel from the hub fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from raymoe.config import config_from_dict, to_plain  # noqa: E402
from raymoe.model.hf import hf_config_from_model  # noqa: E402
from raymoe.model.params import count_params, train_flops_per_token  # noqa: E402
from raymoe.model.transformer import MoETransformer  # noqa: E402
from raymoe.model_dir import load_weights, open_source  # noqa: E402

try:
    from raymoe.train.loop import build_optimizer  # noqa: E402
    OPTIMIZER_SOURCE = "raymoe.train.loop.build_optimizer"
except ImportError as e:  # train/loop.py imports the data pipeline (pyarrow); a bare GPU box may lack it
    OPTIMIZER_SOURCE = f"bench copy of raymoe.train.loop.build_optimizer ({e})"

    def build_optimizer(named_params, cfg, device):
        decay, no_decay = [], []
        for name, p in named_params:
            (no_decay if p.dim() < 2 or name.startswith("embed.") else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=device.type in ("cuda", "cpu"))

PARITY_TOL = 1e-4
BALANCE = {"bias_update_rate": 0.001, "seq_aux_loss_coef": 1e-4}  # as jobs/configs/small-gpu.yaml
TRAIN = {"lr": 6e-4, "weight_decay": 0.1, "betas": [0.9, 0.95]}


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


LOAD_AT_START = load_average()


def shape_config(shape: str, experts: int, top_k: int | None):
    """(run config, batch, seq_len, default steps, default warmup) of a named shape."""
    if shape == "gpu":  # jobs/configs/small-gpu.yaml's model with the ~32K vocabulary of the reference comparison
        model = dict(vocab_size=32000, hidden_size=1024, num_layers=12, max_seq_len=2048, num_heads=16, q_lora_rank=0,
                     kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                     first_k_dense_layers=1, dense_intermediate_size=2816, num_experts=64, num_shared_experts=2,
                     expert_intermediate_size=512, top_k=6)
        B, S, steps, warmup = 8, 2048, 10, 3
    elif shape == "cpu":  # the same proportions scaled down to run in seconds per step on two cores
        model = dict(vocab_size=8000, hidden_size=256, num_layers=4, max_seq_len=256, num_heads=4, q_lora_rank=0,
                     kv_lora_rank=64, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                     first_k_dense_layers=1, dense_intermediate_size=704, num_experts=experts, num_shared_experts=2,
                     expert_intermediate_size=64, top_k=top_k or (6 if experts >= 64 else 4))
        B, S, steps, warmup = 4, 256, 8, 2
    else:  # tiny
        model = dict(vocab_size=288, hidden_size=32, num_layers=2, max_seq_len=128, num_heads=2, q_lora_rank=0,
                     kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                     first_k_dense_layers=1, dense_intermediate_size=64, num_experts=8, num_shared_experts=1,
                     expert_intermediate_size=16, top_k=2)
        B, S, steps, warmup = 2, 16, 2, 1
    model.update(attention="mla", score_func="sigmoid", norm_topk_prob=True, route_scale=2.5, num_expert_groups=1,
                 top_k_groups=1, tie_embeddings=False, balance=BALANCE)
    run = config_from_dict({"name": f"train-step-{shape}", "model": model,
                            "train": {**TRAIN, "batch_size": B, "seq_len": S, "precision": "auto"}})
    return run, B, S, steps, warmup


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dense_rate(device: torch.device, tiny: bool) -> dict:
    """Dense matmul FLOP/s of this device: the best of several timed products."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    if tiny:
        n = min(n, 512)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    reps = 3 if tiny else 10
    times = []
    for i in range(2 + reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "flops_per_s": 2 * n ** 3 / min(times),
            "flops_per_s_median": 2 * n ** 3 / statistics.median(times)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0)


def saved_for_backward_bytes(model: torch.nn.Module, step) -> int:
    """Unique storages autograd saves for backward in one training step (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def free_memory(device: torch.device) -> int:
    """Bytes an implementation may use: free device memory, or MemAvailable on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def batched_mm_bytes(cfg, tokens: int, device: torch.device) -> int:
    """What batched_mm holds for backward: every (token, expert) slot gets its own copy of the
    expert's gate/up and down matrices (gathered fp32, kept in the matmul dtype)."""
    moe_layers = cfg.num_layers - cfg.first_k_dense_layers
    per_slot = 3 * cfg.expert_intermediate_size * cfg.hidden_size
    return moe_layers * tokens * cfg.top_k * per_slot * (4 + (2 if device.type == "cuda" else 4))


def candidate_impls() -> list[str]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    order = ["eager", "grouped_mm", "batched_mm"]
    return order + sorted(k for k in ALL_EXPERTS_FUNCTIONS.keys() if k not in order)


@dataclasses.dataclass
class Runner:
    """One implementation under test: its model, optimizer and step, and what its steps measured."""

    name: str
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    step: Callable[[], torch.Tensor]
    times: list[float] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    peak_bytes: int = 0

    def resident_bytes(self) -> int:
        return tensor_bytes(self.model.parameters()) + optimizer_bytes(self.opt)

    def run(self, device: torch.device, timed: bool) -> None:
        """One step. On CUDA also this implementation's own peak: the step's high-water mark
        less what other implementations held meanwhile (everything allocated before the step but
        this one's weights and optimizer state)."""
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            others = torch.cuda.memory_allocated(device) - self.resident_bytes()
        sync(device)
        t0 = time.perf_counter()
        loss = self.step()
        sync(device)
        dt = time.perf_counter() - t0
        if device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(device) - others)
        self.losses.append(float(loss))
        if timed:
            self.times.append(dt)


def figures(r: Runner, device: torch.device, tokens: int, flops_per_token: float, peak: float) -> dict:
    """The row of one implementation, from its timed steps (CPU: plus one step for the memory estimate)."""
    med = statistics.median(r.times)
    row = {"step_ms_median": 1e3 * med, "step_ms_min": 1e3 * min(r.times), "step_ms_all": [1e3 * t for t in r.times],
           "tokens_per_s": tokens / med, "flops_per_token": flops_per_token,
           "achieved_flops_per_s": flops_per_token * tokens / med, "mfu": flops_per_token * tokens / med / peak,
           # next-token cross-entropy of the first (probe) and last step (raymoe: without its balance loss)
           "loss_first": r.losses[0], "loss_last": r.losses[-1],
           "params": sum(p.numel() for p in r.model.parameters()),
           "param_bytes": tensor_bytes(r.model.parameters()), "optimizer_state_bytes": optimizer_bytes(r.opt)}
    if device.type == "cuda":
        row["peak_memory_bytes"] = r.peak_bytes
        row["peak_memory_method"] = ("torch.cuda.max_memory_allocated per step, less what other implementations held; "
                                     "max over warm-up and timed steps")
    else:
        saved = saved_for_backward_bytes(r.model, r.step)
        grads = tensor_bytes(p for p in r.model.parameters() if p.requires_grad)
        row["saved_for_backward_bytes"] = saved
        row["peak_memory_bytes"] = row["param_bytes"] + grads + row["optimizer_state_bytes"] + saved
        row["peak_memory_method"] = "estimate: params + grads + AdamW state + storages saved for backward (one extra step)"
    return row


def report(r: Runner) -> None:
    med = statistics.median(r.times)
    print(f"  {r.name}: {1e3 * med:.1f} ms/step median of {len(r.times)}, loss {r.losses[0]:.4f} -> {r.losses[-1]:.4f}",
          flush=True)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda for --shape gpu, else cpu)")
    ap.add_argument("--experts", type=int, default=64, help="CPU shape: routed experts (16: the top-4 variant)")
    ap.add_argument("--top-k", type=int, default=None, help="CPU shape: experts per token (default 6 for 64 experts, else 4)")
    ap.add_argument("--impls", default=None, help="comma-separated transformers experts implementations (default: all registered)")
    ap.add_argument("--schedule", choices=["interleaved", "sequential"], default=None,
                    help="interleaved: all models resident, one step of each per round (default on CPU); "
                         "sequential: one implementation after another, each freed before the next (default on CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    ap.add_argument("--block", type=int, default=1,
                    help="interleaved schedule: each implementation runs this many steps in a row per round, the first "
                         "untimed (it follows another model's step, on cold caches), so the timed ones are steady-state "
                         "steps as in a training run of one model; 1 = one timed step each per round")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads; default 2, --tiny 1)")
    ap.add_argument("--compile", action="store_true",
                    help="also time raymoe with its blocks through torch.compile (MoETransformer.compile_blocks)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and 2 steps (smoke test)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/train_step[-tiny|-gpu|-eEkK].json)")
    args = ap.parse_args()

    import transformers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    device = torch.device(args.device or ("cuda" if args.shape == "gpu" else "cpu"))
    if device.type == "cpu":
        # --tiny's steps take milliseconds: one thread keeps them from spinning on a busy machine.
        torch.set_num_threads(args.threads or (1 if args.tiny else 2))
    shape = "tiny" if args.tiny else args.shape
    run, B, S, steps, warmup = shape_config(shape, args.experts, args.top_k)
    args.steps = args.steps or steps
    args.warmup = warmup if args.warmup is None else args.warmup
    args.schedule = args.schedule or ("sequential" if device.type == "cuda" else "interleaved")
    cfg, tc = run.model, run.train
    bf16 = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext
    tokens = B * S
    flops_per_token = train_flops_per_token(cfg, S)
    counts = count_params(cfg)

    rate = dense_rate(device, args.tiny)
    peak = rate["flops_per_s"]
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}), "
          f"dense {rate['dtype']} {rate['n']}^3 matmul: {peak / 1e9:.1f} GFLOP/s", flush=True)
    print(f"shape {shape}: {counts.total / 1e6:.1f}M params ({counts.activated / 1e6:.1f}M activated), batch {B} x {S}, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, {flops_per_token / 1e6:.1f} MFLOP/token", flush=True)

    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=gen)
    x, y = batch[:, :-1].contiguous().to(device), batch[:, 1:].contiguous().to(device)

    rows, parity, unavailable = {}, {}, {}
    impls = args.impls.split(",") if args.impls else candidate_impls()
    interleaved = args.schedule == "interleaved"
    runners: list[Runner] = []

    def finish(r: Runner) -> None:
        """Sequential schedule: warm up, time and record `r` (its probe step done), then free it."""
        for i in range(args.warmup + args.steps):
            r.run(device, timed=i >= args.warmup)
        report(r)
        rows[r.name] = figures(r, device, tokens, flops_per_token, peak)
        r.model = r.opt = r.step = None
        release(device)

    with tempfile.TemporaryDirectory() as d:
        hf_dict = hf_config_from_model(cfg, "DeepseekV3ForCausalLM")
        torch.manual_seed(0)
        DeepseekV3ForCausalLM(DeepseekV3Config(**hf_dict)).save_pretrained(d)  # transformers' own random init

        # ---------------------------------------------------------------- raymoe
        src = open_source(d)
        plain_src, plain_cfg = to_plain(src.cfg.model), to_plain(cfg)
        differ = [k for k in plain_cfg if k not in ("balance", "init_std") and plain_src[k] != plain_cfg[k]]
        assert not differ, f"the saved model is not the benchmark's: {differ}"
        ref_logits = None
        for name in ["raymoe"] + (["raymoe[compiled]"] if args.compile else []):
            # The imported config turns balancing off (a checkpoint does not say how it was trained); train as the run does.
            model = MoETransformer(dataclasses.replace(src.cfg.model, balance=cfg.balance))
            load_weights(model, src)
            model.to(device)
            if ref_logits is None:
                with torch.no_grad():
                    ref_logits = model.eval()(x).logits.float().cpu()
            model.train()
            if name == "raymoe[compiled]":
                model.compile_blocks()
            opt = build_optimizer(list(model.named_parameters()), tc, device)

            def raymoe_step(model=model, opt=opt):
                with autocast():
                    out = model(x, targets=y)
                    ce = out.token_loss.mean()  # the training loop's loss: the head fused with it (train/loss.py)
                    loss = ce + out.aux_loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return ce.detach()  # reported: the cross-entropy, comparable with transformers' loss

            runner = Runner(name, model, opt, raymoe_step)
            t0 = time.perf_counter()
            runner.run(device, timed=False)  # the probe step every implementation takes (below)
            if name == "raymoe[compiled]":
                print(f"  {name}: first step (compiles) {time.perf_counter() - t0:.1f} s", flush=True)
            del model, opt, raymoe_step  # the runner holds the only references: finish() frees the model
            if interleaved:
                runners.append(runner)
            else:
                finish(runner)
            del runner

        # ---------------------------------------------------------------- transformers
        for impl in impls:
            name = f"transformers[{impl}]"
            if impl == "batched_mm":
                need, have = batched_mm_bytes(cfg, tokens, device), free_memory(device)
                if need > have // 2:
                    unavailable[impl] = (f"needs ~{need / 2**30:.1f} GiB for its per-slot weight copies, "
                                         f"{have / 2**30:.1f} GiB free; not run")
                    print(f"  {name}: skipped ({unavailable[impl]})", flush=True)
                    continue
            hf = hf_opt = runner = None
            try:
                hf = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa",
                                                           experts_implementation=impl).to(device)
                assert hf.config._experts_implementation == impl, hf.config._experts_implementation
                with torch.no_grad():
                    logits = hf.eval()(input_ids=x, use_cache=False).logits.float().cpu()
                parity[impl] = rel_err(ref_logits, logits)
                del logits
                print(f"  parity raymoe vs {name}: relative error {parity[impl]:.2e}", flush=True)
                if not parity[impl] < PARITY_TOL:
                    print(f"  {name}: logits differ from raymoe's beyond {PARITY_TOL:g}; not timed", flush=True)
                    continue
                hf.train()
                hf_opt = torch.optim.AdamW(hf.parameters(), lr=tc.lr, betas=tc.betas, eps=tc.eps,
                                           weight_decay=tc.weight_decay, fused=device.type in ("cuda", "cpu"))

                def hf_step(hf=hf, hf_opt=hf_opt):
                    with autocast():
                        loss = hf(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss
                    loss.backward()
                    hf_opt.step()
                    hf_opt.zero_grad(set_to_none=True)
                    return loss.detach()

                runner = Runner(name, hf, hf_opt, hf_step)
                del hf_step
                # One step now, so an implementation that cannot train here is reported before any timing.
                runner.run(device, timed=False)
                if interleaved:
                    runners.append(runner)
                else:
                    finish(runner)
            except Exception as e:  # noqa: BLE001 - an implementation this device cannot run is reported, not fatal
                unavailable[impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                print(f"  {name}: unavailable ({unavailable[impl]})", flush=True)
            finally:
                del hf, hf_opt, runner
                release(device)

        if interleaved:
            # One step of each a round, in an order shuffled every round (seeded): a slow spell of a
            # shared machine hits all alike, and no side always follows the same one (a rotated
            # order kept each side's predecessor; the step after transformers' page-faulting
            # grouped_mm step starts on cold caches).
            if args.block < 1:
                raise SystemExit(f"--block {args.block} must be >= 1")
            per_round = max(args.block - 1, 1)  # timed steps per implementation and round
            for i in range(args.warmup + -(-args.steps // per_round)):
                for r in random.Random(i).sample(runners, len(runners)):
                    for j in range(args.block):
                        timed = i >= args.warmup and (args.block == 1 or j > 0) and len(r.times) < args.steps
                        r.run(device, timed=timed)
            for r in runners:
                report(r)
                rows[r.name] = figures(r, device, tokens, flops_per_token, peak)

    base = rows["raymoe"]
    # raymoe / each transformers implementation: > 1 means raymoe has more tokens/s (or takes longer, or holds more).
    # *_best use the fastest timed step: on a shared machine a busy spell only ever adds time.
    ratios = {k: {"tokens_per_s": base["tokens_per_s"] / r["tokens_per_s"],
                  "tokens_per_s_best": r["step_ms_min"] / base["step_ms_min"],
                  "step_time": base["step_ms_median"] / r["step_ms_median"],
                  "peak_memory": base["peak_memory_bytes"] / r["peak_memory_bytes"]}
              for k, r in rows.items() if not k.startswith("raymoe")}
    if interleaved:
        # Step i of every implementation ran in the same round: the median of the per-round ratios
        # cancels a busy spell that the ratio of medians only dilutes.
        for k in ratios:
            ratios[k]["tokens_per_s_paired"] = statistics.median(
                t / b for t, b in zip(rows[k]["step_ms_all"], base["step_ms_all"]))
    if "raymoe[compiled]" in rows:  # the compiled row against eager raymoe and each transformers implementation
        comp = rows["raymoe[compiled]"]
        compiled_ratios = {k: {"tokens_per_s": comp["tokens_per_s"] / r["tokens_per_s"],
                               "tokens_per_s_best": r["step_ms_min"] / comp["step_ms_min"]}
                           for k, r in rows.items() if k != "raymoe[compiled]"}
    parity_passed = bool(parity) and all(v < PARITY_TOL for v in parity.values())

    print(f"\n{'implementation':26} {'step ms':>9} {'best ms':>9} {'tok/s':>8} {'TFLOP/s':>8} {'MFU':>6} {'peak MB':>9} "
          f"{'raymoe x':>8} {'x best':>7} {'x paired':>8}")
    for k, r in rows.items():
        speed = ("", "", "") if k.startswith("raymoe") else (
            f"{ratios[k]['tokens_per_s']:.2f}", f"{ratios[k]['tokens_per_s_best']:.2f}",
            f"{ratios[k]['tokens_per_s_paired']:.2f}" if "tokens_per_s_paired" in ratios[k] else "-")
        print(f"{k:26} {r['step_ms_median']:>9.1f} {r['step_ms_min']:>9.1f} {r['tokens_per_s']:>8.0f} "
              f"{r['achieved_flops_per_s'] / 1e12:>8.3f} {100 * r['mfu']:>5.1f}% {r['peak_memory_bytes'] / 1e6:>9.1f} "
              f"{speed[0]:>8} {speed[1]:>7} {speed[2]:>8}")
    for k, why in unavailable.items():
        print(f"transformers[{k}]: {why}")
    if "raymoe[compiled]" in rows:
        print("raymoe[compiled] x: " + ", ".join(f"{k} {v['tokens_per_s']:.2f} (best {v['tokens_per_s_best']:.2f})"
                                                 for k, v in compiled_ratios.items()))
    print(f"raymoe x = raymoe tokens/s / that implementation's (median step; x best: fastest step; "
          f"x paired: median over rounds of the two steps' ratio, interleaved schedule only); "
          f"MFU against the measured dense rate "
          f"{peak / 1e12:.3f} TFLOP/s; peak memory: {base['peak_memory_method']}")

    cmd = "python bench/train_step.py" + " ".join([""] + [a for a in sys.argv[1:]])
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": cmd,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "device": {"type": device.type,
                   "name": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
                   "threads": torch.get_num_threads() if device.type == "cpu" else None},
        "shape": {"name": shape, "batch": B, "seq_len": S, "tokens_per_step": tokens, "model": to_plain(cfg),
                  "total_params": counts.total, "activated_params": counts.activated},
        "dtype": "bf16 autocast (fp32 weights, fused AdamW)" if bf16 else "fp32 (fused AdamW)",
        "steps": args.steps, "warmup": args.warmup, "probe_steps": 1, "schedule": args.schedule, "block": args.block,
        "optimizer": {"lr": tc.lr, "betas": list(tc.betas), "eps": tc.eps, "weight_decay": tc.weight_decay,
                      "raymoe": OPTIMIZER_SOURCE, "transformers": "torch.optim.AdamW over all parameters"},
        "dense_rate": rate,
        "flops_per_token": flops_per_token,
        "parity": {"tolerance": PARITY_TOL, "relative_error": parity, "passed": parity_passed},
        "implementations": rows,
        "unavailable": unavailable,
        "ratios": ratios,
        **({"compiled_ratios": compiled_ratios} if "raymoe[compiled]" in rows else {}),
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        # 1-minute load averages at the start and the end: on a shared machine the ratio moves with
        # its state (1.16-1.28x on the same tree, docs/PERFORMANCE.md lever 26)
        "load_average": [LOAD_AT_START, load_average()],
    }
    # Each shape its own file: a GPU run or the 16-expert variant does not overwrite the CPU figures.
    suffix = {"tiny": "-tiny", "gpu": "-gpu"}.get(shape, "" if (cfg.num_experts, cfg.top_k) == (64, 6) else
                                                   f"-e{cfg.num_experts}k{cfg.top_k}")
    path = args.out or os.path.join(HERE, "results", f"train_step{suffix}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    if not parity_passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
