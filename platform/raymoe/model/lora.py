"""Low-rank adapters (LoRA, Hu et al. 2021) and freezing, applied to a built model from outside,
as parallelism is.

    model = MoETransformer(cfg.model); model.init_weights(seed)
    apply_lora(model, cfg.lora, seed=cfg.train.seed)   # before parallelize(): adapters for every expert
    set_trainable(model, cfg)                          # the base frozen; adapters (and router) train
    plan = parallelize(model, mesh)                    # expert adapters are sliced with their experts
    ...
    merge_lora(model)                                  # W += (alpha/r) B A; adapters gone

Where the adapters live:
- A linear layer (attention projections, dense FFN, shared experts) gets two parameters on the
  module itself, `lora_A` [r, in] and `lora_B` [out, r], and a forward hook that adds
  (alpha/r) B A dropout(x) to its output. The layer's class and its base parameter names do not
  change, so a base checkpoint still loads into the adapted model under the same names.
- Routed experts get stacked adapters on GroupedExperts, one pair per projection: `lora_A1`
  [E, D, r] and `lora_B1` [E, r, F] for the gate, `lora_A3`/`lora_B3` for the up projection (the
  two halves of `w13` [E, D, 2F]), `lora_A2` [E, F, r] and `lora_B2` [E, r, D] for `w2`, run
  through the same grouped GEMM as the experts (moe.py). Dim 0 indexes experts, so expert
  parallelism slices them with the expert weights and the all-to-all does not change.

B starts at zero, so step 0 computes exactly the base model; A is drawn from a generator seeded
once for the whole unsliced model, so every layout (world size, expert degree) starts from the
same adapters. The merge uses the same delta functions as reading a LoRA checkpoint for serving
(`adapter_delta`), so a merged export and a merged load cannot drift apart.

Why our own code rather than PEFT: PEFT wraps whole nn.Linear modules (renaming their
parameters) and has no notion of stacked experts run by a grouped GEMM; what is needed here is
two parameters per layer, a hook, and the expert case inside moe.py.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.config import LoraConfig, RunConfig
from raymoe.model.moe import GroupedExperts

ADAPTER = re.compile(r"\.lora_[AB][123]?$")
_EXPERT_WEIGHT = {"13": ("1", "3"), "2": ("2",)}  # each stacked weight and the adapters that add to it, in column order
_EXPERT_PROJ = tuple(k for ks in _EXPERT_WEIGHT.values() for k in ks)  # "1" gate, "3" up (w13's halves), "2" down


def is_adapter(name: str) -> bool:
    return bool(ADAPTER.search(name))


def part_of(name: str) -> str:
    """Which freezable part (config.FREEZABLE) a parameter name belongs to."""
    module = name.rsplit(".", 1)[0]
    if name.startswith(("embed.", "lm_head.")):
        return "embeddings"
    if module.split(".")[-1].endswith("norm") or name == "norm.weight":
        return "norms"
    if name.endswith(".router.weight"):
        return "router"
    if ".attn." in name:
        return "attention"
    if ".ffn.experts." in name:
        return "routed_experts"
    if ".ffn.shared." in name:
        return "shared_experts"
    if ".ffn." in name:
        return "dense_ffn"
    raise AssertionError(f"parameter {name} belongs to no freezable part")


def _lora_hook(module: nn.Linear, args, output):
    x = F.dropout(args[0], module.lora_dropout, module.training)
    return output + module.lora_scale * F.linear(F.linear(x, module.lora_A), module.lora_B)


def _targets(model: nn.Module, targets: tuple[str, ...]):
    """(name, module) of every linear layer and expert stack that gets adapters."""
    for name, mod in model.named_modules():
        if isinstance(mod, GroupedExperts):
            if "routed_experts" in targets:
                yield name, mod
        elif isinstance(mod, nn.Linear) and name not in ("lm_head",):
            if ".attn." in name and "attention" in targets:
                yield name, mod
            elif ".ffn.shared." in name and not name.endswith(".gate") and "shared_experts" in targets:
                yield name, mod
            elif ".ffn.w" in name and "dense_ffn" in targets:
                yield name, mod


def apply_lora(model: nn.Module, cfg: LoraConfig, seed: int = 0) -> int:
    """Add adapters to the targets of `cfg`; returns how many parameters they add. Call before
    parallelize(). On a real device they are initialized at once; on the meta device they are
    allocated empty and `init_adapters` fills them after materialization."""
    if not cfg.enabled:
        return 0
    r, added = cfg.rank, 0
    for name, mod in _targets(model, cfg.targets):
        if isinstance(mod, GroupedExperts):
            E, (_, F_, D) = mod.num_experts, mod.w2.shape
            for k in _EXPERT_PROJ:
                d_in, d_out = (F_, D) if k == "2" else (D, F_)
                mod.register_parameter(f"lora_A{k}", nn.Parameter(mod.w2.new_empty(E, d_in, r)))
                mod.register_parameter(f"lora_B{k}", nn.Parameter(mod.w2.new_empty(E, r, d_out)))
                added += E * r * (d_in + d_out)
            mod.lora_scale, mod.lora_dropout = cfg.scale, cfg.dropout
        else:
            d_out, d_in = mod.weight.shape
            mod.register_parameter("lora_A", nn.Parameter(mod.weight.new_empty(r, d_in)))
            mod.register_parameter("lora_B", nn.Parameter(mod.weight.new_empty(d_out, r)))
            mod.lora_scale, mod.lora_dropout = cfg.scale, cfg.dropout
            mod._lora_handle = mod.register_forward_hook(_lora_hook)
            added += r * (d_in + d_out)
    if not added:
        raise ValueError(f"lora.targets={list(cfg.targets)} matches no layer of this model")
    if not any(p.is_meta for p in model.parameters()):
        init_adapters(model, seed)
    return added


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int = 0, assign=None) -> None:
    """B = 0 and A ~ N(0, 1/in), every A (and every expert's row of a stacked A) from a generator of
    its own (transformer.tensor_generator, on a stream apart from the base's): layout-independent."""
    from raymoe.model.transformer import tensor_generator

    assign = assign or (lambda p, t: p.copy_(t))  # parallel/apply.assign_ for FSDP shards

    stream = seed + 7919
    for mod_name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if not is_adapter(f".{pname}"):
                continue
            name = f"{mod_name}.{pname}"
            if pname.startswith("lora_B"):
                p.zero_()
            elif isinstance(mod, GroupedExperts):
                rows = [torch.randn(p.shape[1:], generator=tensor_generator(stream, name, mod.first_expert + i))
                        for i in range(p.shape[0])]
                assign(p, torch.stack(rows) / math.sqrt(p.shape[1]))
            else:
                assign(p, torch.randn(p.shape, generator=tensor_generator(stream, name)) / math.sqrt(p.shape[1]))


def set_trainable(model: nn.Module, cfg: RunConfig) -> None:
    """requires_grad per parameter: with lora, only adapters (and routers if lora.train_router);
    else everything outside train.freeze."""
    for name, p in model.named_parameters():
        if cfg.lora.enabled:
            p.requires_grad_(is_adapter(name) or (cfg.lora.train_router and part_of(name) == "router"))
        else:
            p.requires_grad_(part_of(name) not in cfg.train.freeze)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"train.freeze={list(cfg.train.freeze)} leaves nothing to train; unfreeze at least one part")


def cast_frozen_(model: nn.Module, dtype: torch.dtype) -> int:
    """Frozen matrices to `dtype` (bf16 under bf16 autocast: half the bytes, and the matmuls cast to
    bf16 anyway); returns the bytes saved. Kept as they are: vectors (norm scales, biases: rms_norm
    reads them in the input's precision) and the embedding table, whose output starts the fp32
    residual stream (autocast does not cover the lookup)."""
    saved = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad and p.dim() >= 2 and p.is_floating_point() and p.dtype != dtype and name != "embed.weight":
                saved += p.numel() * (p.element_size() - torch.empty((), dtype=dtype).element_size())
                p.data = p.data.to(dtype)
    return saved


def linear_delta(a_RI: torch.Tensor, b_OR: torch.Tensor, scale: float) -> torch.Tensor:
    """What an adapter adds to a linear weight [out, in]: scale * B @ A, in fp32."""
    return scale * (b_OR.float() @ a_RI.float())


def expert_delta(a_EIR: torch.Tensor, b_ERO: torch.Tensor, scale: float) -> torch.Tensor:
    """What stacked adapters add to expert weights [E, in, out]: scale * A[e] @ B[e], in fp32."""
    return scale * torch.bmm(a_EIR.float(), b_ERO.float())


def adapters_of(weight_name: str) -> tuple[list[tuple[str, str]], str] | None:
    """For a base weight name, the adapters that may add to it, as ([(A name, B name), ...],
    'linear'|'expert'): one pair, or for the experts' w13 the gate's and the up's, whose deltas
    sit side by side as w13's halves do."""
    m = re.match(r"^(.*\.experts)\.w(13|2)$", weight_name)
    if m:
        return [(f"{m[1]}.lora_A{k}", f"{m[1]}.lora_B{k}") for k in _EXPERT_WEIGHT[m[2]]], "expert"
    if weight_name.endswith(".weight"):
        stem = weight_name[: -len(".weight")]
        return [(f"{stem}.lora_A", f"{stem}.lora_B")], "linear"
    return None


def adapter_delta(pairs: list[tuple[torch.Tensor, torch.Tensor]], kind: str, scale: float) -> torch.Tensor:
    """What adapters add to their base weight, in fp32: a linear layer's scale * B @ A, or stacked
    experts' scale * A[e] @ B[e], with the gate's and the up's side by side for w13."""
    if kind == "linear":
        (a, b), = pairs
        return linear_delta(a, b, scale)
    return torch.cat([expert_delta(a, b, scale) for a, b in pairs], dim=-1)


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and remove it; returns how many were merged."""
    merged = 0
    for mod in model.modules():
        if isinstance(mod, GroupedExperts) and hasattr(mod, "lora_A1"):
            for w_name, ks in _EXPERT_WEIGHT.items():
                w = getattr(mod, f"w{w_name}")
                pairs = [(getattr(mod, f"lora_A{k}"), getattr(mod, f"lora_B{k}")) for k in ks]
                w.add_(adapter_delta(pairs, "expert", mod.lora_scale).to(w.dtype))
            for k in _EXPERT_PROJ:
                delattr(mod, f"lora_A{k}")
                delattr(mod, f"lora_B{k}")
            del mod.lora_scale, mod.lora_dropout
            merged += 1
        elif isinstance(mod, nn.Linear) and hasattr(mod, "lora_A"):
            mod.weight.add_(adapter_delta([(mod.lora_A, mod.lora_B)], "linear", mod.lora_scale).to(mod.weight.dtype))
            mod._lora_handle.remove()
            del mod.lora_A, mod.lora_B, mod.lora_scale, mod.lora_dropout, mod._lora_handle
            merged += 1
    return merged


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters this rank holds (its shard of FSDP-sharded ones)."""
    local = [(p, p.to_local() if hasattr(p, "to_local") else p) for p in model.parameters()]
    return sum(t.numel() for p, t in local if p.requires_grad), sum(t.numel() for _, t in local)

