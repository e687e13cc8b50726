"""The Ray Serve side of serving, and the only module that imports `ray.serve`: the Ingress,
Router and ExpertGroup deployments, the application builder, and `run_serving`, which brings them
up as `run_training` brings up Ray Train.

    run_serving(settings_from_config(cfg))            # what `raymoe serve` does
    serve.run(build_app(settings))                     # the application alone (serve_apps/ for `serve deploy`)

The Ingress serves the OpenAI API (api.py, a FastAPI app Serve mounts with `@serve.ingress`) and
holds no model; each request becomes one streaming `generate` call to a Router replica
(engine_link.py), so a Router's death ends only the streams it had started, with an error event,
and what it had not started goes to another replica. The Router runs the model, minus its routed
experts in routed mode, with continuous batching. Each MoE layer's routed tokens go out in one
call per expert group (experts.RemoteExperts) to ExpertGroup deployments, each hosting a slice of
every layer's experts (experts.GroupExperts). Calls travel over the direct TCP channel by default
(channel.py: about 0.2 ms a call against about 6 ms through a Serve handle on the 2-core machine,
docs/PERFORMANCE.md) or through Serve handles (transport.py). Serve owns every replica either way:
it starts them, scales each group on the load the routers report for it (autoscale.py), replaces
dead ones and stops them.

Monolithic mode: the same Router with every expert inside it. It is the baseline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import sys
import threading
import time

from ray import serve

from raymoe.serve.autoscale import REPORT_EVERY_S, expert_group_autoscaling
from raymoe.serve.channel import Call, ExpertChannel, ExpertServer
from raymoe.serve.directory import AppDirectory, Heartbeat, LoadBoard, Registry
from raymoe.serve.experts import GroupExperts, RemoteExperts, RouterStats, resolve_placement
from raymoe.serve.metrics import ReplicaUp, RouterMetrics
from raymoe.serve.settings import ServeSettings
from raymoe.serve.transport import CALL_TIMEOUT_S, DirectTransport, HandleTransport


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class ExpertGroup:
    """Hosts its placement's routed experts of every MoE layer (an experts.GroupExperts); stateless."""

    def __init__(self, settings: ServeSettings, group: int):
        from raymoe.serve.engine import load_model

        cfg, model = load_model(settings.model, tracking_uri=settings.tracking_uri)
        placement = resolve_placement(settings.placement, settings.serve.num_groups, model.cfg.num_experts)
        self.compute = GroupExperts(model, placement.groups[group])
        self.group = group
        self.up = ReplicaUp(cfg.name, group)
        self.server, self.heartbeat = None, None
        if settings.serve.data_path == "direct":
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
    async def forward(self, calls: list[Call]) -> list:
        """The Serve-handle path: calls arriving together are merged by `@serve.batch`."""
        return self.compute.run_calls(calls)

    def load(self) -> dict:
        return {"group": self.group, "experts": self.compute.experts, "tokens": self.compute.tokens,
                "batches": self.compute.batches, "channel_calls": self.server.calls_served if self.server else 0,
                "address": self.server.address if self.server else None}


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256)
class Router:
    """The model minus (in routed mode) its routed experts, with continuous batching: the Ingress
    calls `generate` (a stream of engine_link events) for every request."""

    def __init__(self, settings: ServeSettings, *groups):
        from raymoe.model.moe import GroupedExperts
        from raymoe.model_dir import open_model
        from raymoe.serve.engine import Engine, ThreadedEngine

        cfg, model, tok, src = open_model(settings.model, tracking_uri=settings.tracking_uri)
        s = settings.serve
        self.mode = s.mode
        self.stats = RouterStats(s.num_groups if settings.routed else 0)
        self.transport = None
        self.loop = None  # the replica's event loop, known from the first request on
        if settings.routed:
            self.placement = resolve_placement(settings.placement, s.num_groups, cfg.model.num_experts)
            handles = HandleTransport(list(groups), loop_of=lambda: self.loop)
            if s.data_path == "direct":
                channel = ExpertChannel(settings.channel_token, s.num_groups, timeout_s=CALL_TIMEOUT_S,
                                        registry=Registry(AppDirectory(settings.app_key)))
                self.transport = DirectTransport(channel, fallback=handles)
            else:
                self.transport = handles
            for layer, moe in enumerate(model.moe_layers()):
                moe.routed = RemoteExperts(layer, self.placement, self.transport, self.stats, shared=moe.shared)
                moe.shared = None  # RemoteExperts runs them while the groups compute
                moe.experts = GroupedExperts(0, 1, 1)  # the weights live in the groups, not here
        self.max_len = min(s.max_len, model.cfg.max_seq_len)
        self.engine = Engine(model, tok, max_batch=s.max_batch, max_len=self.max_len, micro_batches=s.micro_batches)
        if s.compile_decode:  # compiled before the replica is ready, not on its first requests
            model.compile_decode()
            self.engine.warm_up(log=logging.getLogger("ray.serve").info)
        self.metrics = RouterMetrics(cfg.name, s.num_groups if settings.routed else 0)
        self.threaded = ThreadedEngine(self.engine, on_finish=self.metrics.finished)
        template = chat_template_of(cfg, tok, src.path)
        self.description = {"name": cfg.name, "max_len": self.max_len, "tokenizer": tok,
                            "chat_template": (template.text, template.name) if template else None}
        self.stream_interval_s = s.stream_interval_s
        self.board, self._stop_reporting = None, threading.Event()
        if settings.routed and s.group_range[0] != s.group_range[1]:
            self.board = LoadBoard(AppDirectory(settings.app_key))
            self.replica = serve.get_replica_context().replica_id.unique_id
        threading.Thread(target=self._report, name="raymoe-router-report", daemon=True).start()

    def describe(self) -> dict:
        """What the Ingress needs to parse and render requests: the model's name, tokenizer, chat template, length."""
        return self.description

    async def generate(self, prompt_ids: list[int], params, whole: bool = False):
        from raymoe.serve.engine_link import engine_events

        # Handle calls made from the engine thread are submitted to this loop in Serve's
        # throughput-optimized mode (transport.HandleTransport).
        self.loop = self.loop or asyncio.get_running_loop()
        async for event in engine_events(self.threaded, prompt_ids, params, self.stream_interval_s, whole):
            yield event

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
                             "fallbacks": getattr(self.transport, "fallbacks", 0), "data_path": self.transport.name,
                             "placement": self.placement.to_dict()}
            out["groups"]["tokens_per_s"] = [round(r, 1) for r in self.stats.tokens_per_s()]
        out["decode_steps"] = self.engine.stats["decode_steps"]
        out["prefills"] = self.engine.stats["prefills"]
        return out


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress()
class Ingress:
    """The OpenAI API (api.py's FastAPI app, mounted late: `__serve_build_asgi_app__` runs after
    `__init__`) in front of the Router replicas. It holds no model, only the tokenizer, so it
    outlives what can kill a Router (a bad batch, memory): a Router's death costs only the streams
    it had started, each ended with an error event, and whatever it had not started goes to another
    replica (engine_link.py). No CPU reserved: like Serve's HTTP proxy, it is light and I/O-bound."""

    async def __init__(self, settings: ServeSettings, router):
        from raymoe.serve.api import APILimits, CompletionsAPI
        from raymoe.serve.engine_link import RemoteEngine
        from raymoe.train.sft import ChatTemplate

        self.router = router
        info = await router.describe.remote()
        tok, max_len = info["tokenizer"], info["max_len"]
        template = ChatTemplate(*info["chat_template"], tok.special_tokens) if info["chat_template"] else None
        limits = APILimits(max_prompt_tokens=max_len // 2, max_tokens=settings.serve.max_tokens)
        self.backend = RemoteEngine(router)
        self.api = CompletionsAPI(self.backend, tok, model_name=info["name"], limits=limits, api_key=settings.api_key,
                                  expert_load=self.expert_load, chat_template=template)

    async def expert_load(self) -> dict:
        load = await self.router.expert_load.remote()
        # Calls sent again before they produced anything, and calls cut after they had (a
        # non-streamed one is then generated again by api.py; a stream ends with an error event).
        return {**load, "ingress": {"resent": self.backend.resent, "lost_mid_way": self.backend.lost}}

    def __serve_build_asgi_app__(self):
        from raymoe.serve.api import build_asgi_app

        return build_asgi_app(self.api)


def chat_template_of(cfg, tok, model_dir: str | None = None):
    """The template /v1/chat/completions renders with: the one the model directory carries (the
    template its fine-tuning used, saved beside the weights; model_dir.CHAT_TEMPLATE), else the
    run's data.chat_template file, else the tokenizer's own; None when none is there or readable
    (the route then says so)."""
    from raymoe.model_dir import read_chat_template
    from raymoe.train.data import DataError
    from raymoe.train.sft import ChatTemplate, load_chat_template

    saved = read_chat_template(model_dir) if model_dir else None
    if saved is not None:
        return ChatTemplate(saved[1], saved[0], tok.special_tokens)
    try:
        return load_chat_template(cfg.data, tok)
    except DataError as e:
        print(f"raymoe: /v1/chat/completions is off for {cfg.name!r}: {e}", flush=True)
        return None


def build_app(settings: ServeSettings):
    """The Serve application: the Ingress (HTTP) in front of the Router, plus one ExpertGroup
    deployment per group in routed mode."""
    s = settings.serve
    r_lo, r_hi = s.router_range
    # Routers scale on ongoing requests (Serve's default policy): a replica is "full" at max_batch.
    router_scaling = ({"num_replicas": "auto", "autoscaling_config": {"min_replicas": r_lo, "max_replicas": r_hi,
                                                                      "target_ongoing_requests": s.max_batch}}
                      if r_lo != r_hi else {"num_replicas": r_lo})
    router = Router.options(ray_actor_options={"num_cpus": s.router_cpus}, **router_scaling)
    if not settings.routed:
        return Ingress.bind(settings, router.bind(settings))
    if s.data_path == "direct" and settings.channel_token is None:
        settings = dataclasses.replace(settings, channel_token=secrets.token_hex(16))
    if settings.app_key is None:
        settings = dataclasses.replace(settings, app_key=secrets.token_hex(8))
    lo, hi = s.group_range

    def scaling(g: int) -> dict:
        if lo == hi:
            return {"num_replicas": lo}
        return {"num_replicas": "auto", "autoscaling_config": expert_group_autoscaling(
            lo, hi, s.target_tokens_per_s, app_key=settings.app_key, group=g, downscale_delay_s=s.downscale_delay_s)}

    groups = [ExpertGroup.options(name=f"ExpertGroup{g}", ray_actor_options={"num_cpus": s.group_cpus}, **scaling(g))
              .bind(settings, g) for g in range(s.num_groups)]
    return Ingress.bind(settings, router.bind(settings, *groups))


APP_NAME = "raymoe"
"""The Serve application `run_serving` deploys."""


def run_serving(settings, *, address: str | None = None, until=None, log=print) -> str:
    """Serve `settings` (a ServeSettings, or a RunConfig whose serve: section is resolved and
    checked first, as `run_training(cfg)` takes one): bring up Ray (`address`, else $RAY_ADDRESS,
    else a local Ray), start Serve's HTTP proxy on serve.host:serve.port, deploy the application
    and wait for it to be healthy. Then call `until(url)` and stop the application when it
    returns; without `until`, serve until Ctrl-C. Returns the URL it served at."""
    import ray

    from raymoe.config import RunConfig

    if isinstance(settings, RunConfig):
        from raymoe.serve.settings import settings_from_config

        settings = settings_from_config(settings, log=log)
    s = settings.serve
    if not ray.is_initialized():
        ray.init(address=address) if address else ray.init()
    quiet = {"enable_access_log": False, "log_level": "WARNING"}  # no line per request and per expert call
    serve.start(http_options={"host": s.host, "port": s.port}, logging_config=quiet)
    t0 = time.perf_counter()
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/", logging_config=quiet)
    url = f"http://{s.host}:{s.port}"
    groups = f"{s.num_groups} expert groups over {s.data_path}" if settings.routed else "every expert in the router"
    log(f"serving {settings.model} ({s.mode}: {groups}) at {url}, ready in {time.perf_counter() - t0:.0f}s")
    if settings.api_key is None:
        log(f"  open to anyone who can reach {s.host}:{s.port}" + (f" (set ${s.api_key_env} to require an API key)" if s.api_key_env else ""))
    log(f"  curl {url}/v1/completions -H 'Content-Type: application/json' -d '{{\"prompt\": \"def \", \"max_tokens\": 32}}'")
    try:
        if until is not None:
            until(url)
        else:
            log("Ctrl-C stops it.")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print(file=sys.stderr)
    finally:
        serve.delete(APP_NAME)
    return url
