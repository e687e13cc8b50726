"""Training metrics computed from measured quantities: throughput, MFU and expert load.

    windows = MetricWindows(...)      # one per run, made just before the first step
    windows.add_step(...)             # every step: tensors added on the device, no host sync
    metrics = windows.flush(step, lr=lr, grad_norm=grad_norm)   # at log steps, on every rank

Metric keys are stable and slash-namespaced: `train/loss`, `train/tokens_per_s`, `perf/mfu`,
`moe/load_imbalance`, `moe/dropped_frac`, `moe/layerNN/imbalance`.

Two throughputs, both over the steps since the last log line: `train/tokens_per_s` counts only
the time spent inside training steps (what MFU is computed from); `train/wall_tokens_per_s` the
wall time between the two log lines, everything included (validation, checkpoints, reports to Ray
Train and MLflow). The progress line leads with the wall figure, so a run that spends its time
reporting does not look fast.

Load imbalance is max / mean tokens per expert (1.0 = perfectly even), averaged over MoE layers;
it is computed from the loads summed over every rank's micro-batches since the last log, i.e.
over the global batch that the bias update also sees.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.distributed as dist

# Dense bf16 peak FLOP/s from the vendors' datasheets (no sparsity). MFU against the peak
# measured on the device itself is reported by the benchmarks, not here.
DATASHEET_PEAK_BF16 = {
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    """Datasheet bf16 peak for a known CUDA device, else None (no MFU is reported on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name:
        return DATASHEET_PEAK_BF16["H100 PCIe" if "PCIe" in name else "H100 NVL" if "NVL" in name else "H100 SXM"]
    for key, peak in DATASHEET_PEAK_BF16.items():
        if key.split()[0] in name:
            return peak
    return None


def moe_load_metrics(load_LE: torch.Tensor, dropped: int, slots: int) -> dict[str, float]:
    """From tokens per expert per MoE layer [L, E] (global), dropped slots and all routed slots."""
    if load_LE.numel() == 0:
        return {}
    load = load_LE.double()
    per_layer = load.max(dim=1).values / load.mean(dim=1).clamp_min(1e-9)
    out = {"moe/load_imbalance": float(per_layer.mean()), "moe/dropped_frac": dropped / max(slots, 1)}
    for i, v in enumerate(per_layer.tolist()):
        out[f"moe/layer{i:02d}/imbalance"] = v
    return out


class MetricWindows:
    """Everything the loop sums between two log steps, and the metrics it becomes at the second.

    Each step adds its cross-entropy sum and count, per-expert loads (already global: the loop
    all-reduces them for the bias update), dropped and routed slots, loss-carrying tokens (SFT),
    the all-to-all bytes this rank sent, and the seconds the step took. `flush` turns the window
    into metrics, appends the window's load to `load_history` and starts the next window. It
    makes one all-reduce, so every rank calls it at the same steps.
    """

    def __init__(self, *, num_moe_layers: int, num_experts: int, device: torch.device, world_size: int,
                 tokens_per_step: int, flops_per_token: float, peak_flops: float | None, expert_parallel: bool,
                 sft: bool, load_history: list[dict[str, Any]] | None = None) -> None:
        self.world_size = world_size
        self.tokens_per_step, self.flops_per_token, self.peak_flops = tokens_per_step, flops_per_token, peak_flops
        self.expert_parallel, self.sft = expert_parallel, sft
        self.load_history: list[dict[str, Any]] = load_history if load_history is not None else []
        self.load_LE = torch.zeros(num_moe_layers, max(num_experts, 1), dtype=torch.long, device=device)
        # [cross-entropy sum, its token count, dropped slots, routed slots]: one all-reduce at flush.
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.ms_per_step = (0.0, 0.0)
        """Of the last flushed window: (wall, inside steps) milliseconds per step."""
        self._reset_host(time.perf_counter())

    def _reset_host(self, now: float) -> None:
        self.steps = 0
        self.step_seconds = 0.0
        self.loss_tokens = 0.0
        self.a2a_bytes = 0
        self.started = now

    def add_step(self, *, ce_sum: torch.Tensor, ce_count: torch.Tensor | float, load_LE: torch.Tensor,
                 dropped: torch.Tensor | int, slots: int, seconds: float, a2a_bytes: int = 0,
                 loss_tokens: float = 0.0) -> None:
        self.sums[0] += ce_sum
        self.sums[1] += ce_count
        self.sums[2] += dropped  # a tensor: int() here would be a host sync
        self.sums[3] += slots
        self.load_LE += load_LE
        self.steps += 1
        self.step_seconds += seconds
        self.a2a_bytes += a2a_bytes
        self.loss_tokens += loss_tokens

    def flush(self, step: int, *, lr: float, grad_norm: float) -> dict[str, float]:
        """The window's metrics (train/*, perf/mfu, moe/*), then an empty window."""
        assert self.steps > 0, "flush() without a step since the last one"
        if self.world_size > 1:
            dist.all_reduce(self.sums)
        ce, count, dropped, slots = self.sums.tolist()
        now = time.perf_counter()
        tokens = self.tokens_per_step * self.steps
        tok_s = tokens / max(self.step_seconds, 1e-9)
        m: dict[str, float] = {
            "train/step": step,
            "train/loss": ce / count if count else math.nan,  # an SFT window without a loss token
            "train/lr": lr,
            "train/grad_norm": float(grad_norm),
            "train/tokens_per_s": tok_s,
            "train/wall_tokens_per_s": tokens / max(now - self.started, 1e-9),
            "train/tokens_seen": float(step * self.tokens_per_step),
        }
        if self.sft:
            m["train/loss_tokens_per_s"] = self.loss_tokens / max(self.step_seconds, 1e-9)
        if self.expert_parallel:
            m["moe/a2a_bytes"] = self.a2a_bytes / self.steps  # per step, this rank
        if self.peak_flops:
            m["perf/mfu"] = self.flops_per_token * tok_s / (self.peak_flops * self.world_size)
        if self.load_LE.shape[0]:
            m.update(moe_load_metrics(self.load_LE, int(dropped), int(slots)))
            self.load_history.append({"step": step, "load": self.load_LE.cpu().tolist()})
        self.ms_per_step = (1e3 * (now - self.started) / self.steps, 1e3 * self.step_seconds / self.steps)
        self.load_LE.zero_()
        self.sums.zero_()
        self._reset_host(now)
        return m


def format_progress(step: int, total: int, m: dict[str, float], ms_per_step: tuple[float, float] | None = None) -> str:
    """One readable progress line per log step. Speed is wall time since the previous line,
    everything included, then (in brackets) the part spent inside training steps."""
    parts = [f"step {step:>5d}/{total}"]
    for key, label, fmt in (
        ("train/loss", "loss", "{:.4f}"),
        ("val/loss", "val", "{:.4f}"),
        ("train/lr", "lr", "{:.2e}"),
        ("train/grad_norm", "gnorm", "{:.2f}"),
    ):
        if key in m:
            parts.append(f"{label} {fmt.format(m[key])}")
    if "train/wall_tokens_per_s" in m:
        parts.append(f"tok/s {m['train/wall_tokens_per_s']:,.0f} ({m['train/tokens_per_s']:,.0f} in steps)")
    elif "train/tokens_per_s" in m:
        parts.append(f"tok/s {m['train/tokens_per_s']:,.0f}")
    for key, label, fmt in (
        ("perf/mfu", "mfu", "{:.1%}"),
        ("moe/load_imbalance", "imbal", "{:.2f}"),
        ("moe/dropped_frac", "drop", "{:.1%}"),
    ):
        if key in m:
            parts.append(f"{label} {fmt.format(m[key])}")
    if ms_per_step is not None:
        parts.append(f"{ms_per_step[0]:.0f} ms/step ({ms_per_step[1]:.0f} in steps)")
    return " | ".join(parts)
