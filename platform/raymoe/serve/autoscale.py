"""Expert-load-aware autoscaling: each ExpertGroup deployment scales on the routed tokens it serves.

Every ExpertGroup replica reports `routed_tokens_per_s` (tokens it ran through its experts per
second, over the last few seconds) through Serve's `record_autoscaling_stats` hook. The policy
below, run by the Serve controller once per deployment, sums that over the group's replicas and
asks for ceil(total / target_tokens_per_s_per_replica) replicas, within [min, max]. So a group
holding hot experts gains replicas while cold groups stay at their minimum: each group scales on
the traffic it actually receives, not on the router's request count.

    autoscaling_config = expert_group_autoscaling(min_replicas=1, max_replicas=4, target_tokens_per_s=2000)
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

LOAD_METRIC = "routed_tokens_per_s"


class TokenRate:
    """Tokens per second over a sliding window (what one replica reports)."""

    def __init__(self, window_s: float = 5.0):
        self.window_s = window_s
        self.events: deque[tuple[float, int]] = deque()

    def add(self, tokens: int, now: float | None = None) -> None:
        self.events.append((time.monotonic() if now is None else now, tokens))

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self.events and self.events[0][0] < now - self.window_s:
            self.events.popleft()
        return sum(t for _, t in self.events) / self.window_s


def desired_replicas(total_tokens_per_s: float, target_per_replica: float, lo: int, hi: int) -> int:
    want = math.ceil(total_tokens_per_s / target_per_replica) if total_tokens_per_s > 0 else lo
    return max(lo, min(hi, want))


def expert_load_policy(ctx, target_tokens_per_s: float = 2000.0) -> tuple[int, dict[str, Any]]:
    """Serve custom autoscaling policy (AutoscalingContext -> (replicas, state))."""
    # Ray 2.60 hands a string-named policy no kwargs; they are on the deployment's config.
    policy = getattr(ctx.config, "policy", None)
    target_tokens_per_s = float((getattr(policy, "policy_kwargs", None) or {}).get("target_tokens_per_s", target_tokens_per_s))
    per_replica = (ctx.aggregated_metrics or {}).get(LOAD_METRIC, {})
    total = float(sum(per_replica.values()))
    lo = ctx.capacity_adjusted_min_replicas
    hi = ctx.capacity_adjusted_max_replicas
    want = desired_replicas(total, target_tokens_per_s, lo, hi)
    return want, {"routed_tokens_per_s": total}


def expert_group_autoscaling(min_replicas: int, max_replicas: int, target_tokens_per_s: float,
                             upscale_delay_s: float = 3.0, downscale_delay_s: float = 30.0) -> dict[str, Any]:
    """An autoscaling_config for an ExpertGroup deployment using `expert_load_policy`."""
    return {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "metrics_interval_s": 1.0,
        "look_back_period_s": 5.0,
        "upscale_delay_s": upscale_delay_s,
        "downscale_delay_s": downscale_delay_s,
        "policy": {
            "policy_function": "raymoe.serve.autoscale:expert_load_policy",
            "policy_kwargs": {"target_tokens_per_s": target_tokens_per_s},
        },
    }
