"""serve/engine_link.py without Ray Serve: the Router's events rebuilt on the Ingress side give the
API exactly what a local engine gives, and a call whose replica died before producing anything is
sent again while one that had produced tokens ends with ReplicaLost."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

import pytest
from ray.exceptions import ActorDiedError

from raymoe.config import config_from_dict
from raymoe.model.transformer import MoETransformer
from raymoe.serve.engine import Engine, ReplicaLost, SamplingParams, ThreadedEngine
from raymoe.serve.engine_link import RemoteEngine, engine_events
from raymoe.train.data import ByteTokenizer


class _Response:
    """What a streaming Serve handle call returns, over a local async generator."""

    def __init__(self, events):
        self.events, self.cancelled = events, False

    def __aiter__(self):
        return self.events.__aiter__()

    def cancel(self):
        self.cancelled = True


class _Handle:
    """A Serve handle's shape: handle.options(stream=True).generate.remote(...); `fail` decides,
    per call, after how many events the replica dies (None: it does not)."""

    def __init__(self, threaded, fail=(), interval_s=0.0):
        self.threaded, self.fail, self.calls, self.interval_s = threaded, list(fail), 0, interval_s
        self.generate = self
        self.items = 0

    def options(self, stream: bool):
        return self

    def remote(self, prompt_ids, params, whole=False):
        die_after = self.fail[self.calls] if self.calls < len(self.fail) else None
        self.calls += 1
        handle = self

        async def events():
            n = 0
            events = engine_events(self.threaded, prompt_ids, params, self.interval_s, whole)
            async with aclosing(events) as stream:  # a dead replica's engine stops
                async for event in stream:
                    if die_after is not None and n == die_after:
                        raise ActorDiedError()
                    handle.items += 1
                    yield event
                    n += 1
            if die_after is not None and die_after >= n:
                raise ActorDiedError()

        return _Response(events())


@pytest.fixture(scope="module")
def threaded():
    cfg = config_from_dict({"model": {"hidden_size": 32, "num_layers": 2, "max_seq_len": 64}, "train": {"seq_len": 32}}).model
    model = MoETransformer(cfg)
    model.init_weights(0)
    return ThreadedEngine(Engine(model, ByteTokenizer(), max_batch=4))


async def _collect(backend, ids, params):
    text, req = [], None
    async for delta, done, req in backend.stream(ids, params):
        text.append(delta)
    return "".join(text), req


def test_events_rebuild_the_request_the_api_reads(threaded):
    ids = [int(t) for t in ByteTokenizer().encode("def f")]
    params = SamplingParams(max_tokens=9, temperature=0, logprobs=2, prompt_logprobs=True)
    local_text, local = asyncio.run(_collect(threaded, ids, params))
    text, remote = asyncio.run(_collect(RemoteEngine(_Handle(threaded)), ids, params))
    assert text == local_text and remote.finish_reason == local.finish_reason
    assert remote.output_ids == local.output_ids and remote.streamed_tokens == len(local.output_ids)
    assert remote.logprobs == local.logprobs and remote.prompt_logprobs == local.prompt_logprobs


def test_a_call_lost_before_its_first_event_is_sent_again_and_one_lost_after_is_not(threaded):
    ids, params = [int(t) for t in ByteTokenizer().encode("x")], SamplingParams(max_tokens=6, temperature=0)
    want, _ = asyncio.run(_collect(threaded, ids, params))
    backend = RemoteEngine(_Handle(threaded, fail=[0, 0]))  # two replicas die before answering
    text, _ = asyncio.run(_collect(backend, ids, params))
    assert text == want and backend.resent == 2
    cut = RemoteEngine(_Handle(threaded, fail=[2]))  # dies after two events reached the client
    with pytest.raises(ReplicaLost, match="died after"):
        asyncio.run(_collect(cut, ids, params))
    assert (cut.resent, cut.lost) == (0, 1)
    deadline = time.monotonic() + 2
    while threaded.engine.running and time.monotonic() < deadline:  # the engine thread takes the abort between steps
        time.sleep(0.01)
    assert not threaded.engine.running


def test_merged_events_and_one_shot_completions_carry_the_same_request(threaded):
    """The Router merges a stream's events after the first (fewer Serve items, less Ingress CPU)
    and sends a non-streamed request as one event: what the API reads is unchanged, and a
    one-shot request whose replica dies mid-way is simply generated again."""
    ids = [int(t) for t in ByteTokenizer().encode("class ")]
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=1)
    want_text, want = asyncio.run(_collect(threaded, ids, params))
    merged = _Handle(threaded, interval_s=60.0)
    text, got = asyncio.run(_collect(RemoteEngine(merged), ids, params))
    assert merged.items == 2  # the first token at once, the rest in one message at the end
    assert (text, got.output_ids, got.logprobs) == (want_text, want.output_ids, want.logprobs)
    once = _Handle(threaded, fail=[0])  # the first replica dies before its one event
    backend = RemoteEngine(once)
    text, got = asyncio.run(backend.generate_all(ids, params))
    assert once.items == 1 and backend.resent == 1
    assert (text, got.output_ids, got.finish_reason) == (want_text, want.output_ids, want.finish_reason)
