"""The OpenAI-compatible API over a real engine (tiny random model), without Ray."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch
from starlette.requests import ClientDisconnect
from starlette.testclient import TestClient

from raymoe.config import config_from_dict
from raymoe.model.transformer import MoETransformer
from raymoe.serve.api import APILimits, CompletionsAPI, build_asgi_app
from raymoe.serve.engine import Engine, SamplingParams, ThreadedEngine
from raymoe.train.data import ByteTokenizer


ROOT = Path(__file__).resolve().parents[2]

def make_api(api_key=None, *, max_seq_len=64, max_tokens=24, on_finish=None):
    """The API over a tiny random model's ThreadedEngine, and that engine."""
    cfg = config_from_dict({"model": {"hidden_size": 32, "num_layers": 2, "max_seq_len": max_seq_len}, "train": {"seq_len": 32}}).model
    model = MoETransformer(cfg)
    model.init_weights(0)
    engine = Engine(model, ByteTokenizer(), max_batch=4)
    api = CompletionsAPI(ThreadedEngine(engine, on_finish=on_finish), ByteTokenizer(), model_name="tiny",
                         limits=APILimits(max_prompt_tokens=32, max_tokens=max_tokens), api_key=api_key,
                         expert_load=lambda: {"layers": engine.load.tolist()})
    return api, engine


def make_client(api_key=None):
    api, engine = make_api(api_key)
    return TestClient(build_asgi_app(api)), engine


def stream_events(client, path, body):
    """The JSON events of a streamed request, checking that [DONE] ends them."""
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.fixture(scope="module")
def client():
    c, _ = make_client()
    return c


def test_completion_has_openai_shape_and_usage(client):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "def ", "max_tokens": 7, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11}


def test_seeded_requests_repeat_and_streaming_gives_the_same_text(client):
    req = {"prompt": "class ", "max_tokens": 12, "temperature": 0.8, "seed": 5}
    a = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    b = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    assert a == b
    with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == a
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 12
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"\xff\xfe{}", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"prompt": ""}).encode(), 400, "prompt"),
    (json.dumps({"prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "x" * 33}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "x", "max_tokens": 25}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "max_tokens": "5"}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "temperature": 3}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "x", "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({"prompt": "x", "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"prompt": "x", "stop": [1]}).encode(), 400, "stop"),
    (json.dumps({"prompt": "x", "n": 2}).encode(), 400, "n"),
    (json.dumps({"prompt": "x", "model": "gpt-4"}).encode(), 404, "model"),
])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(client, body, status, param):
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param
    ok = client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2})
    assert ok.status_code == 200


def test_models_health_and_expert_load(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3})
    load = client.get("/v1/expert_load").json()["layers"]
    assert len(load) == 2 and sum(load[0]) > 0  # 2 MoE layers, tokens counted
    assert client.get("/nope").status_code == 404


def test_api_key_is_required_when_configured():
    c, _ = make_client(api_key="s3cret")
    assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).json()["error"]["code"] == "invalid_api_key"
    ok = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert c.get("/healthz").status_code == 200  # health checks need no key
    # The scheme in any case (RFC 7235); anything but the exact key, or another scheme, is refused.
    for header in ("bearer s3cret", "BEARER s3cret"):
        assert c.get("/v1/models", headers={"Authorization": header}).status_code == 200, header
    for header in ("Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret", "Bearer"):
        assert c.get("/v1/models", headers={"Authorization": header}).status_code == 401, header


def test_concurrent_requests_share_decode_steps():
    import concurrent.futures as cf

    c, engine = make_client()
    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: c.post("/v1/completions", json={"prompt": f"p{i}", "max_tokens": 20, "seed": i}).json(), range(4)))
    assert all(r["usage"]["completion_tokens"] == 20 for r in results)
    # Four 20-token requests alone would take 4 x 19 decode steps; batched, far fewer.
    assert engine.stats["decode_steps"] < 4 * 19


def test_echo_and_logprobs_score_a_continuation_the_way_lm_evaluation_harness_asks():
    """lm-eval's local-completions sends token ids, max_tokens 1, logprobs 1, echo true, and sums
    token_logprobs[ctxlen:-1]: that sum must be the model's log-likelihood of the continuation."""
    c, engine = make_client()
    tok = ByteTokenizer()
    context, continuation = [int(t) for t in tok.encode("def f")], [int(t) for t in tok.encode_text("(x):")]
    ids = context + continuation
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": [ids, ids[:-1]], "max_tokens": 1, "logprobs": 1,
                                        "echo": True, "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    first, second = sorted(r.json()["choices"], key=lambda ch: ch["index"])
    lp = first["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert first["text"].startswith(tok.decode(ids)) and len(second["logprobs"]["tokens"]) == len(ids)
    with torch.no_grad():
        ref = engine.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    want = sum(ref[j - 1, ids[j]].item() for j in range(len(context), len(ids)))
    assert sum(lp["token_logprobs"][len(context):-1]) == pytest.approx(want, abs=1e-3)
    greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][len(context):-1], lp["top_logprobs"][len(context):-1]))
    assert greedy == all(ref[j - 1].argmax().item() == ids[j] for j in range(len(context), len(ids)))
    assert r.json()["usage"]["prompt_tokens"] == 2 * len(ids) - 1


def test_logprobs_requests_that_cannot_be_served_get_a_400_naming_the_field():
    c, _ = make_client()
    cases = [({"prompt": ["x", "y"], "stream": True}, "stream"), ({"prompt": "x", "logprobs": 99}, "logprobs"),
             ({"prompt": [1, 2, 999999]}, "prompt"), ({"prompt": [[1, 2], "ab", []]}, "prompt"), ({"prompt": []}, "prompt"),
             ({"prompt": "x", "echo": "yes"}, "echo")]
    for body, param in cases:
        r = c.post("/v1/completions", json={"max_tokens": 1, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def _chat_client(template=True):
    from raymoe.train.sft import ChatTemplate

    cfg = config_from_dict({"model": {"hidden_size": 32, "num_layers": 2, "max_seq_len": 128}, "train": {"seq_len": 32}}).model
    model = MoETransformer(cfg)
    model.init_weights(0)
    tok = ByteTokenizer()
    engine = Engine(model, tok, max_batch=4)
    text = (ROOT / "jobs" / "data" / "chat_template.jinja").read_text()
    chat = ChatTemplate(text, "shipped", tok.special_tokens) if template else None
    api = CompletionsAPI(ThreadedEngine(engine), tok, model_name="tiny", limits=APILimits(max_prompt_tokens=100, max_tokens=24),
                         chat_template=chat)
    return TestClient(build_asgi_app(api)), engine, chat


def test_chat_completions_render_the_template_and_answer_in_openais_shapes():
    c, engine, chat = _chat_client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."}]
    r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0,
                                             "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt = [int(t) for t in ByteTokenizer().encode_text(chat.render(messages, add_generation_prompt=True))]
    direct = engine.generate(prompt, SamplingParams(max_tokens=6, temperature=0))
    (choice,) = body["choices"]
    assert body["object"] == "chat.completion" and choice["message"] == {"role": "assistant", "content": direct.text}
    assert body["usage"]["prompt_tokens"] == len(prompt) and body["usage"]["completion_tokens"] == direct.completion_tokens
    content = choice["logprobs"]["content"]
    assert len(content) == direct.completion_tokens and all(len(e["top_logprobs"]) == 2 for e in content)
    assert all(e["logprob"] == pytest.approx(e["top_logprobs"][0]["logprob"]) for e in content)  # greedy
    with c.stream("POST", "/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == direct.text
    assert events[-2]["choices"][0]["finish_reason"] == direct.finish_reason and events[-1]["usage"] == body["usage"]
    assert all(e["object"] == "chat.completion.chunk" for e in events)


def test_chat_requests_that_cannot_be_served_get_a_400_naming_the_field():
    c, _, _ = _chat_client()
    for body, param in [({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
                        ({"messages": [{"role": "user", "content": 3}]}, "messages"),
                        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
                        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs")]:
        r = c.post("/v1/chat/completions", json={"max_tokens": 2, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    bare, _, _ = _chat_client(template=False)
    r = bare.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"


def test_the_router_serves_chat_with_the_template_its_fine_tuning_used():
    import yaml

    from raymoe.serve.deployments import chat_template_of

    from raymoe.config import DataConfig

    # The shipped config's data section, as the merged model's config carries it.
    raw = yaml.safe_load((ROOT / "jobs" / "configs" / "finetune-demo.yaml").read_text())
    cfg = SimpleNamespace(name="raymoe-demo-chat", data=DataConfig(**raw["data"]))
    template = chat_template_of(cfg, ByteTokenizer())
    assert template is not None and template.text == (ROOT / "jobs" / "data" / "chat_template.jinja").read_text()


def test_a_prompt_with_a_lone_surrogate_gets_a_400_not_a_500(client):
    """JSON may spell "\\ud800"; no UTF-8 string holds it, so no tokenizer could encode it."""
    for path, body in [("/v1/completions", rb'{"prompt": "ab\ud800", "max_tokens": 2}'),
                       ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "\udfff"}]}')]:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["message"].startswith("request body: Invalid JSON")
    assert client.post("/v1/completions", json={"prompt": "ab\U0001F600", "max_tokens": 2}).status_code == 200  # a real pair


def test_a_deeply_nested_body_gets_a_400_not_a_500(client):
    for body in (b"[" * 100_000, b'{"prompt": ' + b"[" * 100_000):
        r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] is None, r.text
    assert client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200


def test_a_body_over_the_limit_gets_a_413_whether_or_not_it_declares_its_length(client):
    big = json.dumps({"prompt": "x" * (1 << 20)}).encode()
    for content in (big, iter([big[: 1 << 19], big[1 << 19 :]])):  # Content-Length, then chunked
        r = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["message"], r.text


def test_unknown_routes_and_methods_get_openai_errors(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error" and "POST" in r.headers["allow"]


def test_the_app_serves_behind_a_route_prefix():
    """Serve passes its route prefix as ASGI root_path, the path keeping the prefix."""
    api, _ = make_api()
    c = TestClient(build_asgi_app(api), root_path="/tiny")
    assert [m["id"] for m in c.get("/tiny/v1/models").json()["data"]] == ["tiny"]
    assert c.post("/tiny/v1/completions", json={"prompt": "ab", "max_tokens": 2}).json()["usage"]["completion_tokens"] == 2
    assert c.get("/tiny/healthz").json() == {"status": "ok"}
    assert c.get("/tiny/nope").json()["error"]["code"] == "not_found"


def test_each_streamed_delta_says_how_many_output_tokens_it_covers_while_the_engine_runs_ahead():
    """What streamed logprobs rely on: the engine thread is tokens ahead of a slow reader, and
    request.streamed_tokens still counts only the tokens of the deltas read so far."""
    api, _ = make_api()

    async def read_slowly():
        seen, req = [], None
        async for _, _, req in api.backend.stream("abc", SamplingParams(max_tokens=20, temperature=0)):
            seen.append((req.streamed_tokens, len(req.output_ids)))
            await asyncio.sleep(0.02)
        return seen, req

    seen, req = asyncio.run(read_slowly())
    covered = [c for c, _ in seen]
    assert covered[:-1] == list(range(1, len(seen))) and covered[-1] == len(req.output_ids)  # one token per delta (the last may be EOS)
    assert any(n > c for c, n in seen)  # the engine had run ahead


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_completion_logprobs_equal_the_unstreamed_ones(echo):
    c, _ = make_client()
    req = {"prompt": "def f(x):", "max_tokens": 20, "temperature": 0, "logprobs": 2, "echo": echo}
    whole = c.post("/v1/completions", json=req).json()
    events = stream_events(c, "/v1/completions", {**req, "stream_options": {"include_usage": True}})
    choices = [e["choices"][0] for e in events if e["choices"]]
    want = whole["choices"][0]["logprobs"]
    got = {k: [v for ch in choices for v in ch["logprobs"][k]] for k in want}
    assert got == want
    assert len(want["tokens"]) == whole["usage"]["completion_tokens"] + (whole["usage"]["prompt_tokens"] if echo else 0)
    assert "".join(ch["text"] for ch in choices) == whole["choices"][0]["text"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]  # stream_options.include_usage


def test_streamed_chat_logprobs_equal_the_unstreamed_ones():
    c, _, _ = _chat_client()
    req = {"messages": [{"role": "user", "content": "Add 2 and 3."}], "max_tokens": 12, "temperature": 0, "logprobs": True,
           "top_logprobs": 2}
    whole = c.post("/v1/chat/completions", json=req).json()
    events = stream_events(c, "/v1/chat/completions", req)
    streamed = [entry for e in events if e["choices"][0]["logprobs"] for entry in e["choices"][0]["logprobs"]["content"]]
    assert streamed == whole["choices"][0]["logprobs"]["content"]
    assert len(streamed) == whole["usage"]["completion_tokens"]


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_a_client_that_disconnects_mid_stream_frees_its_batch_row_at_once(spec_version):
    """Drives the ASGI app by hand: the client reads two chunks and goes away, which an ASGI 2.3
    server reports as http.disconnect and a 2.4 one by failing the next send."""
    finished = []
    api, engine = make_api(max_seq_len=1024, max_tokens=1000, on_finish=finished.append)
    app = build_asgi_app(api)
    body = json.dumps({"prompt": "abc", "max_tokens": 1000, "temperature": 0, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "root_path": "",
             "query_string": b"", "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("client", 1), "server": ("server", 80)}

    async def run():
        chunks, gone = [], asyncio.Event()
        requests = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if requests:
                return requests.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if gone.is_set() and spec_version == "2.4":
                raise OSError("the client went away")
            if message["type"] == "http.response.body" and message.get("body"):
                chunks.append(message["body"])
                if len(chunks) == 2:
                    gone.set()

        try:
            await asyncio.wait_for(app(scope, receive, send), 10)
        except ClientDisconnect:  # 2.4: starlette's word for the failed send, raised back to the server
            assert spec_version == "2.4"
        # Wait in this event loop, still running: once closed it would abort the request by another path.
        deadline = time.monotonic() + 2
        while (engine.running or not finished) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return chunks

    gc.disable()  # the request must end when the client goes, not when the garbage collector finds it
    try:
        chunks = asyncio.run(run())
    finally:
        gc.enable()
    assert chunks[0].startswith(b"data: {")
    assert not engine.running
    (req,) = finished
    assert req.finish_reason == "abort" and len(req.output_ids) < 1000
