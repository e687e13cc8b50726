"""The generate call between the Ingress (HTTP, serve/api.py) and a Router replica (the engine),
both sides of it, so that a Router can die without taking its clients' requests with it.

    async for event in engine_events(threaded_engine, prompt_ids, params):   # in the Router
        yield event
    backend = RemoteEngine(router_handle)                                      # in the Ingress
    async for delta, done, request in backend.stream(prompt_ids, params): ...  # what api.py reads

Events are plain dicts (the text delta, the output tokens and log-probabilities it covers, the
finish reason), so nothing of the engine crosses the process boundary. `RemoteEngine` mirrors
them into a `RemoteRequest` with the fields api.py reads from an engine request.

When the Router replica serving a call dies (Serve's handle raises an actor error), a call that
has not yet produced anything is sent again: Serve routes it to another replica, and once the
dead one is noticed, only to live ones. So is a non-streamed request (`generate_all`: one event at
the end, its client has seen nothing). A stream that had already sent tokens ends with
`ReplicaLost`, which api.py turns into an error event.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from raymoe.serve.engine import ReplicaLost, SamplingParams, TokenLogprob

RETRY_FOR_S = 30.0
"""How long a call that has produced nothing keeps being sent again while Router replicas die or restart."""


def _merge(into: dict | None, event: dict) -> dict:
    if into is None:
        return event
    into["delta"] += event["delta"]
    into["ids"] = into["ids"] + event["ids"]
    into["logprobs"] = into["logprobs"] + event["logprobs"]
    into["done"] = event["done"]
    if "finish" in event:
        into["finish"] = event["finish"]
    return into


async def engine_events(threaded, prompt_ids: list[int], params: SamplingParams, interval_s: float = 0.0,
                        whole: bool = False) -> AsyncIterator[dict]:
    """A ThreadedEngine stream as picklable events: {"delta", "done", "ids", "logprobs"} and, on
    the first, {"prompt_logprobs"}; "finish" on the last. The first event goes out at once (time
    to first token); later ones are merged until `interval_s` has passed since the last one sent,
    since every event is one item of a Serve streaming call and costs the Ingress CPU time. With
    `whole`, one event for the whole completion. Closing this generator (the Ingress's client went
    away) aborts the engine request, as closing the engine stream does."""
    loop = asyncio.get_running_loop()
    sent, first, held, last = 0, True, None, 0.0
    stream = threaded.stream(prompt_ids, params)
    try:
        async for delta, done, req in stream:
            upto = req.streamed_tokens
            event = {"delta": delta, "done": done, "ids": req.output_ids[sent:upto], "logprobs": req.logprobs[sent:upto]}
            sent = upto
            if first:
                event["prompt_logprobs"] = req.prompt_logprobs
            if done:
                event["finish"] = req.finish_reason
            held = _merge(held, event)
            now = loop.time()
            if done or (not whole and (first or now - last >= interval_s)):
                yield held
                held, last, first = None, now, False
    finally:
        await stream.aclose()


@dataclass
class RemoteRequest:
    """The fields of engine.Request that api.py reads, rebuilt from a Router's events."""

    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    streamed_tokens: int = 0

    def apply(self, event: dict) -> None:
        self.output_ids += event["ids"]
        self.logprobs += event["logprobs"]
        self.streamed_tokens = len(self.output_ids)
        if "prompt_logprobs" in event:
            self.prompt_logprobs = event["prompt_logprobs"]
        if event["done"]:
            self.finish_reason = event.get("finish")


def _is_replica_loss(e: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(e, (ActorDiedError, ActorUnavailableError, RayActorError))


class RemoteEngine:
    """api.py's backend over a Router deployment handle (its `generate` streaming method)."""

    def __init__(self, handle, retry_for_s: float = RETRY_FOR_S):
        self.handle = handle.options(stream=True)
        self.retry_for_s = retry_for_s
        self.resent = 0
        """Calls sent again because the Router replica serving them died before producing anything."""
        self.lost = 0
        """Calls whose Router replica died after they had produced tokens (ReplicaLost)."""

    async def generate_all(self, prompt_ids: list[int], params: SamplingParams) -> tuple[str, RemoteRequest]:
        """A non-streamed request: one event from the Router for the whole completion (its client
        sees nothing before the end, so a replica lost mid-way costs a fresh attempt, not an error)."""
        text = []
        async for delta, _, req in self.stream(prompt_ids, params, whole=True):
            text.append(delta)
        return "".join(text), req

    async def stream(self, prompt_ids: list[int], params: SamplingParams, whole: bool = False):
        deadline, pause = time.monotonic() + self.retry_for_s, 0.1
        while True:
            req, started = RemoteRequest(prompt_ids=list(prompt_ids)), False
            response = self.handle.generate.remote(list(prompt_ids), params, whole)
            try:
                async for event in response:
                    req.apply(event)
                    started = True
                    yield event["delta"], event["done"], req
                return
            except Exception as e:
                if not _is_replica_loss(e):
                    raise
                if started:
                    self.lost += 1
                    raise ReplicaLost(f"the Router replica generating this request died after {len(req.output_ids)} "
                                      "tokens; send it again") from None
                if time.monotonic() > deadline:
                    raise ReplicaLost(f"no Router replica answered for {self.retry_for_s:.0f} s") from None
                self.resent += 1
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
            finally:
                response.cancel()  # a no-op once it finished; ends the Router's engine request otherwise
