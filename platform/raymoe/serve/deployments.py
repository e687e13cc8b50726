"""Ray Serve deployments: a Router that runs the model with continuous batching behind the HTTP
API, and ExpertGroup deployments that each host a slice of the routed experts of every layer.

    app = build_app(ServeSettings(model="models:/raymoe-demo/1", mode="routed", num_groups=2))
    serve.run(app)

Routed mode: at each MoE layer of a decode step the router sorts the batch's routed slots by
expert and makes ONE call per expert group that received any (all groups' calls are in flight at
once), then combines the returned outputs with the routing weights. An ExpertGroup is stateless:
any replica of a group can serve any call, and `@serve.batch` merges calls arriving together
from several router replicas into one grouped GEMM per layer.

Data path: by default routers reach the groups' replicas over a direct TCP channel (channel.py):
a call costs about 0.3 ms there against about 6 ms through a Serve handle on the 2-core machine
(docs/PERFORMANCE.md). Serve still owns every replica: it starts them, scales each group on the load
the routers report for it, replaces dead ones and stops them; replicas register their channel address when
they start and withdraw it when Serve stops them. `data_path="handle"` uses Serve handles only.

Monolithic mode: the same router with every expert inside it. It is the baseline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import os
import secrets
import threading
import time
from dataclasses import dataclass, field

import torch
from ray import serve

from raymoe.model.moe import GroupedExperts, Routing, permute, unpermute
from raymoe.serve.autoscale import REPORT_EVERY_S, TokenRate, expert_group_autoscaling
from raymoe.serve.channel import Call, ChannelCall, ChannelError, ExpertChannel, ExpertServer
from raymoe.serve.directory import AppDirectory, Heartbeat, LoadBoard, Registry
from raymoe.serve.metrics import ReplicaUp, RouterMetrics
from raymoe.serve.placement import Placement, contiguous_placement


@dataclass(frozen=True)
class ServeSettings:
    model: str
    """A MODEL source (see model_dir.MODEL_SOURCES): Hugging Face or raymoe model directory,
    training checkpoint or MLflow URI."""
    mode: str = "routed"
    """'routed' (ExpertGroup deployments) or 'monolithic' (every expert in the router)."""
    num_groups: int = 2
    """Expert groups in routed mode; must divide the number of routed experts."""
    max_batch: int = 16
    """Sequences decoded together by one router replica."""
    max_tokens: int = 256
    """Largest max_tokens a request may ask for."""
    max_len: int = 4096
    """Longest sequence (prompt + completion) a router serves: every KV-cache row is this long
    (capped at the model's max_seq_len; imported models often allow 100K+ positions)."""
    micro_batches: int = 1
    """Decode micro-batches run in parallel threads so expert calls overlap router compute. On the
    2-core machine 2 was slower than 1 (docs/PERFORMANCE.md); try it where cores are spare."""
    api_key: str | None = None
    """Require 'Authorization: Bearer <api_key>' (null = open)."""
    tracking_uri: str | None = None
    """Where models:/ and runs:/ URIs resolve (null = $MLFLOW_TRACKING_URI)."""
    router_replicas: tuple[int, int] = (1, 1)
    """Router [min, max] replicas; min < max autoscales the router on ongoing requests."""
    group_replicas: tuple[int, int] = (1, 1)
    """Each ExpertGroup's [min, max] replicas; min < max turns on expert-load autoscaling."""
    router_cpus: float = 1.0
    """CPUs reserved per Router replica."""
    group_cpus: float = 0.5
    """CPUs reserved per ExpertGroup replica."""
    placement: dict | None = None
    """An expert placement (Placement.to_dict(), e.g. from `raymoe placement`); null = contiguous groups."""
    target_tokens_per_s: float = 2000.0
    """Routed tokens per second one ExpertGroup replica should handle (the autoscaling target)."""
    downscale_delay_s: float = 30.0
    """How long an ExpertGroup's load must stay below its replicas' capacity before one is removed."""
    data_path: str = "direct"
    """How routers reach expert groups: 'direct' (a TCP channel to the group's replicas, see
    channel.py; Serve still owns their lifecycle and scaling) or 'handle' (Serve handle calls)."""
    channel_token: str | None = None
    """Shared secret of the direct channel; build_app draws a random one per deployment."""
    app_key: str | None = None
    """Names the application's directory actor (directory.py: group replicas' addresses, routers'
    per-group load for the ExpertGroup autoscaler); build_app draws a random one per deployment."""

    def __post_init__(self) -> None:
        if self.mode not in ("routed", "monolithic"):
            raise ValueError(f"mode={self.mode!r} must be 'routed' or 'monolithic'")
        if self.num_groups < 1:
            raise ValueError(f"num_groups={self.num_groups} must be >= 1")
        if self.data_path not in ("direct", "handle"):
            raise ValueError(f"data_path={self.data_path!r} must be 'direct' or 'handle'")


CALL_TIMEOUT_S = 30.0
"""An expert-group call not answered by then is sent again (its replica is taken as lost)."""


def THROUGHPUT_OPTIMIZED() -> bool:  # noqa: N802 - reads like the env flag it is
    return os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0") == "1"


class RemoteExperts:
    """Replaces `MoE.routed` in the router: one batched call per expert group per layer, and the
    layer's shared experts computed while those calls are in flight.

    Any placement works: a group may host any set of experts, and an expert hosted by k groups
    (a replicated hot expert) has its slots dealt round-robin over the k copies. Without
    replicated experts, the slots are sorted straight into (group, local expert) order by giving
    each expert its position in the groups' concatenated lists, so each group's rows are one
    contiguous slice and nothing is re-sorted.
    """

    def __init__(self, layer: int, placement: Placement, handles: list, stats: "RouterStats", loop_of=lambda: None,
                 channel: ExpertChannel | None = None, shared: torch.nn.Module | None = None):
        self.layer, self.placement, self.handles, self.stats = layer, placement, handles, stats
        self.channel = channel  # the direct data path; None = Serve handles only
        self.shared = shared  # the layer's shared experts (the caller must not add them again)
        # With RAY_SERVE_THROUGHPUT_OPTIMIZED=1 a handle refuses calls from outside the replica's
        # event loop, so the engine's thread submits them to that loop; otherwise it calls directly
        # (a killed replica then surfaces as an error at once, which the retry below needs).
        self.loop_of = loop_of
        E, G = placement.num_experts, placement.num_groups
        self.sizes = [len(experts) for experts in placement.groups]
        self.replicated = any(n > 1 for n in placement.replicas.values())
        self.slot_of = torch.empty(E, dtype=torch.long)  # expert -> its row in the concatenated group lists
        for offset, experts in zip(itertools.accumulate([0] + self.sizes), placement.groups):
            self.slot_of[list(experts)] = torch.arange(offset, offset + len(experts))
        copies = [placement.group_of(e) for e in range(E)]
        self.num_copies = torch.tensor([len(c) for c in copies])
        self.copy_group = torch.tensor([c + [c[0]] * (G - len(c)) for c in copies])  # [E, G], padded
        self.local_index = torch.full((G, E), -1, dtype=torch.long)  # [G, E]: row of e in group g
        for g, experts in enumerate(placement.groups):
            self.local_index[g, list(experts)] = torch.arange(len(experts))

    def __call__(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        shared: list[torch.Tensor] = []

        def while_waiting() -> None:  # the layer's shared experts, run while the group calls are in flight
            if self.shared is not None:
                shared.append(self.shared(x_TD))

        path = self._replicated if self.replicated else self._contiguous
        out_ND, token_N, weight_N = path(x_TD, routing, while_waiting)
        y_TD = unpermute(out_ND, token_N, weight_N, x_TD.shape[0])
        return y_TD + shared[0] if shared else y_TD

    def _contiguous(self, x_TD: torch.Tensor, routing: Routing, while_waiting):
        """No replicated expert: slots sorted by (group, local expert) in one permute; each group's rows are a slice."""
        routing = dataclasses.replace(routing, expert_TK=self.slot_of[routing.expert_TK])
        x_ND, counts, token_N, weight_N = permute(x_TD, routing, len(self.slot_of))
        pending, row = [], 0
        for g, counts_g in enumerate(counts.split(self.sizes)):
            n = int(counts_g.sum())
            if n:
                rows = x_ND[row : row + n]
                pending.append((g, rows, counts_g, self._send(g, rows, counts_g)))
                self.stats.add(g, n)
            row += n
        while_waiting()
        out_ND = torch.cat([self._result(g, call, rows, c) for g, rows, c, call in pending]) if pending else x_ND
        return out_ND, token_N, weight_N

    def _replicated(self, x_TD: torch.Tensor, routing: Routing, while_waiting):
        """The general path: slots of a replicated expert are dealt over its copies, then sorted by group."""
        E, G = self.placement.num_experts, self.placement.num_groups
        x_ND, counts_E, token_N, weight_N = permute(x_TD, routing, E)
        counts_host = counts_E.cpu()
        expert_N = torch.repeat_interleave(torch.arange(E), counts_host)
        rank_N = torch.arange(expert_N.numel()) - (torch.cumsum(counts_host, 0) - counts_host)[expert_N]
        group_N = self.copy_group[expert_N, rank_N % self.num_copies[expert_N]]
        local_N = self.local_index[group_N, expert_N]
        order = torch.argsort(group_N * E + local_N, stable=True)  # by group, then by its local expert
        x_sorted = x_ND[order]
        sizes = torch.bincount(group_N, minlength=G).tolist()
        pending, offset = [], 0
        for g, n in enumerate(sizes):
            if n:
                counts = torch.bincount(local_N[group_N == g], minlength=len(self.placement.groups[g]))
                rows = x_sorted[offset : offset + n]
                pending.append((offset, n, g, rows, counts, self._send(g, rows, counts)))
                self.stats.add(g, n)
            offset += n
        while_waiting()
        out_sorted = x_ND.new_empty(x_ND.shape)
        for start, n, g, rows, counts, response in pending:  # all calls are in flight before the first wait
            out_sorted[start : start + n] = self._result(g, response, rows, counts)
        return torch.empty_like(out_sorted).index_copy_(0, order, out_sorted), token_N, weight_N

    def _send(self, g: int, rows: torch.Tensor, counts: torch.Tensor):
        """Start one group call; returns something with .result()."""
        if self.channel is not None:
            call = self.channel.send(g, self.layer, rows, counts)
            if call is not None:
                return call
            self.stats.fallbacks += 1  # no live replica registered: Serve's handle waits for one
        loop = self.loop_of() if THROUGHPUT_OPTIMIZED() else None
        if loop is None:
            return self.handles[g].forward.remote((self.layer, rows, counts))

        async def call():
            return await self.handles[g].forward.remote((self.layer, rows, counts))

        return asyncio.run_coroutine_threadsafe(call(), loop)

    def _result(self, g: int, response, rows: torch.Tensor, counts: torch.Tensor, attempts: int = 3) -> torch.Tensor:
        """The group's answer; if the replica died mid-call, the same call again (Serve routes it
        to a live replica of that group: ExpertGroups are stateless, so a retry is always safe)."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        for attempt in range(attempts):
            try:
                if isinstance(response, ChannelCall):
                    return response.result()
                if isinstance(response, concurrent.futures.Future):
                    return response.result(timeout=CALL_TIMEOUT_S)
                return response.result(timeout_s=CALL_TIMEOUT_S)
            except (ChannelError, RayActorError, ActorDiedError, ActorUnavailableError, TimeoutError, concurrent.futures.TimeoutError):
                if attempt == attempts - 1:
                    raise
                self.stats.retries += 1
                response = self._send(g, rows, counts)
        raise AssertionError("unreachable")


@dataclass
class RouterStats:
    """Calls and tokens the router sent to each expert group (what the group autoscaler reads)."""

    num_groups: int
    tokens: list[int] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    rates: list[TokenRate] = field(default_factory=list)
    """Routed tokens per second to each group over the last 5 s (what the group autoscaler reads)."""
    retries: int = 0
    """Calls sent again because the replica serving them died."""
    fallbacks: int = 0
    """Direct-channel calls that went through a Serve handle because no replica was registered."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.tokens = [0] * self.num_groups
        self.calls = [0] * self.num_groups
        self.rates = [TokenRate() for _ in range(self.num_groups)]

    def add(self, group: int, tokens: int) -> None:
        with self._lock:
            self.tokens[group] += tokens
            self.calls[group] += 1
            self.rates[group].add(tokens)

    def tokens_per_s(self) -> list[float]:
        with self._lock:
            return [r.rate() for r in self.rates]


def resolve_placement(settings: ServeSettings, num_experts: int) -> Placement:
    """settings.placement (a planned layout) or the contiguous one, checked against the model."""
    if settings.placement is None:
        return contiguous_placement(num_experts, settings.num_groups)
    placement = Placement.from_dict(settings.placement)
    if placement.num_experts != num_experts or placement.num_groups != settings.num_groups:
        raise ValueError(f"the placement has {placement.num_experts} experts in {placement.num_groups} groups; the model has "
                         f"{num_experts} routed experts and num_groups={settings.num_groups}")
    return placement


class GroupExperts:
    """One expert group's compute, no Ray: its experts of every MoE layer, and `run_calls`, which
    merges the calls for the same layer into one grouped GEMM and hands each caller its rows."""

    def __init__(self, model, experts: list[int]):
        self.experts = list(experts)
        self.layers: dict[int, GroupedExperts] = {}
        for i, moe in enumerate(model.moe_layers()):
            full = moe.experts
            part = GroupedExperts(len(self.experts), full.w1.shape[1], full.w1.shape[2])
            for name in ("w1", "w2", "w3"):
                getattr(part, name).data = getattr(full, name).data[self.experts].clone()
            self.layers[i] = part.eval()
        self.tokens, self.batches = 0, 0
        self._lock = threading.Lock()

    def run_calls(self, calls: list[Call]) -> list[torch.Tensor]:
        """Each call: (layer, rows sorted by local expert, counts per local expert)."""
        with self._lock:  # the handle path and the direct channel may both be running calls
            return self._run_calls(calls)

    def _run_calls(self, calls: list[Call]) -> list[torch.Tensor]:
        self.batches += 1
        out: list[torch.Tensor | None] = [None] * len(calls)
        by_layer: dict[int, list[int]] = {}
        for i, (layer, _, _) in enumerate(calls):
            by_layer.setdefault(layer, []).append(i)
        with torch.no_grad():
            for layer, idx in by_layer.items():
                xs = [calls[i][1] for i in idx]
                counts = [calls[i][2] for i in idx]
                e = len(self.experts)
                if any(c.shape != (e,) for c in counts) or layer not in self.layers:
                    raise ValueError(f"call for layer {layer} with counts {[tuple(c.shape) for c in counts]}: this group has "
                                     f"{e} experts in layers {sorted(self.layers)}")
                if len(idx) == 1:  # one caller: its rows are already sorted by local expert
                    out[idx[0]] = self.layers[layer](xs[0], counts[0])
                else:
                    local = torch.cat([torch.repeat_interleave(torch.arange(e), c) for c in counts])
                    order = torch.argsort(local, stable=True)
                    y_sorted = self.layers[layer](torch.cat(xs)[order], torch.stack(counts).sum(0))
                    y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)
                    for i, part in zip(idx, y.split([x.shape[0] for x in xs])):
                        out[i] = part
                self.tokens += int(sum(x.shape[0] for x in xs))
        return out


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class ExpertGroup:
    """Hosts its placement's routed experts of every MoE layer (a GroupExperts); stateless."""

    def __init__(self, settings: ServeSettings, group: int):
        from raymoe.serve.engine import load_model

        cfg, model = load_model(settings.model, tracking_uri=settings.tracking_uri)
        self.compute = GroupExperts(model, resolve_placement(settings, model.cfg.num_experts).groups[group])
        self.group = group
        self.up = ReplicaUp(cfg.name, group)
        self.server, self.heartbeat = None, None
        if settings.data_path == "direct":
            import ray

            self.server = ExpertServer(self.compute.run_calls, settings.channel_token, host=ray.util.get_node_ip_address())
            replica = serve.get_replica_context().replica_id.unique_id
            self.heartbeat = Heartbeat(Registry(AppDirectory(settings.app_key)), group, replica, self.server.address)

    def __del__(self):
        """Serve calls this when it stops the replica (scale-down, redeploy): leave the registry
        first so routers stop choosing this replica, then stop the channel."""
        if getattr(self, "up", None) is not None:
            self.up.stop()
            self.up = None
        if getattr(self, "server", None) is not None:
            try:
                self.heartbeat.stop()
            finally:
                self.server.close()
                self.server = None

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)
    async def forward(self, calls: list[Call]) -> list[torch.Tensor]:
        """The Serve-handle path: calls arriving together are merged by `@serve.batch`."""
        return self.compute.run_calls(calls)

    def load(self) -> dict:
        return {"group": self.group, "experts": self.compute.experts, "tokens": self.compute.tokens,
                "batches": self.compute.batches, "channel_calls": self.server.calls_served if self.server else 0,
                "address": self.server.address if self.server else None}


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256)
class Router:
    """The model minus (in routed mode) its routed experts, continuous batching, the HTTP API."""

    def __init__(self, settings: ServeSettings, *groups):
        import os

        from raymoe.serve.api import APILimits, CompletionsAPI
        from raymoe.model_dir import open_model
        from raymoe.serve.engine import Engine, ThreadedEngine

        cfg, model, tok, _ = open_model(settings.model, tracking_uri=settings.tracking_uri)
        self.mode = settings.mode
        self.stats = RouterStats(settings.num_groups if settings.mode == "routed" else 0)
        self.channel = None
        if settings.mode == "routed":
            self.placement = resolve_placement(settings, cfg.model.num_experts)
            if settings.data_path == "direct":
                self.channel = ExpertChannel(settings.channel_token, settings.num_groups, timeout_s=CALL_TIMEOUT_S,
                                             registry=Registry(AppDirectory(settings.app_key)))
            for layer, moe in enumerate(model.moe_layers()):
                moe.routed = RemoteExperts(layer, self.placement, list(groups), self.stats, loop_of=lambda: self.loop,
                                           channel=self.channel, shared=moe.shared)
                moe.shared = None  # RemoteExperts runs them while the groups compute
                moe.experts = GroupedExperts(0, 1, 1)  # the weights live in the groups, not here
        max_len = min(settings.max_len, model.cfg.max_seq_len)
        self.engine = Engine(model, tok, max_batch=settings.max_batch, max_len=max_len, micro_batches=settings.micro_batches)
        self.metrics = RouterMetrics(cfg.name, settings.num_groups if settings.mode == "routed" else 0)
        self.threaded = ThreadedEngine(self.engine, on_finish=self.metrics.finished)
        limits = APILimits(max_prompt_tokens=max_len // 2, max_tokens=settings.max_tokens)
        self.api = CompletionsAPI(self.threaded, tok, model_name=cfg.name, limits=limits,
                                  api_key=settings.api_key or os.environ.get("RAYMOE_API_KEY"),
                                  expert_load=self.expert_load, chat_template=chat_template_of(cfg, tok))
        self.started = time.time()
        self.loop = None  # the replica's event loop, known from the first request on
        self.board, self._stop_reporting = None, threading.Event()
        if settings.mode == "routed" and settings.group_replicas[0] != settings.group_replicas[1]:
            self.board = LoadBoard(AppDirectory(settings.app_key))
            self.replica = serve.get_replica_context().replica_id.unique_id
        threading.Thread(target=self._report, name="raymoe-router-report", daemon=True).start()

    def _report(self) -> None:
        """Once a second: the operator's gauges and counters (metrics.py) and, when groups
        autoscale, the tokens/s routed to each group for the group autoscaler."""
        while not self._stop_reporting.wait(REPORT_EVERY_S):
            rates = self.stats.tokens_per_s() if self.mode == "routed" else None
            try:
                self.metrics.sample(len(self.engine.running), len(self.engine.waiting), list(self.stats.tokens), rates)
            except Exception as e:  # noqa: BLE001 - metrics must never stop serving
                print(f"raymoe: could not record serving metrics: {e}", flush=True)
            if self.board is None:
                continue
            try:
                self.board.publish(self.replica, rates)
            except Exception as e:  # noqa: BLE001 - a directory hiccup must not stop serving; the next report retries
                print(f"raymoe: could not publish expert-group load: {e}", flush=True)

    def __del__(self):
        """Serve calls this when it stops the replica: withdraw the load report at once."""
        if hasattr(self, "_stop_reporting"):
            self._stop_reporting.set()
        if getattr(self, "board", None) is not None:
            self.board.withdraw(self.replica)
            self.board = None

    def expert_load(self) -> dict:
        per_expert = self.engine.load.tolist()
        out = {"mode": self.mode, "layers": per_expert, "total_per_expert": [sum(col) for col in zip(*per_expert)] if per_expert else []}
        if self.mode == "routed":
            out["groups"] = {"tokens": list(self.stats.tokens), "calls": list(self.stats.calls), "retries": self.stats.retries,
                             "fallbacks": self.stats.fallbacks, "data_path": "direct" if self.channel else "handle",
                             "placement": self.placement.to_dict()}
            out["groups"]["tokens_per_s"] = [round(r, 1) for r in self.stats.tokens_per_s()]
        out["decode_steps"] = self.engine.stats["decode_steps"]
        out["prefills"] = self.engine.stats["prefills"]
        return out

    async def __call__(self, request):
        self.loop = self.loop or asyncio.get_running_loop()
        return await self.api.handle(request)


def chat_template_of(cfg, tok):
    """The template /v1/chat/completions renders with: the fine-tuning run's data.chat_template
    when it set one (what the model learned), else the tokenizer's own; None when neither is
    there or readable (the route then says so)."""
    from raymoe.train.data import DataError
    from raymoe.train.sft import load_chat_template

    try:
        return load_chat_template(cfg.data, tok)
    except DataError as e:
        print(f"raymoe: /v1/chat/completions is off for {cfg.name!r}: {e}", flush=True)
        return None


def build_app(settings: ServeSettings):
    """The Serve application: a Router, plus one ExpertGroup deployment per group in routed mode."""
    r_lo, r_hi = settings.router_replicas
    # Routers scale on ongoing requests (Serve's default policy): a replica is "full" at max_batch.
    router_scaling = ({"num_replicas": "auto", "autoscaling_config": {"min_replicas": r_lo, "max_replicas": r_hi,
                                                                      "target_ongoing_requests": settings.max_batch}}
                      if r_lo != r_hi else {"num_replicas": r_lo})
    router = Router.options(ray_actor_options={"num_cpus": settings.router_cpus}, **router_scaling)
    if settings.mode == "monolithic":
        return router.bind(settings)
    if settings.data_path == "direct" and settings.channel_token is None:
        settings = dataclasses.replace(settings, channel_token=secrets.token_hex(16))
    if settings.app_key is None:
        settings = dataclasses.replace(settings, app_key=secrets.token_hex(8))
    lo, hi = settings.group_replicas

    def scaling(g: int) -> dict:
        if lo == hi:
            return {"num_replicas": lo}
        return {"num_replicas": "auto", "autoscaling_config": expert_group_autoscaling(
            lo, hi, settings.target_tokens_per_s, app_key=settings.app_key, group=g,
            downscale_delay_s=settings.downscale_delay_s)}

    groups = [ExpertGroup.options(name=f"ExpertGroup{g}", ray_actor_options={"num_cpus": settings.group_cpus}, **scaling(g))
              .bind(settings, g) for g in range(settings.num_groups)]
    return router.bind(settings, *groups)
