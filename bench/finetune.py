"""LoRA against full fine-tuning of the same model: trainable parameters, optimizer-state bytes and
step time, measured side by side in one process.

    python bench/finetune.py                   # the demo model (jobs/configs/demo.yaml), batch 8 x 128, 2 threads
    python bench/finetune.py --tiny            # seconds: the smoke test `make test` runs

Each mode builds the same model from the same seed, applies its trainability (full: everything;
LoRA: model/lora.py with the rank and targets below), and runs warm-up steps then timed steps of
forward, backward and AdamW on the same fixed batch, exactly as the training loop does on one
rank (fp32 on CPU). Optimizer-state bytes are read from the optimizer after the first step (the
AdamW moments it actually allocated). Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "platform"))

import torch  # noqa: E402

from raymoe.config import LoraConfig, config_from_dict, load_config  # noqa: E402
from raymoe.model.lora import apply_lora, count_parameters, set_trainable  # noqa: E402
from raymoe.model.transformer import MoETransformer  # noqa: E402
from raymoe.train.loop import build_optimizer  # noqa: E402


def _optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0)


def measure(run, lora: LoraConfig | None, batch, steps: int, warmup: int) -> dict:
    model = MoETransformer(run.model)
    model.init_weights(seed=0)
    if lora is not None:
        apply_lora(model, lora, seed=0)
    # set_trainable reads only these two sections (a LoRA run config would also need a model.init_from).
    set_trainable(model, SimpleNamespace(lora=lora or LoraConfig(), train=run.train))
    model.train()
    opt = build_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], run.train, torch.device("cpu"))
    x, y = batch
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(x, targets=y)
        loss = out.token_loss.mean() + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    trainable, total = count_parameters(model)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total, "optimizer_state_bytes": _optimizer_bytes(opt),
            "gradient_bytes": grad_bytes, "step_ms_median": 1e3 * statistics.median(times),
            "step_ms_min": 1e3 * min(times), "tokens_per_s": x.numel() / statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(HERE, "..", "jobs", "configs", "demo.yaml"))
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="attention,routed_experts")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a small model and 2 steps (smoke test)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.tiny:
        run = config_from_dict({"model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_seq_len": 32,
                                          "num_experts": 4, "expert_intermediate_size": 16}, "train": {"seq_len": 16}})
        B, S, steps, warmup = 2, 16, 2, 1
    else:
        run = load_config(args.config, ["train.fault_injection=null"])
        B, S, steps, warmup = run.train.batch_size, run.train.seq_len, args.steps, 2
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (B, S + 1), generator=gen)
    batch = (tokens[:, :-1], tokens[:, 1:])
    lora = LoraConfig(rank=args.rank, alpha=2 * args.rank, targets=tuple(args.targets.split(",")))
    rows = {"full": measure(run, None, batch, steps, warmup), "lora": measure(run, lora, batch, steps, warmup)}
    full, ft = rows["full"], rows["lora"]
    ratios = {"trainable": ft["trainable_params"] / full["trainable_params"],
              "optimizer_state": ft["optimizer_state_bytes"] / full["optimizer_state_bytes"],
              "step_time": ft["step_ms_median"] / full["step_ms_median"]}
    print(f"{'mode':6} {'trainable':>12} {'of total':>12} {'opt state MB':>13} {'grad MB':>9} {'step ms':>9} {'tok/s':>9}")
    for mode, r in rows.items():
        print(f"{mode:6} {r['trainable_params']:>12,} {r['total_params']:>12,} {r['optimizer_state_bytes'] / 1e6:>13.2f} "
              f"{r['gradient_bytes'] / 1e6:>9.2f} {r['step_ms_median']:>9.1f} {r['tokens_per_s']:>9.0f}")
    print(f"lora/full: trainable {ratios['trainable']:.4f}, optimizer state {ratios['optimizer_state']:.4f}, "
          f"step time {ratios['step_time']:.2f}")
    result = {"date": time.strftime("%Y-%m-%d"), "device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} threads",
              "torch": torch.__version__, "config": "tiny" if args.tiny else os.path.relpath(args.config, os.path.join(HERE, "..")),
              "batch": [B, S], "lora": {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)},
              "steps": steps, "rows": rows, "ratios": ratios,
              "command": "python bench/finetune.py" + (" --tiny" if args.tiny else "")}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "finetune-tiny.json" if args.tiny else "finetune.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
