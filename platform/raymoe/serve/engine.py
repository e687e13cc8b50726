"""Batched generation with a KV cache and continuous batching. No Ray in here: deployments wrap it.

    engine = Engine(model, tokenizer, max_batch=16)
    req = engine.add_request("def ", SamplingParams(max_tokens=32, temperature=0.8, seed=1))
    while engine.has_work():
        for event in engine.step():        # (request, text delta, finished)
            ...

Each `step` first admits waiting requests into free cache rows (one prefill each: the prompt's
keys and values are written into that row), then runs ONE decode forward over every running
sequence at once, whatever their lengths: each row attends to its own cached positions. Finished
sequences leave at once and their row is reused by the next request, so requests join and leave
the running batch between decode steps (continuous batching).

The engine knows only token ids and text; `ThreadedEngine` runs `step` in a background thread and
hands each request's deltas to an asyncio queue, which is what the Serve router uses.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch

from raymoe.model.moe import MoE
from raymoe.model.transformer import KVCache, MoETransformer


class RequestError(ValueError):
    """A request the engine cannot serve as asked (too long, bad sampling values)."""


class EngineError(RuntimeError):
    """The engine failed while serving a request (a server-side error, not the request's fault)."""


class ReplicaLost(EngineError):
    """The replica generating a request died mid-way (serve/engine_link.py); a request whose
    client has seen nothing of it may be sent again."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 = no top-k filter."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """Generation ends before the first occurrence of any of these strings."""
    logprobs: int | None = None
    """Record each generated token's log-probability and this many most likely alternatives
    (0-20; None = none). Log-probabilities are of the model's distribution, before temperature
    and filtering, as OpenAI's API reports them."""
    prompt_logprobs: bool = False
    """Also score the prompt: each prompt token after the first, with `logprobs` alternatives."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.temperature < 0:
            raise RequestError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise RequestError(f"top_k={self.top_k} must be >= 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise RequestError(f"logprobs={self.logprobs} must be in [0, {MAX_LOGPROBS}]")


MAX_LOGPROBS = 20

TokenLogprob = tuple[float, list[tuple[int, float]]]
"""(log-probability of the token, [(alternative id, its log-probability), ...] most likely first)."""


@dataclass
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    """Text emitted so far (after stop-string handling)."""
    finish_reason: str | None = None
    slot: int | None = None
    error: str | None = None
    """Why the request failed (finish_reason 'error')."""
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per output id, when params.logprobs is set."""
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per prompt id after the first, when params.prompt_logprobs is set."""
    streamed_tokens: int = 0
    """How many of output_ids the deltas `ThreadedEngine.stream` has yielded so far cover (set in
    the consumer's event loop: the engine thread runs ahead, so output_ids may already hold tokens
    whose deltas are still queued)."""

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def sample_batch(logits_BV: torch.Tensor, params: list[SamplingParams], uniform_B: torch.Tensor) -> torch.Tensor:
    """The next token of every row, on the logits' device and without a host sync: greedy rows
    (temperature 0) by argmax; the others from their distribution after temperature, top-k (the
    k most likely) and top-p (the smallest most-likely prefix reaching that mass; the first token
    always stays), drawn by inverting its CDF at the row's uniform number in [0, 1)."""
    logits = logits_BV.float()
    greedy = logits.argmax(-1)
    if all(p.temperature == 0 for p in params):
        return greedy
    device, V = logits.device, logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], device=device)
    top_k = torch.tensor([p.top_k if p.top_k else V for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    sorted_BV, order_BV = (logits / temperature.clamp_min(1e-6)[:, None]).sort(dim=-1, descending=True)
    rank = torch.arange(V, device=device)
    probs = sorted_BV.masked_fill(rank[None, :] >= top_k[:, None], float("-inf")).softmax(-1)
    probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p[:, None], 0.0)
    cdf = probs.cumsum(-1)
    at = torch.searchsorted(cdf, (uniform_B.to(device) * cdf[:, -1])[:, None]).clamp_max(V - 1)
    return torch.where(temperature > 0, order_BV.gather(1, at)[:, 0], greedy)


def _logprobs(logits_NV: torch.Tensor, chosen: list[int], k: int) -> list[TokenLogprob]:
    """Per row: the log-probability of `chosen[row]` and the k most likely ids with theirs (one
    copy to the host for all rows)."""
    lp = logits_NV.float().log_softmax(-1)
    picked = lp.gather(1, torch.tensor(chosen, device=lp.device)[:, None])[:, 0].tolist()
    if k == 0:
        return [(p, []) for p in picked]
    top = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return [(p, list(zip(ids, vals))) for p, ids, vals in zip(picked, top.indices.tolist(), top.values.tolist())]


class Engine:
    """Continuous-batching generation over one model replica (single device)."""

    def __init__(self, model: MoETransformer, tokenizer, *, max_batch: int = 8, max_len: int | None = None, micro_batches: int = 1,
                 cuda_graphs: bool = False):
        """`cuda_graphs`: decode steps take static shapes (rows padded to a bucket, keys read up to
        a bucket) and, on a CUDA model, replay as CUDA graphs captured on first use (serve/graphs.py);
        on a CPU model they run eagerly, padded, which is slower. One decode thread only."""
        if cuda_graphs and micro_batches != 1:
            raise ValueError(f"cuda_graphs needs micro_batches=1, not {micro_batches} (one decode thread replays the graphs)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(getattr(tokenizer, "eos_ids", None) or {tokenizer.eos_id})
        """Generation stops at any of these (Qwen3's tokenizer has two)."""
        self.max_batch = max_batch
        self.max_len = max_len or model.cfg.max_seq_len
        self.device = model.embed.weight.device
        # CUDA graphs' padding rows write one more row, which no request is given.
        self.cache = KVCache(model, max_batch + (1 if cuda_graphs else 0), self.max_len)
        self.graphs = None
        """The static decode steps (serve/graphs.DecodeGraphs), when cuda_graphs."""
        if cuda_graphs:
            from raymoe.serve.graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, self.cache, max_batch)
        self.waiting: list[Request] = []
        self.running: dict[int, Request] = {}  # slot -> request
        self._ids = itertools.count()
        self.micro_batches = micro_batches
        """Split each decode step into this many micro-batches run in parallel threads: while one
        waits on remote experts (routed serving), another computes. 1 = no split."""
        self._pool = None
        self._load_lock = threading.Lock()
        self.stats = {"decode_steps": 0, "prefills": 0, "tokens": 0}
        # Summed on the model's device: copying it to the host every layer of every step would
        # synchronize with the GPU that often.
        self._load = torch.zeros(len(model.moe_layers()), max(model.cfg.num_experts, 1), dtype=torch.long, device=self.device)

    @property
    def load(self) -> torch.Tensor:
        """Tokens routed to each expert of each MoE layer since the engine started ([layers, experts],
        a CPU copy: on a CPU model, .cpu() would hand out the live counters)."""
        with self._load_lock:
            return self._load.to("cpu", copy=True)

    # -- requests
    def add_request(self, prompt: str | list[int], params: SamplingParams) -> Request:
        ids = [int(t) for t in self.tokenizer.encode(prompt)] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) >= self.max_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; this model takes at most {self.max_len - 1}")
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        req = Request(next(self._ids), ids, params, gen)
        self.waiting.append(req)
        return req

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, req: Request) -> None:
        if req in self.waiting:
            self.waiting.remove(req)
        if req.slot is not None and self.running.get(req.slot) is req:
            del self.running[req.slot]
        req.finish_reason = req.finish_reason or "abort"

    # -- the scheduler
    @torch.inference_mode()
    def step(self) -> list[tuple[Request, str, bool]]:
        """Admit what fits, then decode one token for every running sequence."""
        events: list[tuple[Request, str, bool]] = []
        # Sequences admitted in this step get their first token from the prefill, not a decode.
        active = [r for r in self.running.values() if r.finish_reason is None]
        free = [s for s in range(self.max_batch) if s not in self.running]
        admitted: dict[int, list[Request]] = {}
        while self.waiting and free:
            req = self.waiting.pop(0)
            req.slot = free.pop(0)
            self.running[req.slot] = req
            admitted.setdefault(len(req.prompt_ids), []).append(req)
        # One prefill forward per prompt length among the admitted requests, not one per request:
        # in routed mode every forward costs a round of expert-group calls per MoE layer.
        for reqs in admitted.values():
            scored = [i for i, r in enumerate(reqs) if r.params.prompt_logprobs]
            logits = self._forward([r.slot for r in reqs], [r.prompt_ids for r in reqs], start=[0] * len(reqs),
                                   **({"all_positions": True} if scored else {}))
            self.stats["prefills"] += 1
            if scored:
                for i in scored:  # position j's logits predict prompt token j + 1
                    reqs[i].prompt_logprobs = _logprobs(logits[i, :-1], reqs[i].prompt_ids[1:], reqs[i].params.logprobs or 0)
                logits = logits[:, -1]
            for r, (tok, lp) in zip(reqs, self._sample(reqs, logits)):
                events.append(self._accept(r, tok, lp))
        if active:
            logits = self._decode(active)
            self.stats["decode_steps"] += 1
            for r, (tok, lp) in zip(active, self._sample(active, logits)):
                events.append(self._accept(r, tok, lp))
        for r, _, done in events:
            if done and self.running.get(r.slot) is r:
                del self.running[r.slot]
        return events

    def _decode(self, active: list[Request]) -> torch.Tensor:
        """One new token for every active row, in `micro_batches` concurrent slices."""
        def run(rows: list[Request]) -> torch.Tensor:
            with torch.inference_mode():  # grad mode is per thread: the pool's threads need it too
                return self._forward([r.slot for r in rows], [[r.output_ids[-1]] for r in rows], start=[r.length - 1 for r in rows])

        if self.graphs is not None:
            logits, loads = self.graphs.step([r.slot for r in active], [r.output_ids[-1] for r in active],
                                             [r.length - 1 for r in active])
            self._count(loads)
            return logits
        k = min(self.micro_batches, len(active))
        if k <= 1:
            return run(active)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.micro_batches, thread_name_prefix="raymoe-microbatch")
        size = -(-len(active) // k)
        # Each slice writes only its own cache rows, so the slices never touch the same memory.
        parts = [active[i : i + size] for i in range(0, len(active), size)]
        return torch.cat(list(self._pool.map(run, parts)))

    def _forward(self, slots: list[int], tokens: list[list[int]], start: list[int], all_positions: bool = False) -> torch.Tensor:
        """Logits of the last position of each row ([B, V]), or of every position ([B, S, V]).
        Rows here all have the same number of new tokens."""
        S = len(tokens[0])
        x = torch.tensor(tokens, device=self.device)
        positions = torch.tensor(start, device=self.device)[:, None] + torch.arange(S, device=self.device)
        # num_keys from the host's own numbers: read off `positions` it would be a device op and a read back.
        out = self.model(x, self.cache, torch.tensor(slots, device=self.device), positions, num_keys=max(start) + S)
        self._count(torch.stack([st.tokens_per_expert for st in out.moe_stats]) if out.moe_stats else None)
        return out.logits if all_positions else out.logits[:, -1]

    def _count(self, loads_LE: torch.Tensor | None) -> None:
        """Add one forward's tokens per expert of every MoE layer to the engine's expert load."""
        if loads_LE is not None:
            with self._load_lock:
                self._load += loads_LE.to(self._load.device)

    def _sample(self, reqs: list[Request], logits_BV: torch.Tensor) -> list[tuple[int, TokenLogprob | None]]:
        """The next token of every row in one pass over the batch and one copy to the host (not a
        host sync per row). A sampled row draws its uniform number from its own request's
        generator, so a seeded request repeats whatever else is in the batch. With each token its
        log-probability entry, for the rows that asked for one."""
        uniform = torch.tensor([float(torch.rand((), generator=r.generator)) if r.params.temperature > 0 else 0.0
                                for r in reqs])
        tokens = sample_batch(logits_BV, [r.params for r in reqs], uniform).tolist()
        entries: list[TokenLogprob | None] = [None] * len(reqs)
        scored = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        if scored:
            k = max(reqs[i].params.logprobs for i in scored)
            rows = logits_BV[torch.tensor(scored, device=logits_BV.device)]
            for i, entry in zip(scored, _logprobs(rows, [tokens[i] for i in scored], k)):
                entries[i] = (entry[0], entry[1][: reqs[i].params.logprobs])
        return list(zip(tokens, entries))

    def _accept(self, req: Request, tok: int, logprob: TokenLogprob | None = None) -> tuple[Request, str, bool]:
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        self.stats["tokens"] += 1
        if tok in self.eos_ids:
            req.finish_reason = "stop"
            return req, "", True
        req.output_ids.append(tok)
        if logprob is not None:
            req.logprobs.append(logprob)
        full = self.tokenizer.decode(req.output_ids)
        # Hold back a trailing partial UTF-8 character (decoded as U+FFFD) until it completes.
        visible = full.rstrip("\ufffd") if len(req.output_ids) < req.params.max_tokens else full
        for stop in req.params.stop:
            cut = visible.find(stop)
            if cut >= 0:
                delta = visible[len(req.text):cut] if cut > len(req.text) else ""
                req.text += delta
                req.finish_reason = "stop"
                return req, delta, True
        # A stop string may be forming at the end: emit only what cannot be its beginning.
        hold = max((len(s) - 1 for s in req.params.stop), default=0)
        safe = visible[: max(len(req.text), len(visible) - hold)] if hold else visible
        delta = safe[len(req.text):]
        req.text += delta
        done = len(req.output_ids) >= req.params.max_tokens or req.length >= self.max_len
        if done:
            req.finish_reason = "length"
            tail = visible[len(req.text):]
            req.text += tail
            delta += tail
        return req, delta, done

    def warm_up(self, log=lambda line: None) -> None:
        """Run the decode steps a compiled model (MoETransformer.compile_decode) would otherwise
        compile on its first requests: one row, two rows, and the largest batches each branch of
        the experts sees (dynamo specializes sizes 1 and 2; MoE.routed switches paths above
        dense_max_tokens rows). Then forget them: stats and the expert load the routers report
        start from zero."""
        sizes = sorted({n for n in (1, 2, MoE.dense_max_tokens, self.max_batch) if n <= self.max_batch})
        for n in sizes:
            t0 = time.perf_counter()
            reqs = [self.add_request([i % 2, 1], SamplingParams(max_tokens=3, temperature=0)) for i in range(n)]
            while any(r.finish_reason is None for r in reqs):
                self.step()
            log(f"warm-up: decode steps of {n} row(s) ready in {time.perf_counter() - t0:.1f}s")
        self.stats = {key: 0 for key in self.stats}
        with self._load_lock:
            self._load.zero_()

    # -- convenience (tests, CLI)
    def generate(self, prompt: str | list[int], params: SamplingParams) -> Completion:
        req = self.add_request(prompt, params)
        while req.finish_reason is None:
            self.step()
        return Completion(req.text, req.finish_reason, len(req.prompt_ids), len(req.output_ids))



class ThreadedEngine:
    """Runs `Engine.step` in a background thread; requests are awaited or streamed from asyncio.

    The event loop never waits on the engine: it only posts to an inbox (a plain queue) that the
    engine thread drains between steps. Remote expert calls made during a step may need that very
    event loop (Serve's throughput-optimized mode), so blocking it on a step would deadlock.
    """

    def __init__(self, engine: Engine, on_finish: "Callable[[Request], None] | None" = None):
        """`on_finish(request)` runs in the engine thread as each request ends, aborted ones too
        (serving metrics); an exception in it is logged, never raised into serving."""
        self.engine = engine
        self.on_finish = on_finish
        self._inbox: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        self._wake = threading.Event()
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="raymoe-engine", daemon=True)
        self._thread.start()

    def _finished(self, req: Request) -> None:
        if self.on_finish is not None:
            try:
                self.on_finish(req)
            except Exception:  # noqa: BLE001
                logging.getLogger("raymoe.serve").exception("on_finish failed for request %d", req.id)

    def _deliver(self, req: Request, delta: str, done: bool) -> None:
        loop, q = self._queues.get(req.id, (None, None))
        if q is None:
            return
        try:
            loop.call_soon_threadsafe(q.put_nowait, (delta, done, len(req.output_ids)))
        except RuntimeError:  # the consumer's event loop is closed: nobody reads this request
            self._queues.pop(req.id, None)
            if not done and req.finish_reason is None:
                self.engine.abort(req)
                self._finished(req)

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, prompt, params, loop, q, box = msg
                try:
                    req = self.engine.add_request(prompt, params)
                except RequestError as e:
                    loop.call_soon_threadsafe(q.put_nowait, e)
                    continue
                box.append(req)
                self._queues[req.id] = (loop, q)
                loop.call_soon_threadsafe(q.put_nowait, req)
            elif msg[0] == "abort":
                req = msg[1]
                self._queues.pop(req.id, None)
                if req.finish_reason is None:  # the client went away: free its cache row
                    self.engine.abort(req)
                    self._finished(req)

    def _run(self) -> None:
        while True:
            self._drain_inbox()
            if not self.engine.has_work():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - the loop must outlive any one bad step
                # Fail what was in flight (its cache rows may be half written), keep serving.
                failed = list(self.engine.running.values()) + list(self.engine.waiting)
                logging.getLogger("raymoe.serve").exception("engine step failed; failing %d request(s)", len(failed))
                self.engine.running.clear()
                self.engine.waiting.clear()
                events = []
                for req in failed:
                    req.finish_reason = "error"
                    req.error = f"{type(e).__name__}: {e}"
                    events.append((req, "", True))
            for req, delta, done in events:
                self._deliver(req, delta, done)
                if done:
                    self._queues.pop(req.id, None)
                    self._finished(req)

    async def stream(self, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[tuple[str, bool, Request]]:
        """Yields (text delta, finished, request) until finished; the last delta may be ''.

        Read the request's finish_reason only once `finished`: the engine thread runs ahead of
        the consumer, so the live object may already be finished while earlier deltas queue. For
        the same reason read output tokens only up to `request.streamed_tokens`."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        box: list[Request] = []
        self._inbox.put(("add", prompt, params, loop, q, box))
        self._wake.set()
        first = await q.get()
        if isinstance(first, RequestError):
            raise first
        req = first
        try:
            while True:
                delta, done, num_tokens = await q.get()
                if done and req.error:
                    raise EngineError(req.error)
                req.streamed_tokens = num_tokens
                yield delta, done, req
                if done:
                    return
        finally:
            if req.finish_reason is None:
                self._inbox.put(("abort", req))
                self._wake.set()

    async def generate_all(self, prompt: str | list[int], params: SamplingParams) -> tuple[str, Request]:
        """(the whole completion's text, the finished request), as engine_link.RemoteEngine gives it."""
        text, req = [], None
        async for delta, _, req in self.stream(prompt, params):
            text.append(delta)
        return "".join(text), req

    async def complete(self, prompt: str | list[int], params: SamplingParams) -> Completion:
        text, req = await self.generate_all(prompt, params)
        return Completion(text, req.finish_reason, len(req.prompt_ids), len(req.output_ids))


def load_model(source: str, *, tracking_uri: str | None = None, device: str = "cpu"):
    """(RunConfig, MoETransformer in eval mode) from any of model_dir.MODEL_SOURCES."""
    from raymoe.model_dir import ModelSourceError, open_model

    try:
        cfg, model, _, _ = open_model(source, tracking_uri=tracking_uri, device=device)
    except ModelSourceError as e:
        raise RequestError(str(e)) from None
    return cfg, model
