"""Per-rank parameter, gradient and AdamW bytes of each parallel layout at 1, 2 and 4 ranks, held
(measured in real gloo training runs) against what `raymoe plan` predicts, and the step time.

    python bench/memory.py             # jobs/configs/small-gpu.yaml's shape scaled down (20.5M parameters)
    python bench/memory.py --tiny      # seconds

Each run is the training loop itself (train/loop.py, no Ray) on `world` processes with gloo, for
a few steps of batch 1 x 64 tokens per rank in fp32; every rank reports memory/param_bytes,
memory/grad_bytes and memory/optimizer_state_bytes (what it holds: its shards of FSDP DTensors),
and the largest over the ranks is shown. The plan's figures come from parallel/memory.py, which
never runs the model. Step time: median ms/step over the steps after the first, 1 thread a rank,
on however many cores this machine has (2 here: the 4-rank rows share them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "platform"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from raymoe.config import config_from_dict, load_config  # noqa: E402
from raymoe.parallel.memory import Layout, rank_memory  # noqa: E402

KEYS = ("memory/param_bytes", "memory/grad_bytes", "memory/optimizer_state_bytes")


def _model(tiny: bool) -> dict:
    """small-gpu.yaml's model with every width divided by 4 and 4 of its 12 layers (tiny: much less)."""
    m = load_config(os.path.join(HERE, "..", "jobs", "configs", "small-gpu.yaml")).to_dict()["model"]
    m.update(hidden_size=256, num_layers=4, num_heads=4, kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, dense_intermediate_size=704, expert_intermediate_size=128, max_seq_len=64)
    if tiny:
        m.update(hidden_size=64, num_layers=2, num_experts=8, top_k=2, kv_lora_rank=16, dense_intermediate_size=128,
                 expert_intermediate_size=32)
    return m


def _cfg(model: dict, out: str, world: int, ep: int, dense: str, steps: int):
    return config_from_dict({
        "name": "bench-memory", "output_dir": out, "model": model, "scaling": {"num_workers": world},
        "parallel": {"expert_degree": ep, "dense": dense},
        "train": {"steps": steps, "warmup_steps": 0, "batch_size": 1, "seq_len": 64, "log_every": 1, "val_every": steps,
                  "val_batches": 1, "checkpoint_every": 10_000, "sample_tokens": 0, "precision": "fp32"},
        "data": {"max_bytes": 200_000},
    })


def _worker(rank, world, port, cfg_dict, corpus, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from raymoe.train.loop import DistInfo, train

    times, metrics = [], {}
    last = [time.perf_counter()]

    def on_step(step):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    class Reporter:
        def report(self, m, checkpoint_dir):
            metrics.update(m)

    sys.stdout = open(os.devnull, "w")  # the loop's progress lines
    train(config_from_dict(cfg_dict), corpus_dir=corpus, reporter=Reporter(), info=DistInfo(rank, world, torch.device("cpu")),
          on_step=on_step)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"bytes": {k: metrics[k] for k in KEYS}, "step_s": times}, f)
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/memory[-tiny].json)")
    args = ap.parse_args()
    from raymoe.train.data import prepare_run_data

    model = _model(args.tiny)
    layouts = [(1, 1, "replicate"), (2, 2, "replicate"), (2, 2, "fsdp"), (4, 4, "replicate"), (4, 4, "fsdp"),
               (4, 2, "replicate"), (4, 2, "fsdp")]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        corpus = prepare_run_data(_cfg(model, work, 1, 1, "replicate", args.steps)).dir
        for world, ep, dense in layouts:
            cfg = _cfg(model, work, world, ep, dense, args.steps)
            out = tempfile.mkdtemp(dir=work)
            mp.spawn(_worker, args=(world, _port(), cfg.to_dict(), corpus, out), nprocs=world)
            ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]
            held = {k: max(r["bytes"][k] for r in ranks) for k in KEYS}
            plan = rank_memory(cfg, world, Layout(ep, dense, 0), device_type="cpu")
            step_ms = 1e3 * statistics.median(t for r in ranks for t in r["step_s"][1:])
            rows.append({"world": world, "expert_degree": ep, "dense": dense, "held": held,
                         "planned": {"memory/param_bytes": plan.params, "memory/grad_bytes": plan.grads,
                                     "memory/optimizer_state_bytes": plan.optimizer},
                         "step_ms": step_ms})
    base = rows[0]["held"]
    total = lambda h: sum(h[k] for k in KEYS)  # noqa: E731
    print(f"{'ranks':>5} {'EP':>3} {'dense':<9} {'params MB':>9} {'grads MB':>9} {'adam MB':>9} {'total MB':>9} "
          f"{'vs 1 rank':>9} {'planned MB':>10} {'ms/step':>8}")
    for r in rows:
        h = r["held"]
        print(f"{r['world']:>5} {r['expert_degree']:>3} {r['dense']:<9} {h[KEYS[0]] / 1e6:9.2f} {h[KEYS[1]] / 1e6:9.2f} "
              f"{h[KEYS[2]] / 1e6:9.2f} {total(h) / 1e6:9.2f} {total(h) / total(base):8.2f}x {total(r['planned']) / 1e6:10.2f} "
              f"{r['step_ms']:8.1f}")
    result = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "model": model, "tokens_per_rank_step": 64, "rows": rows}
    path = args.out or os.path.join(HERE, "results", "memory-tiny.json" if args.tiny else "memory.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
