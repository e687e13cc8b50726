"""OpenAI-compatible HTTP API over a generation backend (a `ThreadedEngine`, or anything with its
`stream` coroutine): POST /v1/completions (streaming as server-sent events; `logprobs` and `echo`
for scoring, one choice per prompt of a batch), POST /v1/chat/completions (messages rendered with
the model's chat template; streaming in OpenAI's chunk format), GET /v1/models, GET /healthz,
GET /v1/expert_load.

Every bad request gets a 4xx with an error body in OpenAI's shape and the server keeps serving:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

`CompletionsAPI.handle(request)` takes a Starlette request and returns a Starlette response, so
the same code runs under Ray Serve (a deployment's `__call__`) and in a plain ASGI app for tests.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from raymoe.serve.engine import MAX_LOGPROBS, EngineError, RequestError, SamplingParams


@dataclass(frozen=True)
class APILimits:
    max_prompt_tokens: int
    max_tokens: int
    """Largest max_tokens a request may ask for."""
    max_body_bytes: int = 1 << 20


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _number(body: dict, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise APIError(400, f"{key} must be a number", key)
    if v > hi or v < lo or (lo_open and v == lo):
        raise APIError(400, f"{key}={v} must be in {'(' if lo_open else '['}{lo}, {hi}]", key)
    return float(v)


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int | None) -> int | None:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"{key} must be an integer", key)
    if v < lo or (hi is not None and v > hi):
        raise APIError(400, f"{key}={v} must be in [{lo}, {hi if hi is not None else 'inf'}]", key)
    return v


@dataclass
class CompletionRequest:
    prompts: list[list[int]]
    """Token ids of each prompt: one choice per prompt, in order."""
    params: SamplingParams
    stream: bool
    echo: bool = False
    """Return each prompt before its completion (and, with logprobs, its tokens scored)."""

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompts[0]


MAX_PROMPTS = 64
"""Prompts one /v1/completions request may carry (a batch, as lm-evaluation-harness sends)."""


def _prompt_list(prompt) -> list:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, a list of those."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        return prompt
    raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of those", "prompt")


def _json_body(raw: bytes, limits: APILimits, model_name: str) -> dict:
    """The request's JSON object, refused in OpenAI's shape when it is not one or names another model."""
    if len(raw) > limits.max_body_bytes:
        raise APIError(413, f"request body over {limits.max_body_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid UTF-8") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"model {model!r} does not exist; this server serves {model_name!r}", "model", code="model_not_found")
    _integer(body, "n", 1, 1, 1)
    return body


def _flag(body: dict, key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise APIError(400, f"{key} must be true or false", key)
    return v


def _sampling(body: dict, limits: APILimits, logprobs: int | None = None, prompt_logprobs: bool = False,
              max_tokens_key: str = "max_tokens") -> SamplingParams:
    """The sampling fields both endpoints share."""
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise APIError(400, "stop must be a non-empty string or a list of up to 4 non-empty strings", "stop")
    try:
        return SamplingParams(
            max_tokens=_integer(body, max_tokens_key, 16, 1, limits.max_tokens),
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            top_k=_integer(body, "top_k", 0, 0, None),
            seed=_integer(body, "seed", None, 0, 2**63 - 1),
            stop=tuple(stop),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except RequestError as e:
        raise APIError(400, str(e)) from None


def _check_length(ids: list[int], limits: APILimits, param: str) -> None:
    if len(ids) > limits.max_prompt_tokens:
        raise APIError(400, f"{param} has {len(ids)} tokens; the limit is {limits.max_prompt_tokens}", param,
                       code="context_length_exceeded")


def parse_completion_request(raw: bytes, tokenizer, limits: APILimits, model_name: str) -> CompletionRequest:
    body = _json_body(raw, limits, model_name)
    prompts = _prompt_list(body.get("prompt"))
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"{len(prompts)} prompts in one request; the limit is {MAX_PROMPTS}", "prompt")
    all_ids = []
    vocab = getattr(tokenizer, "vocab_size", None)
    for prompt in prompts:
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt must not be empty", "prompt")
            ids = [int(t) for t in tokenizer.encode(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if t < 0 or (vocab is not None and t >= vocab)]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside this model's vocabulary [0, {vocab})", "prompt")
            ids = list(prompt)
        else:
            raise APIError(400, "each prompt must be a non-empty string or a non-empty list of token ids", "prompt")
        _check_length(ids, limits, "prompt")
        all_ids.append(ids)
    stream, echo = _flag(body, "stream"), _flag(body, "echo")
    logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    if stream and (len(all_ids) > 1 or echo or logprobs is not None):
        raise APIError(400, "stream takes one prompt, without echo or logprobs (send stream: false for those)", "stream")
    params = _sampling(body, limits, logprobs, prompt_logprobs=echo and logprobs is not None)
    return CompletionRequest(all_ids, params, stream, echo)


@dataclass
class ChatRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool = False
    """stream_options.include_usage: a last chunk with usage and no choices."""


def parse_chat_request(raw: bytes, tokenizer, template, limits: APILimits, model_name: str) -> ChatRequest:
    """`messages` rendered with the model's chat template (the one its fine-tuning used, else its
    tokenizer's), with the assistant's generation prompt, and tokenized without added specials
    (the template writes them), as transformers' apply_chat_template does."""
    body = _json_body(raw, limits, model_name)
    if template is None:
        raise APIError(400, f"model {model_name!r} has no chat template (its tokenizer has none and its config sets no "
                            "data.chat_template); use /v1/completions", "messages", code="no_chat_template")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content}", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise APIError(400, f"messages[{i}] must be {{role: system|user|assistant, content: string}}", "messages")
    try:
        text = template.render([{"role": m["role"], "content": m["content"]} for m in messages], add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template may raise anything (raise_exception, undefined names)
        raise APIError(400, f"the chat template refused these messages: {e}", "messages") from None
    ids = [int(t) for t in tokenizer.encode_text(text)]
    if not ids:
        raise APIError(400, "the rendered conversation is empty", "messages")
    _check_length(ids, limits, "messages")
    logprobs = _flag(body, "logprobs")
    top = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    stream = _flag(body, "stream")
    if stream and logprobs:
        raise APIError(400, "stream with logprobs is not supported here (send stream: false)", "logprobs")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    params = _sampling(body, limits, (top or 0) if logprobs else None, max_tokens_key=key)
    return ChatRequest(ids, params, stream, bool(options.get("include_usage", False)))


class CompletionsAPI:
    """Routes requests to `backend.stream(prompt_ids, params)`, an async generator of
    (delta, finished, request) such as `ThreadedEngine.stream`."""

    def __init__(self, backend, tokenizer, *, model_name: str, limits: APILimits, api_key: str | None = None,
                 expert_load: Callable[[], dict[str, Any]] | None = None, chat_template=None):
        """`chat_template`: a train.sft.ChatTemplate for /v1/chat/completions (None: that route
        answers 400 saying the model has none)."""
        self.backend, self.tokenizer, self.model_name, self.limits = backend, tokenizer, model_name, limits
        self.chat_template = chat_template
        self.api_key = api_key
        self.expert_load = expert_load
        self.created = int(time.time())

    async def handle(self, request: Request) -> Response:
        try:
            # Under Serve the app may sit behind a route prefix, which arrives as root_path.
            path = request.url.path[len(request.scope.get("root_path", "")):] if request.scope.get("root_path") else request.url.path
            path, method = path.rstrip("/") or "/", request.method
            if path == "/healthz" and method == "GET":
                return JSONResponse({"status": "ok"})
            self._authorize(request)
            if path == "/v1/completions":
                if method != "POST":
                    raise APIError(405, "use POST for /v1/completions")
                return await self._completions(request)
            if path == "/v1/chat/completions":
                if method != "POST":
                    raise APIError(405, "use POST for /v1/chat/completions")
                return await self._chat(request)
            if path == "/v1/models" and method == "GET":
                return JSONResponse({"object": "list", "data": [
                    {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "raymoe"}]})
            if path == "/v1/expert_load" and method == "GET":
                return JSONResponse(self.expert_load() if self.expert_load else {"layers": []})
            raise APIError(404, f"no route {method} {path}", code="not_found")
        except APIError as e:
            return e.response()

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        # The scheme is case-insensitive (RFC 7235); the key is compared in constant time.
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", type="authentication_error", code="invalid_api_key")

    async def _completions(self, request: Request) -> Response:
        req = parse_completion_request(await request.body(), self.tokenizer, self.limits, self.model_name)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(self._sse(req, cid, created), media_type="text/event-stream")
        async def one(ids: list[int]):
            text, state = [], None
            async for delta, _, state in self.backend.stream(ids, req.params):
                text.append(delta)
            return "".join(text), state

        try:
            done = await asyncio.gather(*(one(ids) for ids in req.prompts))
        except RequestError as e:
            raise APIError(400, str(e)) from None
        except EngineError as e:
            raise APIError(500, f"generation failed: {e}", type="server_error") from None
        choices = []
        for i, (text, state) in enumerate(done):
            prefix = self.tokenizer.decode(state.prompt_ids) if req.echo else ""
            choices.append({"text": prefix + text, "index": i, "finish_reason": state.finish_reason,
                            "logprobs": self._logprobs(state, req.echo) if req.params.logprobs is not None else None})
        usage = [_usage(state) for _, state in done]
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": created, "model": self.model_name, "choices": choices,
            "usage": {k: sum(u[k] for u in usage) for k in usage[0]},
        })

    async def _chat(self, request: Request) -> Response:
        req = parse_chat_request(await request.body(), self.tokenizer, self.chat_template, self.limits, self.model_name)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": cid, "created": created, "model": self.model_name}
        if req.stream:
            return StreamingResponse(self._chat_sse(req, head), media_type="text/event-stream")
        text, state = [], None
        try:
            async for delta, _, state in self.backend.stream(req.prompt_ids, req.params):
                text.append(delta)
        except RequestError as e:
            raise APIError(400, str(e)) from None
        except EngineError as e:
            raise APIError(500, f"generation failed: {e}", type="server_error") from None
        logprobs = None
        if req.params.logprobs is not None:
            def entry(t: int, lp: float) -> dict:
                piece = self.tokenizer.decode([t])
                return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}
            logprobs = {"content": [{**entry(t, lp), "top_logprobs": [entry(a, v) for a, v in top]}
                                    for t, (lp, top) in zip(state.output_ids, state.logprobs)]}
        return JSONResponse({**head, "object": "chat.completion", "usage": _usage(state), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "logprobs": logprobs,
             "finish_reason": state.finish_reason}]})

    async def _chat_sse(self, req: ChatRequest, head: dict):
        def chunk(delta: dict, finish: str | None) -> str:
            body = {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return f"data: {json.dumps(body)}\n\n"

        yield chunk({"role": "assistant", "content": ""}, None)
        state = None
        try:
            async for delta, done, state in self.backend.stream(req.prompt_ids, req.params):
                if delta:
                    yield chunk({"content": delta}, None)
                if done:
                    yield chunk({}, state.finish_reason)
            if req.include_usage and state is not None:
                yield f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [], 'usage': _usage(state)})}\n\n"
        except (RequestError, EngineError) as e:
            kind = "invalid_request_error" if isinstance(e, RequestError) else "server_error"
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': kind, 'param': None, 'code': None}})}\n\n"
        yield "data: [DONE]\n\n"

    def _logprobs(self, state, echo: bool) -> dict:
        """OpenAI's completions logprobs object: tokens, token_logprobs, top_logprobs, text_offset;
        with echo the prompt's tokens first (the very first has no log-probability: null)."""
        ids = (state.prompt_ids if echo else []) + state.output_ids
        entries = ([None] + state.prompt_logprobs if echo else []) + state.logprobs
        tokens = [self.tokenizer.decode([t]) for t in ids]
        offsets, at = [], 0
        for t in tokens:  # character offsets of each token's own text (a split UTF-8 character counts once per piece)
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens,
                "token_logprobs": [None if e is None else e[0] for e in entries],
                "top_logprobs": [None if e is None else {self.tokenizer.decode([t]): v for t, v in e[1]} for e in entries],
                "text_offset": offsets}

    async def _sse(self, req: CompletionRequest, cid: str, created: int):
        def chunk(text: str, finish: str | None, usage=None) -> str:
            body = {"id": cid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
            if usage:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        try:
            async for delta, done, state in self.backend.stream(req.prompt_ids, req.params):
                if delta or done:
                    yield chunk(delta, state.finish_reason if done else None, _usage(state) if done else None)
        except (RequestError, EngineError) as e:
            kind = "invalid_request_error" if isinstance(e, RequestError) else "server_error"
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': kind, 'param': None, 'code': None}})}\n\n"
        yield "data: [DONE]\n\n"


def _usage(req) -> dict[str, int]:
    return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.output_ids),
            "total_tokens": len(req.prompt_ids) + len(req.output_ids)}


def build_asgi_app(api: CompletionsAPI):
    """A plain Starlette app around the API (tests, or serving without Ray)."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    return Starlette(routes=[Route("/{path:path}", api.handle, methods=["GET", "POST", "PUT", "DELETE"])])
