"""Expert-load-aware autoscaling: each ExpertGroup deployment scales on the routed tokens the
routers send it.

Every Router replica counts the tokens it routes to each expert group (over the last few
seconds) and publishes those rates once a second on its application's `LoadBoard` (a named
actor, directory.py). The Serve controller runs `expert_load_policy` once per control loop
for each ExpertGroup deployment: it sums the fresh reports of every router for that group and asks
for ceil(total / target_tokens_per_s) replicas, within [min, max]. So a group holding hot experts
gains replicas while cold groups stay at their minimum: each group scales on the traffic it
actually receives, not on the router's request count, and the count is made where the routing
decision is (a group's replicas cannot see calls queued for them elsewhere).

    autoscaling_config = expert_group_autoscaling(min_replicas=1, max_replicas=4, target_tokens_per_s=2000,
                                                  app_key=key, group=0)

A router that stops withdraws its report; one that dies leaves a report that is ignored once it
is older than REPORT_STALE_S.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from raymoe.serve.directory import AppDirectory, LoadBoard

REPORT_EVERY_S = 1.0
"""How often a router publishes its per-group rates."""
REPORT_STALE_S = 10.0
"""A report older than this (its router died without withdrawing it) is ignored."""
READ_EVERY_S = 0.5
"""The policy runs every control loop (0.1 s); it reads the board at most this often."""

logger = logging.getLogger("ray.serve")


def _board(app_key: str) -> LoadBoard:
    """The application's load board as the Serve controller reads it: looked up, never created
    (the controller must not own the directory; directory.py). A fresh lookup per read (at most
    every READ_EVERY_S): Serve pickles this policy with what it references, so it keeps no state
    between calls beyond ctx.policy_state."""
    return LoadBoard(AppDirectory(app_key, create=False))


def routed_load(reports: list[dict], group: int, now: float) -> tuple[float, int]:
    """(tokens/s the fresh reports route to `group`, how many routers reported)."""
    fresh = [r for r in reports if now - r["t"] <= REPORT_STALE_S and group < len(r["tokens_per_s"])]
    return float(sum(r["tokens_per_s"][group] for r in fresh)), len(fresh)


def desired_replicas(total_tokens_per_s: float, target_per_replica: float, lo: int, hi: int) -> int:
    want = math.ceil(total_tokens_per_s / target_per_replica) if total_tokens_per_s > 0 else lo
    return max(lo, min(hi, want))


def expert_load_policy(ctx) -> tuple[int, dict[str, Any]]:
    """Serve custom autoscaling policy (AutoscalingContext -> (replicas, state)) for one ExpertGroup."""
    # Ray 2.60 hands a string-named policy no kwargs; they are on the deployment's config.
    kwargs = getattr(getattr(ctx.config, "policy", None), "policy_kwargs", None) or {}
    state = dict(ctx.policy_state or {})
    now = time.time()
    if now - state.get("read_at", 0.0) >= READ_EVERY_S:
        total, routers = routed_load(_board(kwargs["app_key"]).reports(), int(kwargs["group"]), now)
        state.update(read_at=now, routed_tokens_per_s=total, routers=routers)
    want = desired_replicas(state["routed_tokens_per_s"], float(kwargs["target_tokens_per_s"]),
                            ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas)
    if want != state.get("wanted"):
        logger.info(f"raymoe: {ctx.deployment_name} wants {want} replica(s): {state['routed_tokens_per_s']:.0f} routed "
                    f"tokens/s from {state['routers']} router(s), target {kwargs['target_tokens_per_s']} per replica")
        state["wanted"] = want
    return want, state


def expert_group_autoscaling(min_replicas: int, max_replicas: int, target_tokens_per_s: float, app_key: str, group: int,
                             upscale_delay_s: float = 3.0, downscale_delay_s: float = 30.0) -> dict[str, Any]:
    """An autoscaling_config for ExpertGroup `group` of the application whose routers report on `app_key`."""
    return {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "upscale_delay_s": upscale_delay_s,
        "downscale_delay_s": downscale_delay_s,
        "policy": {
            "policy_function": "raymoe.serve.autoscale:expert_load_policy",
            "policy_kwargs": {"target_tokens_per_s": target_tokens_per_s, "app_key": app_key, "group": group},
        },
    }
