"""The OpenAI-compatible API over a real engine (tiny random model), without Ray."""

from __future__ import annotations

import json
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch
from starlette.testclient import TestClient

from raymoe.config import config_from_dict
from raymoe.model.transformer import MoETransformer
from raymoe.serve.api import APILimits, CompletionsAPI, build_asgi_app
from raymoe.serve.engine import Engine, SamplingParams, ThreadedEngine
from raymoe.train.data import ByteTokenizer


ROOT = Path(__file__).resolve().parents[2]

def make_client(api_key=None):
    cfg = config_from_dict({"model": {"hidden_size": 32, "num_layers": 2, "max_seq_len": 64}, "train": {"seq_len": 32}}).model
    model = MoETransformer(cfg)
    model.init_weights(0)
    engine = Engine(model, ByteTokenizer(), max_batch=4)
    api = CompletionsAPI(ThreadedEngine(engine), ByteTokenizer(), model_name="tiny", limits=APILimits(max_prompt_tokens=32, max_tokens=24),
                         api_key=api_key, expert_load=lambda: {"layers": engine.load.tolist()})
    return TestClient(build_asgi_app(api)), engine


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
    cases = [({"prompt": "x", "logprobs": 1, "stream": True}, "stream"), ({"prompt": "x", "logprobs": 99}, "logprobs"),
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
                        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "stream": True}, "logprobs")]:
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
