"""Training metrics computed from measured quantities: throughput, MFU and expert load.

Metric keys are stable and slash-namespaced: `train/loss`, `train/tokens_per_s`, `perf/mfu`,
`moe/load_imbalance`, `moe/dropped_frac`, `moe/layerNN/imbalance`.

Load imbalance is max / mean tokens per expert (1.0 = perfectly even), averaged over MoE layers;
it is computed from the loads summed over every rank's micro-batches since the last log, i.e.
over the global batch that the bias update also sees.
"""

from __future__ import annotations

import time

import torch

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


class Throughput:
    """Tokens per second over the window since the last `rate()` call."""

    def __init__(self) -> None:
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        r = self.tokens / max(now - self.start, 1e-9)
        self.tokens, self.start = 0, now
        return r


def format_progress(step: int, total: int, m: dict[str, float]) -> str:
    """One readable progress line per log step."""
    parts = [f"step {step:>5d}/{total}"]
    for key, label, fmt in (
        ("train/loss", "loss", "{:.4f}"),
        ("val/loss", "val", "{:.4f}"),
        ("train/lr", "lr", "{:.2e}"),
        ("train/grad_norm", "gnorm", "{:.2f}"),
        ("train/tokens_per_s", "tok/s", "{:,.0f}"),
        ("perf/mfu", "mfu", "{:.1%}"),
        ("moe/load_imbalance", "imbal", "{:.2f}"),
        ("moe/dropped_frac", "drop", "{:.1%}"),
    ):
        if key in m:
            parts.append(f"{label} {fmt.format(m[key])}")
    return " | ".join(parts)
