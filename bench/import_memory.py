"""Peak host memory of `raymoe import` against the size of the model and of its largest tensor.

    python bench/import_memory.py                       # ~2.2 GB Mixtral-layout checkpoint, fp32
    python bench/import_memory.py --layers 2 --hidden 256 --tiny

Writes a synthetic Hugging Face checkpoint (Mixtral layout: per-expert w1/w2/w3, one safetensors
shard per layer, random fp32 weights), then runs `import_hf` on it in a fresh process and reads that
process's peak resident set size (VmHWM). A second fresh process that only imports the same
modules and builds a model on the meta device gives the baseline (Python, torch and its one-time
start-up allocations). The import holds one raymoe tensor (the
stacked [E, D, F] experts of one layer are the largest) plus one output shard at a time, so
peak - baseline should stay near a small multiple of the largest tensor however big the model is.
Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "platform"))

# VmHWM, the peak RSS of this process's own address space: unlike ru_maxrss, it is not inherited
# from the parent across fork + exec on Linux.
CHILD = r"""
import sys, time, json
sys.path.insert(0, {platform!r})
import torch, safetensors.torch
from raymoe.model_dir import import_hf
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
from raymoe.config import ModelConfig
from raymoe.model_dir import expected_shapes
expected_shapes(ModelConfig())  # torch's one-time start-up costs (~70 MB) belong to the baseline
torch.stack([torch.randn(64, 64).t()]).contiguous()
t0 = time.perf_counter()
if {run!r}:
    import_hf({src!r}, {out!r}, max_shard_bytes={shard}, log=lambda m: None)
print(json.dumps({{"peak_kib": hwm(), "seconds": time.perf_counter() - t0}}))
"""


def write_checkpoint(path: str, layers: int, hidden: int, experts: int, expert_hidden: int, vocab: int) -> dict:
    """A Mixtral-layout checkpoint written layer by layer (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    heads = max(1, hidden // 64)
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": expert_hidden, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": heads, "num_local_experts": experts,
              "num_experts_per_tok": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 1e6}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0

    def shard(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    n = layers + 1
    shard(f"model-00001-of-{n:05d}.safetensors", {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen),
        "model.norm.weight": torch.ones(hidden), "lm_head.weight": torch.randn(vocab, hidden, generator=gen)})
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden),
             p + "block_sparse_moe.gate.weight": torch.randn(experts, hidden, generator=gen)}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[f"{p}self_attn.{proj}.weight"] = torch.randn(hidden, hidden, generator=gen) * 0.02
        for e in range(experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            t[q + "w1.weight"] = torch.randn(expert_hidden, hidden, generator=gen) * 0.02
            t[q + "w3.weight"] = torch.randn(expert_hidden, hidden, generator=gen) * 0.02
            t[q + "w2.weight"] = torch.randn(hidden, expert_hidden, generator=gen) * 0.02
        shard(f"model-{i + 2:05d}-of-{n:05d}.safetensors", t)
        del t
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    largest = experts * hidden * 2 * expert_hidden * 4  # one layer's stacked w13, gate and up side by side (fp32)
    return {"model_bytes": total, "largest_tensor_bytes": max(largest, vocab * hidden * 4)}


def _child(src: str, out: str, shard: int, run: bool) -> dict:
    code = CHILD.format(platform=os.path.join(HERE, "..", "platform"), src=src, out=out, shard=shard, run=run)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(layers: int, hidden: int, experts: int, expert_hidden: int, vocab: int, shard_bytes: int, work: str) -> dict:
    src, out = os.path.join(work, "hf"), os.path.join(work, "imported")
    sizes = write_checkpoint(src, layers, hidden, experts, expert_hidden, vocab)
    base = _child(src, out, shard_bytes, run=False)
    run = _child(src, out, shard_bytes, run=True)
    mib = 1 << 20
    result = {
        "model_mib": sizes["model_bytes"] / mib,
        "largest_tensor_mib": sizes["largest_tensor_bytes"] / mib,
        "max_shard_mib": shard_bytes / mib,
        "baseline_rss_mib": base["peak_kib"] / 1024,
        "peak_rss_mib": run["peak_kib"] / 1024,
        "import_seconds": run["seconds"],
    }
    result["peak_over_baseline_mib"] = result["peak_rss_mib"] - result["baseline_rss_mib"]
    result["over_baseline_per_largest_tensor"] = result["peak_over_baseline_mib"] / result["largest_tensor_mib"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--expert-hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--shard-mib", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="a ~40 MB model, seconds")
    args = ap.parse_args()
    if args.tiny:
        args.layers, args.hidden, args.expert_hidden, args.vocab = 2, 256, 512, 2048
    with tempfile.TemporaryDirectory() as work:
        r = measure(args.layers, args.hidden, args.experts, args.expert_hidden, args.vocab, args.shard_mib << 20, work)
    for k, v in r.items():
        print(f"{k:34s} {v:10.1f}")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    name = "import-memory-tiny.json" if args.tiny else "import-memory.json"
    with open(os.path.join(HERE, "results", name), "w") as f:
        json.dump({"args": vars(args), "result": r, "date": time.strftime("%Y-%m-%d")}, f, indent=1)


if __name__ == "__main__":
    main()
