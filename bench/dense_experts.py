"""Which of the three inference paths of the routed experts is fastest, by token count.

    python bench/dense_experts.py                 # CPU, the decode benchmark's two MoE shapes
    python bench/dense_experts.py --tiny          # seconds (make test)

For each token count T it times the routed experts (router output given) three ways under
`torch.inference_mode`, same weights, and checks they agree: the grouped path (permute, three
grouped GEMMs, unpermute), `GroupedExperts.forward_dense` (every expert, E/K times the FLOPs) and
`GroupedExperts.forward_padded` (each expert's tokens padded to the largest load C: E * C rows,
three batched GEMMs). Up to 256 tokens the router's own choices are used; from 256 on also loads
skewed towards high-numbered experts (a selection bias of 1 and 2 score standard deviations
across the experts: padding 1.5-2.5x), since the padded path's cost grows with the largest load. Each row also says which path `MoE.routed` takes there
(`MoE.inference_path`).
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
from raymoe.model.moe import MoE, largest_load  # noqa: E402

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
            for skew in ((0.0, 1.0, 2.0) if T >= 256 else (0.0,)):
                x = torch.randn(T, D)
                # Skewed loads: a selection bias rising across the experts, `skew` standard deviations
                # of the router's scores from the first to the last (it picks experts, never weighs them).
                moe.router.expert_bias.zero_()
                spread = float(moe.router.scores(x)[1].std())
                moe.router.expert_bias.copy_(skew * spread * torch.arange(E) / E)
                routing = moe.router(x)
                weight_TE = routing.weights_per_expert(E)
                C = largest_load(weight_TE)
                paths = {"grouped": lambda: _grouped(moe, x, routing), "dense": lambda: moe.experts.forward_dense(x, weight_TE),
                         "padded": lambda: moe.experts.forward_padded(x, weight_TE, C)}
                ref = paths["grouped"]()
                err = max(((ref - f()).abs().max() / ref.abs().max()).item() for f in paths.values())
                if err > 1e-5:
                    raise SystemExit(f"{shape} T={T}: the paths disagree (relative error {err:.2e})")
                us = {k: 1e6 * timed(f, repeats if T <= 256 else max(5, repeats // 5)) for k, f in paths.items()}
                chosen = moe.inference_path(T, routing)[0]
                rows.append({"shape": shape, "tokens": T, "skew": skew, "slots_per_expert": T * K / E, "capacity": C,
                             "padding": E * C / (T * K), **{f"{k}_us": v for k, v in us.items()},
                             "dense_speedup": us["grouped"] / us["dense"], "padded_speedup": us["grouped"] / us["padded"],
                             "fastest": min(us, key=us.get), "chosen": chosen, "rel_err": err})
                print(f"{shape:>11} T={T:>5} skew {skew:4.2f} C {C:4d} padding {E * C / (T * K):5.2f}  grouped {us['grouped']:8.1f}  "
                      f"dense {us['dense']:8.1f}  padded {us['padded']:8.1f} us  fastest {min(us, key=us.get):>7}  routed takes {chosen}",
                      flush=True)
        moe.router.expert_bias.zero_()
    return rows


def _grouped(moe: MoE, x, routing):
    from raymoe.model.moe import permute, unpermute

    x_ND, counts_E, token_N, weight_N = permute(x, routing, moe.num_experts)
    return unpermute(moe.experts(x_ND, counts_E), token_N, weight_N, x.shape[0])


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
            rows += measure(shape, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024], 50)
    out = Path(args.out or f"bench/results/dense_experts{'-tiny' if args.tiny else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "loadavg": os.getloadavg()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
