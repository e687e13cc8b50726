"""One MoE layer, forward + backward: raymoe's MoE against transformers' DeepSeek-V3 MoE block holding
the same weights, in one process, with the device's dense matmul rate as the ceiling.

    python bench/moe_layer.py                          # CPU: a scaled-down layer (D 256, F 128, 64 experts top-6, 4096 tokens)
    python bench/moe_layer.py --tiny                   # seconds: the smoke test (tests/unit/test_bench_moe_layer.py)
    python bench/moe_layer.py --shape 16b              # GPU: DeepSeek-16B's layer, 16K tokens, bf16
    python bench/moe_layer.py --shape v3-rank          # GPU: one expert-parallel rank of DeepSeek-V3, bf16
    python bench/moe_layer.py --device cpu --dtype fp32 --iters 10 --out /tmp/x.json

Needs torch, transformers and safetensors only: of raymoe it imports raymoe.config and raymoe.model.*
(no Ray, no MLflow), so it runs on a bare GPU machine with a copy of this repository.

Layers. raymoe: `raymoe.model.moe.MoE` built from a ModelConfig (sigmoid scores, top-k, route_scale,
normalized top-k weights, optional group limit, dropless: capacity_factor null). transformers:
`DeepseekV3MoE` built from `DeepseekV3Config(**hf_config_from_model(model_cfg, "DeepseekV3ForCausalLM"))`,
the config raymoe itself exports for that model. Weights are drawn once (seeded) into raymoe's layer
and copied across explicitly: experts.gate_up_proj[E, 2F, D] = w13^T (raymoe's gate and up side by side, [E, D, 2F]),
experts.down_proj[E, D, F] = w2^T (w2 [E, F, D]), gate.weight = router.weight [E, D],
gate.e_score_correction_bias = router.expert_bias (both zero, so both layers route alike), shared
experts' gate/up/down_proj = shared.w1/w3/w2 - the layout raymoe's import reads (model/hf.py).
Every balance coefficient is 0: raymoe's aux loss is then a constant 0 (transformers' block computes
none), and the selection bias is never moved. raymoe runs in train mode.

Parity, asserted before any timing. (1) In fp32 on the device: raymoe against transformers' eager
expert loop on the benchmark's own inputs: routed + shared output y, the input gradient and every
weight gradient for the same upstream gradient on y, relative error (||a - b|| / ||b||) < 1e-4, and
the chosen experts identical. (2) Each transformers implementation in the benchmark dtype against
raymoe in that dtype: y within 1e-4 (fp32) or 2e-2 (bf16/fp16).

transformers' experts implementations. `DeepseekV3Experts` is decorated with
`@use_experts_implementation` (transformers/integrations/moe.py): each call dispatches on
`config._experts_implementation` to "eager" (the class's own loop over the hit experts), or a key of
`ALL_EXPERTS_FUNCTIONS`: "grouped_mm" (sort by expert, torch.nn.functional.grouped_mm /
torch._grouped_mm, else a per-expert mm custom op), "batched_mm" (gathers one weight matrix per
(token, expert) slot and bmm's: T*K*3*D*F weights materialized, for decoding), "deepgemm" and
"sonicmoe" (CUDA kernels fetched from the Hub with the `kernels` package). A PreTrainedModel picks
"grouped_mm" when none is asked for; a standalone block has None (= eager), so this bench sets it.
Every key the installed transformers registers is tried; one that cannot run here (no CUDA, no
`kernels`, no network: HF_HUB_OFFLINE=1 unless set) is listed as skipped with its error, and
batched_mm is skipped when its gathered weights (and their gradients) would exceed a quarter of the
free memory. The FP8 experts functions (finegrained_fp8.py) need FP8 weights and are not tried.

Timing. Warm-up iterations, then N timed iterations of: forward on x [1, T, D] (requires grad),
backward with a fixed upstream gradient on y, gradients set to None before each iteration (outside
the timed region). CPU: time.perf_counter; CUDA: CUDA events around each iteration, then
synchronize. Reported: median (and min) ms.

FLOPs. Routed expert GEMMs: 3 projections x 2 FLOPs x T*K*D*F forward, x3 for forward + backward
(input and weight gradients) = 18*T*K*D*F. The routed rate ("expert GFLOP/s") counts ONLY these:
not the shared experts (18*T*D*F_shared, reported separately, and in "all-expert GFLOP/s"), not the
router GEMM. Ceiling: the dense matmul rate measured in the same run, n^3 matmul in the benchmark
dtype (CPU n=1024, CUDA n=8192), 2n^3 FLOPs, median of 10.

raymoe split. The same layer's stages measured one at a time, each forward + backward on the inputs
the full layer would give it (computed once, detached into leaves that require grad), with random
upstream gradients of the right shapes: router (`moe.router`, backward from the combine weights),
permute (`raymoe.model.moe.permute`: the gather of x into expert order, backward from x_ND and the
sorted weights), expert GEMMs (`moe.experts` on the sorted rows: three grouped GEMMs, the SwiGLU and the routing
weights, applied to the hidden before the down projection), combine (`raymoe.model.moe.unpermute`:
the index_add back to token order) and shared
experts (`moe.shared`). The sum is compared with the whole layer's time; the remainder is what the
whole layer does beyond its stages (the final add, gradient accumulation into x from three paths,
autograd bookkeeping across stage boundaries).

Prints a table and writes JSON to bench/results/moe_layer.json (the CPU default shape),
moe_layer-tiny.json (--tiny), moe_layer-<shape>.json (other shapes), or --out (a .json path or a
folder).

Shapes (tokens T, hidden D, expert hidden F, experts E, top-k K, shared experts):
- tiny:    T 256,   D 64,   F 32,   E 8,  K 2, 1 shared, 4 groups / top-2 groups (exercises the group limit)
- cpu:     T 4096,  D 256,  F 128,  E 64, K 6, 2 shared (16B's expert layout, widths / 8, 4 times fewer tokens)
- 16b:     T 16384, D 2048, F 1408, E 64, K 6, 2 shared: DeepSeek-MoE-16B's layer (its routing made
           V3-style: sigmoid scores, normalized top-k weights, route_scale 1)
- v3-rank: T 4096,  D 7168, F 2048, E 8,  K 8, 1 shared, route_scale 2.5: what one rank of DeepSeek-V3
           under 32-way expert parallelism computes (256 experts / 32 = 8 local experts). With
           balanced top-8-of-256 routing a rank's experts receive T*8 slots for its T tokens, T per
           expert; modelled as top-8 routing over the 8 local experts, so every local expert sees
           every token: the same GEMM shapes, without the all-to-all dispatch and a router of 8, not 256.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "platform"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hub kernels (deepgemm, sonicmoe) fail fast instead of downloading

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402

from raymoe.config import config_from_dict  # noqa: E402
from raymoe.model.hf import hf_config_from_model  # noqa: E402
from raymoe.model.moe import MoE, permute, unpermute  # noqa: E402

ARCH = "DeepseekV3ForCausalLM"
SHAPES = {
    "tiny": dict(tokens=256, hidden=64, expert_hidden=32, experts=8, top_k=2, shared=1, route_scale=2.5, groups=4, top_k_groups=2),
    "cpu": dict(tokens=4096, hidden=256, expert_hidden=128, experts=64, top_k=6, shared=2, route_scale=1.0, groups=1, top_k_groups=1),
    "16b": dict(tokens=16384, hidden=2048, expert_hidden=1408, experts=64, top_k=6, shared=2, route_scale=1.0, groups=1, top_k_groups=1),
    "v3-rank": dict(tokens=4096, hidden=7168, expert_hidden=2048, experts=8, top_k=8, shared=1, route_scale=2.5, groups=1, top_k_groups=1),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PARITY_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


# ----------------------------------------------------------------------------- building the two layers


def model_config(s: dict):
    """The raymoe ModelConfig of one MoE layer of shape `s` (attention keys are MLA defaults: unused)."""
    return config_from_dict({"name": "b", "model": {
        "num_layers": 1, "attention": "mla", "hidden_size": s["hidden"], "num_experts": s["experts"], "top_k": s["top_k"],
        "expert_intermediate_size": s["expert_hidden"], "num_shared_experts": s["shared"], "score_func": "sigmoid",
        "route_scale": s["route_scale"], "norm_topk_prob": True, "num_expert_groups": s["groups"],
        "top_k_groups": s["top_k_groups"], "capacity_factor": None,
        "balance": {"bias_update_rate": 0.0, "aux_loss_coef": 0.0, "seq_aux_loss_coef": 0.0, "z_loss_coef": 0.0}}}).model


@torch.no_grad()
def build_layers(s: dict, device: torch.device, seed: int = 0):
    """(raymoe MoE, transformers DeepseekV3MoE, model config) with the same fp32 weights on `device`."""
    cfg = model_config(s)
    ours = MoE(cfg).to(device)
    hf_cfg = transformers.DeepseekV3Config(**hf_config_from_model(cfg, ARCH))
    hf_cfg._experts_implementation = "eager"
    theirs = DeepseekV3MoE(hf_cfg).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    D = cfg.hidden_size
    for name, p in ours.named_parameters():  # 1/sqrt(fan_in): routing decisive, activations O(1)
        fan_in = p.shape[-1] if name.startswith("shared.") or name == "router.weight" else p.shape[-2]
        p.copy_(torch.randn(p.shape, generator=g, device=device) / fan_in ** 0.5)
    ours.router.expert_bias.zero_()
    F_ = cfg.expert_intermediate_size
    e = ours.experts
    written = {
        "gate.weight": ours.router.weight,
        "gate.e_score_correction_bias": ours.router.expert_bias,
        # transformers 5's fused layout (model/hf.py reads it the same way): rows [0, F) gate, [F, 2F) up.
        "experts.gate_up_proj": e.w13.transpose(1, 2),
        "experts.down_proj": e.w2.transpose(1, 2),
        "shared_experts.gate_proj.weight": ours.shared.w1.weight,
        "shared_experts.up_proj.weight": ours.shared.w3.weight,
        "shared_experts.down_proj.weight": ours.shared.w2.weight,
    }
    targets = {**dict(theirs.named_parameters()), **dict(theirs.named_buffers())}
    assert set(targets) == set(written), f"transformers' block has {sorted(targets)}, the copy fills {sorted(written)}"
    for k, t in written.items():
        assert targets[k].shape == t.shape, (k, tuple(targets[k].shape), tuple(t.shape))
        targets[k].copy_(t)
    assert theirs.experts.gate_up_proj.shape == (cfg.num_experts, 2 * F_, D)
    return ours, theirs, cfg


def grad_pairs(ours: MoE, theirs: DeepseekV3MoE) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """raymoe's weight gradients next to transformers', in raymoe's layout."""
    gu = theirs.experts.gate_up_proj.grad
    return {
        "router.weight": (ours.router.weight.grad, theirs.gate.weight.grad),
        "experts.w13": (ours.experts.w13.grad, gu.transpose(1, 2)),
        "experts.w2": (ours.experts.w2.grad, theirs.experts.down_proj.grad.transpose(1, 2)),
        "shared.w1": (ours.shared.w1.weight.grad, theirs.shared_experts.gate_proj.weight.grad),
        "shared.w3": (ours.shared.w3.weight.grad, theirs.shared_experts.up_proj.weight.grad),
        "shared.w2": (ours.shared.w2.weight.grad, theirs.shared_experts.down_proj.weight.grad),
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def zero_grads(*mods, x=None) -> None:
    for m in mods:
        for p in m.parameters():
            p.grad = None
    if x is not None:
        x.grad = None


# ----------------------------------------------------------------------------- implementations


def hf_implementations() -> list[str]:
    """'eager' and every experts implementation the installed transformers registers, best-known first."""
    names = ["eager"]
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        names += list(ALL_EXPERTS_FUNCTIONS.valid_keys())
    except ImportError:
        pass
    order = {"eager": 0, "grouped_mm": 1, "batched_mm": 2}
    return sorted(dict.fromkeys(names), key=lambda n: (order.get(n, 3), n))


def hf_grouped_mm_kernel(x: torch.Tensor, w: torch.Tensor) -> str:
    """What transformers' grouped_mm runs here (its own dispatch rule, integrations/moe.py)."""
    try:
        from transformers.integrations.moe import _can_use_grouped_mm
        offs = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        if _can_use_grouped_mm(x, w, offs):
            return "torch.nn.functional.grouped_mm" if hasattr(torch.nn.functional, "grouped_mm") else "torch._grouped_mm"
        return "transformers::grouped_mm_fallback (one mm per expert)"
    except Exception as e:  # private helper: report rather than fail
        return f"unknown ({type(e).__name__})"


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def batched_mm_bytes(s: dict, dtype: torch.dtype) -> int:
    """batched_mm gathers each slot's weights (T*K*3*D*F numbers) and backward makes as many gradients."""
    return 2 * s["tokens"] * s["top_k"] * 3 * s["hidden"] * s["expert_hidden"] * torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, iters: int, warmup: int, before=None) -> list[float]:
    """Seconds of each of `iters` calls of fn() after `warmup` untimed ones; before() runs untimed."""
    out = []
    for i in range(warmup + iters):
        if before is not None:
            before()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        if i >= warmup:
            out.append(dt)
    return out


def summary(times: list[float]) -> dict:
    return {"ms_median": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times), "ms": [round(1e3 * t, 4) for t in times]}


def dense_rate(device: torch.device, dtype: torch.dtype) -> dict:
    n = 8192 if device.type == "cuda" else 1024
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    times = timed(lambda: torch.mm(a, b), device, iters=10, warmup=3)
    med = statistics.median(times)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "ms_median": 1e3 * med, "gflop_per_s": 2 * n ** 3 / med / 1e9}


def layer_step(layer, x, g, ours: bool):
    def step():
        y = layer(x)[0] if ours else layer(x)
        y.backward(g)
    return step


def split(moe: MoE, x: torch.Tensor, device: torch.device, iters: int, warmup: int) -> dict:
    """raymoe's stages, each forward + backward on the inputs the whole layer would give it."""
    T, D = x.shape[1], x.shape[2]
    gen = torch.Generator(device=device).manual_seed(2)
    rnd = lambda t: torch.randn(t.shape, generator=gen, device=device).to(t.dtype)  # noqa: E731
    x_TD = x.detach().reshape(T, D).requires_grad_(True)
    with torch.no_grad():
        routing = moe.router(x_TD, batch_size=1)
        x_ND, counts_E, token_N, weight_N = permute(x_TD, routing, moe.num_experts)
        out_ND = moe.experts(x_ND, counts_E, weight_N)
    routing.weight_TK.requires_grad_(True)
    g_TK, g_ND, g_N, g_TD = rnd(routing.weight_TK), rnd(x_ND), rnd(weight_N), rnd(x_TD)
    x_ND_leaf = x_ND.detach().requires_grad_(True)
    out_leaf, w_leaf = out_ND.detach().requires_grad_(True), weight_N.detach().float().requires_grad_(True)

    def router():
        r = moe.router(x_TD, batch_size=1)
        torch.autograd.backward([r.weight_TK], [g_TK])

    def perm():
        xs, _, _, ws = permute(x_TD, routing, moe.num_experts)
        torch.autograd.backward([xs, ws], [g_ND, g_N])

    def experts():  # as MoE.routed runs them: each slot's hidden scaled by its routing weight before w2
        moe.experts(x_ND_leaf, counts_E, w_leaf).backward(g_ND)

    def combine():
        unpermute(out_leaf, token_N, None, T).backward(g_TD)

    def shared():
        moe.shared(x_TD).backward(g_TD)

    stages = {"router": router, "permute": perm, "experts": experts, "combine": combine}
    if moe.shared is not None:
        stages["shared"] = shared
    def clear():
        zero_grads(moe, x=x_TD)
        for t in (routing.weight_TK, x_ND_leaf, out_leaf, w_leaf):
            t.grad = None

    return {k: summary(timed(fn, device, iters, warmup, before=clear)) for k, fn in stages.items()}


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 16b on CUDA, cpu on CPU")
    ap.add_argument("--tiny", action="store_true", help="the tiny shape and 3 iterations (smoke test)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default: tiny 3, CPU 10, CUDA 20)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default: tiny 2, CPU 2, CUDA 5)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    ap.add_argument("--out", default=None, help="a .json file or a folder (default: bench/results/)")
    args = ap.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    shape = "tiny" if args.tiny else (args.shape or ("16b" if cuda else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    iters = args.iters or (3 if shape == "tiny" else 20 if cuda else 10)
    warmup = args.warmup if args.warmup is not None else (2 if shape == "tiny" else 5 if cuda else 2)
    if not cuda:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32 (bf16 timing is unaffected)
    torch.backends.cudnn.allow_tf32 = False
    s = SHAPES[shape]
    T, D, F_, E, K = s["tokens"], s["hidden"], s["expert_hidden"], s["experts"], s["top_k"]
    F_shared = s["shared"] * F_
    if cuda:
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} thread(s)"
    print(f"moe_layer: shape {shape} (T {T}, D {D}, F {F_}, E {E}, top-{K}, {s['shared']} shared, "
          f"groups {s['groups']}/{s['top_k_groups']}), {str(dtype).removeprefix('torch.')} on {dev_name}, "
          f"{warmup} warm-up + {iters} timed iterations")

    # Other processes on the cores stall the threads' barriers (ms-scale spikes on CPU): recorded.
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    dense = dense_rate(device, dtype)

    ours, theirs, cfg = build_layers(s, device)
    ours.train()
    theirs.train()
    gen = torch.Generator(device=device).manual_seed(1)
    x32 = torch.randn(1, T, D, generator=gen, device=device)
    g32 = torch.randn(1, T, D, generator=gen, device=device)

    # ---- (1) fp32 parity: raymoe vs transformers' eager loop, outputs and every gradient.
    tol32 = PARITY_TOL[torch.float32]
    xa, xb = x32.clone().requires_grad_(True), x32.clone().requires_grad_(True)
    ya, aux, stats = ours(xa)
    yb = theirs(xb)
    ya.backward(g32)
    yb.backward(g32)
    with torch.no_grad():
        _, _, hf_idx = theirs.gate(x32)
        routing = ours.router(x32.reshape(T, D))
    same_experts = bool(torch.equal(routing.expert_TK.sort(-1).values, hf_idx.sort(-1).values))
    errs = {"y": rel_err(ya, yb), "dx": rel_err(xa.grad, xb.grad)}
    errs.update({f"d{k}": rel_err(a, b) for k, (a, b) in grad_pairs(ours, theirs).items()})
    parity32 = {"against": "hf_eager", "dtype": "float32", "tol": tol32, "rel_err": errs, "same_experts": same_experts,
                "aux_loss": float(aux), "passed": same_experts and max(errs.values()) < tol32}
    print(f"fp32 parity vs transformers eager: y {errs['y']:.2e}, dx {errs['dx']:.2e}, worst weight grad "
          f"{max(v for k, v in errs.items() if k not in ('y', 'dx')):.2e}, same experts {same_experts}")
    assert parity32["passed"], f"raymoe and transformers disagree in fp32: {parity32}"
    load = stats.tokens_per_expert.float()
    balance = {"tokens_per_expert_min": int(load.min()), "tokens_per_expert_mean": float(load.mean()),
               "tokens_per_expert_max": int(load.max())}
    del xa, xb, ya, yb
    zero_grads(ours, theirs)

    # ---- the benchmark dtype
    if dtype != torch.float32:
        ours.to(dtype)
        theirs.to(dtype)
    x = x32.to(dtype).requires_grad_(True)
    g = g32.to(dtype)
    with torch.no_grad():
        y_ref = ours(x)[0].float()

    flops_routed = 18 * T * K * D * F_
    flops_shared = 18 * T * D * F_shared
    rows: dict[str, dict] = {}

    def run(name: str, step, mods) -> dict:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        r = summary(timed(step, device, iters, warmup, before=lambda: zero_grads(*mods, x=x)))
        t = r["ms_median"] / 1e3
        r.update(status="ok", expert_gflop_per_s=flops_routed / t / 1e9,
                 all_expert_gflop_per_s=(flops_routed + flops_shared) / t / 1e9,
                 fraction_of_dense=flops_routed / t / 1e9 / dense["gflop_per_s"])
        if cuda:
            r["peak_extra_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 30
        zero_grads(*mods, x=x)
        return r

    rows["raymoe"] = {**run("raymoe", layer_step(ours, x, g, ours=True), [ours]), "rel_err": 0.0}

    tol = PARITY_TOL[dtype]
    for impl in hf_implementations():
        key = f"hf_{impl}"
        theirs.config._experts_implementation = impl
        if impl == "batched_mm":
            need, free = batched_mm_bytes(s, dtype), free_bytes(device)
            if need > free / 4:
                rows[key] = {"status": "skipped", "error": f"needs ~{need / 2**30:.1f} GiB of gathered weights and their "
                             f"gradients (T*K*3*D*F*2), over a quarter of the {free / 2**30:.1f} GiB free"}
                print(f"{key}: skipped ({rows[key]['error']})")
                continue
        try:
            with torch.no_grad():
                err = rel_err(theirs(x).float(), y_ref)
        except Exception as e:  # noqa: BLE001 - an implementation this device or install cannot run
            rows[key] = {"status": "skipped", "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"}
            print(f"{key}: skipped ({rows[key]['error']})")
            if cuda:
                torch.cuda.empty_cache()
            continue
        assert err < tol, f"transformers {impl} disagrees with raymoe in {dtype}: relative error {err:.2e} >= {tol}"
        rows[key] = {**run(key, layer_step(theirs, x, g, ours=False), [theirs]), "rel_err": err}
        if impl == "grouped_mm":
            rows[key]["kernel"] = hf_grouped_mm_kernel(x.reshape(T, D), theirs.experts.gate_up_proj.transpose(-2, -1))
    theirs.config._experts_implementation = "eager"

    ratios = {k: {"raymoe_time_over_baseline": rows["raymoe"]["ms_median"] / r["ms_median"],
                  "speedup": r["ms_median"] / rows["raymoe"]["ms_median"]}
              for k, r in rows.items() if k != "raymoe" and r["status"] == "ok"}

    parts = split(ours, x.detach(), device, iters, warmup)
    total = rows["raymoe"]["ms_median"]
    part_sum = sum(p["ms_median"] for p in parts.values())
    stages = {k: {**p, "fraction_of_total": p["ms_median"] / total} for k, p in parts.items()}
    stages["experts"]["expert_gflop_per_s"] = flops_routed / (parts["experts"]["ms_median"] / 1e3) / 1e9
    stages["experts"]["fraction_of_dense"] = stages["experts"]["expert_gflop_per_s"] / dense["gflop_per_s"]
    split_out = {"stages": stages, "sum_ms": part_sum, "total_ms": total, "sum_over_total": part_sum / total,
                 "method": "each stage alone, forward + backward on the inputs the layer gives it (leaves), "
                           "random upstream gradients; median ms"}

    # ---- table
    unit, scale = ("TFLOP/s", 1e-3) if cuda else ("GFLOP/s", 1.0)
    print(f"dense {dense['n']}^3 {dense['dtype']} matmul: {dense['gflop_per_s'] * scale:.1f} {unit} (the ceiling)")
    print(f"routed expert FLOPs, fwd+bwd: 18*T*K*D*F = {flops_routed / 1e9:.2f} GFLOP (3 proj x 2 x T*K*D*F, x3); "
          f"shared experts (not in 'expert {unit}'): {flops_shared / 1e9:.2f} GFLOP")
    print(f"load: {balance['tokens_per_expert_min']}..{balance['tokens_per_expert_max']} slots per expert "
          f"(mean {balance['tokens_per_expert_mean']:.0f})")
    print(f"{'implementation':16} {'ms median':>10} {'ms min':>9} {'expert ' + unit:>16} {'of dense':>9} "
          f"{'all-expert ' + unit:>20} {'raymoe/this t':>14} {'rel err':>9}")
    for k, r in rows.items():
        if r["status"] != "ok":
            print(f"{k:16} skipped: {r['error'][:100]}")
            continue
        ratio = f"{ratios[k]['raymoe_time_over_baseline']:.3f}" if k in ratios else "-"
        print(f"{k:16} {r['ms_median']:>10.2f} {r['ms_min']:>9.2f} {r['expert_gflop_per_s'] * scale:>16.2f} "
              f"{r['fraction_of_dense']:>9.1%} {r['all_expert_gflop_per_s'] * scale:>20.2f} {ratio:>14} {r['rel_err']:>9.1e}")
    print("raymoe split (each stage alone, fwd+bwd):")
    for k, p in stages.items():
        extra = (f"   {p['expert_gflop_per_s'] * scale:.2f} {unit}, {p['fraction_of_dense']:.1%} of dense"
                 if k == "experts" else "")
        print(f"  {k:10} {p['ms_median']:>9.2f} ms {p['fraction_of_total']:>7.1%}{extra}")
    print(f"  {'sum':10} {part_sum:>9.2f} ms {part_sum / total:>7.1%} of the whole layer's {total:.2f} ms")

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "python bench/moe_layer.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__, "transformers": transformers.__version__, "device": dev_name,
        "load_average_at_start": load_avg,
        "shape": {"name": shape, **s}, "dtype": str(dtype).removeprefix("torch."), "iters": iters, "warmup": warmup,
        "dense": dense,
        "flops": {"routed_fwd_bwd": flops_routed, "shared_fwd_bwd": flops_shared,
                  "formula": "routed expert GEMMs: 3 projections x 2 FLOPs x T*K*D*F forward, x3 forward+backward "
                             "(18*T*K*D*F); expert_gflop_per_s counts only these; all_expert_gflop_per_s adds the "
                             "shared experts (18*T*D*F_shared); the router GEMM is in neither"},
        "parity": {"fp32": parity32, "bench_dtype_tol": tol,
                   "bench_dtype_rel_err": {k: r["rel_err"] for k, r in rows.items() if r["status"] == "ok"}},
        "routing": balance, "implementations": rows, "ratios": ratios, "split": split_out,
        "hf_experts_implementations": {"found": hf_implementations(),
                                       "selected_by": "config._experts_implementation (DeepseekV3Experts is "
                                                      "@use_experts_implementation; integrations/moe.py)"},
    }
    default_name = {"tiny": "moe_layer-tiny.json", "cpu": "moe_layer.json"}.get(shape, f"moe_layer-{shape}.json")
    out = args.out or os.path.join(HERE, "results")
    path = out if out.endswith(".json") else os.path.join(out, default_name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
