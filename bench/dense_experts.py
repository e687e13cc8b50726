"""Where computing every expert for every token beats the grouped GEMM, at inference.

    python bench/dense_experts.py                 # CPU, the decode benchmark's two MoE shapes
    python bench/dense_experts.py --tiny          # seconds (make test)

For each token count T it times `MoE.routed` (router output given) both ways under
`torch.inference_mode`, same weights, and checks they agree: the grouped path (permute, three
grouped GEMMs, unpermute) and `GroupedExperts.forward_dense` (every expert, E/K times the FLOPs).
The crossover it prints is what `MoE.dense_max_slots_per_expert` is set from.
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

from raymoe.config import ModelConfig  # noqa: E402
from raymoe.model.moe import MoE  # noqa: E402

SHAPES = {
    # name: (hidden, expert hidden, experts, top-k)
    "decode-e16": (256, 128, 16, 4),
    "decode-e64": (256, 64, 64, 6),
    "tiny": (64, 32, 8, 2),
}


def timed(fn, repeats: int) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def measure(shape: str, tokens: list[int], repeats: int) -> list[dict]:
    D, Fh, E, K = SHAPES[shape]
    cfg = ModelConfig(vocab_size=256, hidden_size=D, num_layers=2, num_heads=2, num_experts=E, top_k=K,
                      expert_intermediate_size=Fh, num_shared_experts=0, first_k_dense_layers=0)
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    rows = []
    with torch.inference_mode():
        for T in tokens:
            x = torch.randn(T, D)
            routing = moe.router(x)
            grouped = lambda: _grouped(moe, x, routing)  # noqa: E731
            dense = lambda: _dense(moe, x, routing)  # noqa: E731
            ref = grouped()
            err = ((ref - dense()).abs().max() / ref.abs().max()).item()
            if err > 1e-5:
                raise SystemExit(f"{shape} T={T}: the dense path disagrees with the grouped one (relative error {err:.2e})")
            g, d = timed(grouped, repeats), timed(dense, repeats)
            rows.append({"shape": shape, "tokens": T, "slots_per_expert": T * K / E, "grouped_us": 1e6 * g,
                         "dense_us": 1e6 * d, "dense_speedup": g / d, "rel_err": err})
            print(f"{shape:>11} T={T:>4} slots/expert {T * K / E:6.2f}  grouped {1e6 * g:8.1f} us  "
                  f"dense {1e6 * d:8.1f} us  dense {g / d:5.2f}x")
    return rows


def _grouped(moe: MoE, x, routing):
    from raymoe.model.moe import permute, unpermute

    x_ND, counts_E, token_N, weight_N = permute(x, routing, moe.num_experts)
    return unpermute(moe.experts(x_ND, counts_E), token_N, weight_N, x.shape[0])


def _dense(moe: MoE, x, routing):
    weight_TE = routing.weight_TK.new_zeros(x.shape[0], moe.num_experts).scatter_add_(1, routing.expert_TK, routing.weight_TK)
    return moe.experts.forward_dense(x, weight_TE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.tiny:
        rows = measure("tiny", [1, 4, 16], 3)
    else:
        rows = []
        for shape in ("decode-e16", "decode-e64"):
            rows += measure(shape, [1, 2, 4, 8, 16, 32, 64, 128, 256], 50)
    out = Path(args.out or f"bench/results/dense_experts{'-tiny' if args.tiny else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "loadavg": os.getloadavg()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
