"""What one router -> expert-group hop costs, by part, at routed-decode call sizes.

    python bench/expert_hop.py                  # this device (CUDA if there is one), both shapes
    python bench/expert_hop.py --tiny           # seconds (make test)

Per call of `rows x hidden` values (the rows one group receives at one MoE layer of a decode
step), timed separately:
- host_round_trip: the rows copied device -> host and an answer of the same size host -> device,
  what either transport (serve/transport.py) adds for a router on a GPU; 0 work on a CPU router;
- channel_round_trip: the direct channel's round trip over a local TCP socket, identity compute
  (serve/channel.py: the frame, the copies into and out of the socket, the wake-ups);
- device_copy: one copy of the rows within the device, the floor a device-to-device transport
  (NCCL, CUDA IPC) could approach within a node.
A decode step makes one hop per MoE layer (all groups' calls in flight at once), so
per-step overhead is about layers x the slowest group's hop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import torch  # noqa: E402

from raymoe.serve.channel import ExpertChannel, ExpertServer  # noqa: E402

SHAPES = {
    # name: hidden size, experts per group
    "16b": (2048, 32),  # DeepSeek-16B (MoE 64 experts) in 2 groups
    "v3": (7168, 32),  # DeepSeek-V3 (256 experts) in 8 groups
    "tiny": (64, 4),
}
ROWS = (8, 64, 512)
"""Rows per call: batch 16 x top-6 over 2 groups is ~48; batch 64 over 8 groups ~48; prefill is larger."""


class _Static:
    """directory.Registry's stand-in: one server per group."""

    def __init__(self, address: str):
        self.address = address

    def addresses(self, group: int) -> list[str]:
        return [self.address]

    def drop_address(self, group: int, address: str) -> None:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    _sync(device)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        runs.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(runs)


def measure(shape: str, device: torch.device, dtype: torch.dtype, repeats: int) -> list[dict]:
    hidden, experts = SHAPES[shape]
    server = ExpertServer(lambda calls: [rows for _, rows, _ in calls], "bench")
    channel = ExpertChannel("bench", 1, registry=_Static(server.address))
    out = []
    try:
        for n in ROWS:
            rows = torch.randn(n, hidden, device=device).to(dtype)
            counts = torch.full((experts,), n // experts, dtype=torch.int64)
            counts[0] += n - int(counts.sum())
            host = rows.cpu()
            answer = host.clone()

            def host_round_trip():
                rows.cpu()
                answer.to(device)

            def channel_round_trip():
                got = channel.send(0, 0, host, counts).result()
                assert got.shape == host.shape

            point = {"rows": n, "hidden": hidden, "bytes": n * hidden * rows.element_size(),
                     "host_round_trip_ms": round(timed_ms(host_round_trip, device, repeats), 4) if device.type != "cpu" else 0.0,
                     "channel_round_trip_ms": round(timed_ms(channel_round_trip, device, repeats), 4),
                     "device_copy_ms": round(timed_ms(rows.clone, device, repeats), 4)}
            out.append(point)
            print(f"{shape:>5} rows {n:>4} x {hidden} {str(dtype).removeprefix('torch.'):>8}: host round trip "
                  f"{point['host_round_trip_ms']:.3f} ms, channel {point['channel_round_trip_ms']:.3f} ms, "
                  f"device copy {point['device_copy_ms']:.4f} ms", flush=True)
    finally:
        server.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny shape only, few repeats (seconds)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", default="bench/results/expert_hop.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = ["tiny"] if args.tiny else ["16b", "v3"]
    repeats = 5 if args.tiny else args.repeats
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "dtype": str(dtype),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
              "shapes": {s: measure(s, device, dtype, repeats) for s in shapes}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
