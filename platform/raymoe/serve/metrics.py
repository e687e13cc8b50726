"""What an operator scrapes: serving metrics through `ray.util.metrics`, exported by every Ray
node's metrics agent in Prometheus format (Ray prefixes each name with `ray_`).

Router replicas (label `model`; per-group series add `group`, at most num_groups values):
    raymoe_request_latency_seconds           histogram  arrival to last token
    raymoe_time_to_first_token_seconds       histogram  arrival to first token
    raymoe_time_per_output_token_seconds     histogram  first to last token, per token after the first
    raymoe_requests_total                    counter    finished requests, by `finish_reason` (stop, length, abort, error)
    raymoe_output_tokens_total               counter    generated tokens
    raymoe_requests_running / _waiting       gauge      in the decode batch / queued for a cache row
    raymoe_routed_tokens_total               counter    routed (token, expert) slots sent to each expert group
    raymoe_routed_tokens_per_second          gauge      the same, over the last seconds (what the autoscaler uses)
ExpertGroup replicas:
    raymoe_expert_group_replicas             gauge      1 per live replica, by `group`: sum by (group) = replicas

Labels stay bounded: per group, never per expert or request. Ray adds WorkerId, NodeAddress and
SessionName, so one series per replica; sum (or max) by the labels above in queries.
docs/serving-metrics.md has the queries and the Grafana dashboard that plots them.
"""

from __future__ import annotations

import threading
import time

from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120]
PER_TOKEN_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]


class RouterMetrics:
    """One Router replica's metrics. `finished(req)` from the engine thread as each request ends;
    `sample(...)` once a second from the replica's report thread (which also keeps the gauges
    exported: Ray drops a gauge soon after it was last set)."""

    def __init__(self, model: str, num_groups: int):
        self.tags = {"model": model}
        self.latency = Histogram("raymoe_request_latency_seconds", "Request arrival to its last token.",
                                 boundaries=LATENCY_BUCKETS_S, tag_keys=("model",))
        self.ttft = Histogram("raymoe_time_to_first_token_seconds", "Request arrival to its first token.",
                              boundaries=LATENCY_BUCKETS_S, tag_keys=("model",))
        self.tpot = Histogram("raymoe_time_per_output_token_seconds", "First to last token, per token after the first.",
                              boundaries=PER_TOKEN_BUCKETS_S, tag_keys=("model",))
        self.requests = Counter("raymoe_requests_total", "Finished requests by finish reason.", tag_keys=("model", "finish_reason"))
        self.output_tokens = Counter("raymoe_output_tokens_total", "Generated tokens.", tag_keys=("model",))
        self.running = Gauge("raymoe_requests_running", "Requests in the decode batch.", tag_keys=("model",))
        self.waiting = Gauge("raymoe_requests_waiting", "Requests waiting for a KV-cache row.", tag_keys=("model",))
        self.num_groups = num_groups
        if num_groups:
            self.routed = Counter("raymoe_routed_tokens_total", "Routed (token, expert) slots sent to each expert group.",
                                  tag_keys=("model", "group"))
            self.routed_rate = Gauge("raymoe_routed_tokens_per_second", "Routed slots per second to each expert group.",
                                     tag_keys=("model", "group"))
        self._routed_seen = [0] * num_groups

    def finished(self, req) -> None:
        """A request ended (engine.Request: arrival, first_token_at, output_ids, finish_reason)."""
        now = time.perf_counter()
        self.requests.inc(1, tags={**self.tags, "finish_reason": req.finish_reason or "abort"})
        if req.first_token_at is None:
            return
        self.latency.observe(now - req.arrival, tags=self.tags)
        self.ttft.observe(req.first_token_at - req.arrival, tags=self.tags)
        n = len(req.output_ids)
        if n:
            self.output_tokens.inc(n, tags=self.tags)
        if n > 1:
            self.tpot.observe((now - req.first_token_at) / (n - 1), tags=self.tags)

    def sample(self, running: int, waiting: int, routed_tokens: list[int] | None = None,
               routed_per_s: list[float] | None = None) -> None:
        self.running.set(running, tags=self.tags)
        self.waiting.set(waiting, tags=self.tags)
        for g in range(self.num_groups):
            tags = {**self.tags, "group": str(g)}
            if routed_tokens is not None and routed_tokens[g] > self._routed_seen[g]:
                self.routed.inc(routed_tokens[g] - self._routed_seen[g], tags=tags)
                self._routed_seen[g] = routed_tokens[g]
            if routed_per_s is not None:
                self.routed_rate.set(routed_per_s[g], tags=tags)


class ReplicaUp:
    """`raymoe_expert_group_replicas` = 1 for this ExpertGroup replica, re-set every `every_s`: Ray
    drops a gauge from its export soon after it was last set, so a value set once vanishes."""

    def __init__(self, model: str, group: int, every_s: float = 1.0):
        self.gauge = Gauge("raymoe_expert_group_replicas", "1 per live ExpertGroup replica: sum by (group).",
                           tag_keys=("model", "group"))
        self.tags = {"model": model, "group": str(group)}
        self._stop = threading.Event()
        self.gauge.set(1, tags=self.tags)
        threading.Thread(target=self._run, args=(every_s,), name="raymoe-replica-up", daemon=True).start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.gauge.set(1, tags=self.tags)

    def stop(self) -> None:
        self._stop.set()
        self.gauge.set(0, tags=self.tags)
