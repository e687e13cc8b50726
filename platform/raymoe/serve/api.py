"""OpenAI-compatible HTTP API over a generation backend (a `ThreadedEngine`, or anything with its
`stream` coroutine): POST /v1/completions (`logprobs` and `echo` for scoring, one choice per prompt
of a batch), POST /v1/chat/completions (messages rendered with the model's chat template), both
streamed as server-sent events in OpenAI's chunk format on request, logprobs included; GET
/v1/models, GET /healthz, GET /v1/expert_load. No Ray in here: the Serve Ingress returns this app.

FastAPI, so that Ray Serve serves the app as it is (behind a route prefix too); strict pydantic
models, so that each request body is declared once with OpenAI's types and every bad request gets
a 4xx in OpenAI's error shape while the server keeps serving:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any, AsyncIterator, Callable, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, WrapValidator, field_validator, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from raymoe.serve.engine import MAX_LOGPROBS, EngineError, ReplicaLost, RequestError, SamplingParams, TokenLogprob


@dataclass(frozen=True)
class APILimits:
    max_prompt_tokens: int
    max_tokens: int
    """Largest max_tokens a request may ask for."""
    max_body_bytes: int = 1 << 20


MAX_PROMPTS = 64
"""Prompts one /v1/completions request may carry (a batch, as lm-evaluation-harness sends)."""


class APIError(Exception):
    """A request refused: OpenAI's error body with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# -- request bodies

def _one_error(message: str) -> WrapValidator:
    """Report a union's failure as this one message, not one error per member of the union."""
    def validate(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("invalid_value", message) from None

    return WrapValidator(validate)


_NonEmptyStr = Annotated[str, Field(min_length=1)]
_TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
_Prompt = Annotated[
    _NonEmptyStr | _TokenIds | Annotated[list[_NonEmptyStr | _TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)],
    _one_error(f"Input should be a non-empty string, a non-empty list of token ids or a list of up to {MAX_PROMPTS} of those"),
]
_Stop = Annotated[
    _NonEmptyStr | Annotated[list[_NonEmptyStr], Field(max_length=4)],
    _one_error("Input should be a non-empty string or a list of up to 4 non-empty strings"),
]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False
    """A last chunk with usage and no choices."""


class _Body(BaseModel):
    """The fields both endpoints share. Strict: "5" is not an integer, "yes" not a boolean."""

    model_config = ConfigDict(strict=True, extra="ignore")  # OpenAI's clients send fields we have no use for

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    """0 = no top-k filter."""
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: _Stop = Field(default_factory=list)
    n: int = Field(1, ge=1, le=1)
    """Choices per prompt: only 1."""
    stream: bool = False
    stream_options: StreamOptions = Field(default_factory=StreamOptions)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI's clients send null for what they leave unset.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionBody(_Body):
    prompt: _Prompt
    max_tokens: int = Field(16, ge=1)
    echo: bool = False
    """Return each prompt before its completion (and, with logprobs, its tokens scored)."""
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """Log-probability of each token, with this many most likely alternatives."""

    def prompts(self) -> list[str | list[int]]:
        """One per choice, in order."""
        one = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
        return [self.prompt] if one else self.prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for max_tokens; it wins when both are given."""
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise PydanticCustomError("needs_logprobs", "only allowed with logprobs: true")
        return top


_B = TypeVar("_B", bound=BaseModel)


async def _read_body(request: Request, model: type[_B], max_bytes: int) -> _B:
    """The body as `model`, whatever its Content-Type (as today's clients and `curl -d` send it).
    Pydantic's JSON parser, not json.loads: it refuses invalid UTF-8, lone surrogates (which no
    tokenizer can encode) and nesting over 200 deep as errors, where json.loads would let through or
    overflow the stack."""
    too_large = APIError(413, f"request body over {max_bytes} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > max_bytes:
            raise too_large
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in errors]) from None


# -- the endpoints

_bearer = HTTPBearer(auto_error=False)


class _EventStream(StreamingResponse):
    """Server-sent events whose generator is closed the moment the response ends, however it ends:
    a client that went away ends its engine request (freeing its batch row) at once. Starlette
    leaves the generator to the garbage collector when a send fails (ASGI 2.4 servers)."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[str]):
        super().__init__(chunks, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # no proxy buffering

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class CompletionsAPI:
    """What the endpoints do, over a backend with `stream(prompt_ids, params)`, an async generator
    of (delta, finished, request), and `generate_all(prompt_ids, params)` -> (text, request), for
    streamed and non-streamed requests: `ThreadedEngine`, or `engine_link.RemoteEngine` under
    Serve. `build_asgi_app` serves it."""

    def __init__(self, backend, tokenizer, *, model_name: str, limits: APILimits, api_key: str | None = None,
                 expert_load: Callable[[], dict[str, Any]] | None = None, chat_template=None):
        """`chat_template`: a train.sft.ChatTemplate for /v1/chat/completions (None: that route
        answers 400 saying the model has none)."""
        self.backend, self.tokenizer, self.model_name, self.limits = backend, tokenizer, model_name, limits
        self.chat_template = chat_template
        self.api_key = api_key
        self.expert_load = expert_load
        self.created = int(time.time())

    async def authorize(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        """`Authorization: Bearer <key>`, the scheme in any case (RFC 7235), the key compared in constant time."""
        if self.api_key and (credentials is None or not hmac.compare_digest(credentials.credentials.encode(), self.api_key.encode())):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", type="authentication_error",
                           code="invalid_api_key")

    async def completions(self, body: CompletionBody) -> Response:
        self._check_model(body.model)
        prompts = [self._prompt_ids(p) for p in body.prompts()]
        if body.stream and len(prompts) > 1:
            raise APIError(400, "stream takes one prompt (send stream: false for a batch)", "stream")
        params = self._sampling(body, body.max_tokens, "max_tokens", body.logprobs,
                                prompt_logprobs=body.echo and body.logprobs is not None)
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}
        if body.stream:
            return _EventStream(self._completion_chunks(body, prompts[0], params, head))
        done = await asyncio.gather(*(self._generate(ids, params) for ids in prompts))
        choices = []
        for i, (text, state) in enumerate(done):
            logprobs = None
            if params.logprobs is not None:
                ids, entries = state.output_ids, state.logprobs
                if body.echo:  # the prompt's first token has no log-probability: nothing predicts it
                    ids, entries = state.prompt_ids + ids, [None, *state.prompt_logprobs, *entries]
                logprobs = self._completion_logprobs(ids, entries)
            prefix = self.tokenizer.decode(state.prompt_ids) if body.echo else ""
            choices.append({"text": prefix + text, "index": i, "finish_reason": state.finish_reason, "logprobs": logprobs})
        usage = [_usage(state) for _, state in done]
        return JSONResponse({**head, "choices": choices, "usage": {k: sum(u[k] for u in usage) for k in usage[0]}})

    async def chat_completions(self, body: ChatBody) -> Response:
        """`messages` rendered with the model's chat template (the one its fine-tuning used, else its
        tokenizer's), with the assistant's generation prompt, and tokenized without added specials
        (the template writes them), as transformers' apply_chat_template does."""
        self._check_model(body.model)
        if self.chat_template is None:
            raise APIError(400, f"model {self.model_name!r} has no chat template (its tokenizer has none and its config "
                                "sets no data.chat_template); use /v1/completions", "messages", code="no_chat_template")
        try:
            text = self.chat_template.render([m.model_dump() for m in body.messages], add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template may raise anything (raise_exception, undefined names)
            raise APIError(400, f"the chat template refused these messages: {e}", "messages") from None
        ids = [int(t) for t in self.tokenizer.encode_text(text)]
        if not ids:
            raise APIError(400, "the rendered conversation is empty", "messages")
        self._check_length(ids, "messages")
        key = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens or body.max_tokens or 16
        params = self._sampling(body, max_tokens, key, (body.top_logprobs or 0) if body.logprobs else None)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.model_name}
        if body.stream:
            return _EventStream(self._chat_chunks(ids, params, head, body.stream_options.include_usage))
        text, state = await self._generate(ids, params)
        logprobs = {"content": self._chat_logprobs(state.output_ids, state.logprobs)} if body.logprobs else None
        return JSONResponse({**head, "object": "chat.completion", "usage": _usage(state), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
             "finish_reason": state.finish_reason}]})

    # -- checks that need this server's model and limits
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}", "model",
                           code="model_not_found")

    def _check_length(self, ids: list[int], param: str) -> None:
        if len(ids) > self.limits.max_prompt_tokens:
            raise APIError(400, f"{param} has {len(ids)} tokens; the limit is {self.limits.max_prompt_tokens}", param,
                           code="context_length_exceeded")

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = [int(t) for t in self.tokenizer.encode(prompt)]
        else:
            vocab = getattr(self.tokenizer, "vocab_size", None)
            bad = [t for t in prompt if vocab is not None and t >= vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside this model's vocabulary [0, {vocab})", "prompt")
            ids = prompt
        self._check_length(ids, "prompt")
        return ids

    def _sampling(self, body: _Body, max_tokens: int, key: str, logprobs: int | None, prompt_logprobs: bool = False) -> SamplingParams:
        if max_tokens > self.limits.max_tokens:
            raise APIError(400, f"{key}={max_tokens} is over this server's limit of {self.limits.max_tokens}", key)
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                              seed=body.seed, stop=body.stops(), logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    # -- generation
    async def _generate(self, ids: list[int], params: SamplingParams, attempts: int = 3) -> tuple[str, Any]:
        """(the whole completion's text, the finished engine request). A request whose replica
        died mid-way is generated again: its client has seen nothing of it yet."""
        for attempt in range(attempts):
            try:
                return await self.backend.generate_all(ids, params)
            except RequestError as e:
                raise APIError(400, str(e)) from None
            except ReplicaLost as e:
                if attempt == attempts - 1:
                    raise APIError(503, f"generation failed: {e}", type="server_error") from None
            except EngineError as e:
                raise APIError(500, f"generation failed: {e}", type="server_error") from None
        raise AssertionError("unreachable")

    async def _completion_chunks(self, body: CompletionBody, ids: list[int], params: SamplingParams, head: dict) -> AsyncIterator[str]:
        """One prompt's completion as SSE chunks: with echo the prompt first; with logprobs each chunk
        scores its own tokens, text_offset counting on across chunks as in one response."""
        def chunk(text: str, logprobs: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
            out = {**head, "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]}
            return _event({**out, "usage": usage} if usage else out)

        scored, cursor, state = params.logprobs is not None, _TokenCursor(), None
        echo, at = body.echo, 0  # the prompt still to send; text_offset of the next token
        try:
            # aclosing: closing this generator (the client went away) ends the engine request at once.
            async with aclosing(self.backend.stream(ids, params)) as events:
                async for delta, done, state in events:
                    if echo:  # the first event: the prefill has scored the prompt by now
                        echo, logprobs = False, None
                        if scored:
                            logprobs = self._completion_logprobs(state.prompt_ids, [None, *state.prompt_logprobs])
                            at = sum(map(len, logprobs["tokens"]))
                        yield chunk(self.tokenizer.decode(state.prompt_ids), logprobs)
                    if not (delta or done):
                        continue  # text held back (a partial character, a stop string forming): its tokens go with the next chunk
                    logprobs = None
                    if scored:
                        logprobs = self._completion_logprobs(*cursor.take(state), start=at)
                        at += sum(map(len, logprobs["tokens"]))
                    yield chunk(delta, logprobs, state.finish_reason if done else None, _usage(state) if done else None)
            if body.stream_options.include_usage and state is not None:
                yield _event({**head, "choices": [], "usage": _usage(state)})
        except (RequestError, EngineError) as e:
            yield _error_event(e)
        yield "data: [DONE]\n\n"

    async def _chat_chunks(self, ids: list[int], params: SamplingParams, head: dict, include_usage: bool) -> AsyncIterator[str]:
        """The reply as SSE chunks: the role, content deltas (each with its own tokens' logprobs when
        asked), the finish reason, and with include_usage a last chunk of usage only."""
        def chunk(delta: dict, finish: str | None = None, logprobs: dict | None = None) -> str:
            return _event({**head, "object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

        cursor, state = _TokenCursor(), None

        def new_logprobs(state) -> dict | None:
            return {"content": self._chat_logprobs(*cursor.take(state))} if params.logprobs is not None else None

        yield chunk({"role": "assistant", "content": ""})
        try:
            async with aclosing(self.backend.stream(ids, params)) as events:
                async for delta, done, state in events:
                    if delta:
                        yield chunk({"content": delta}, logprobs=new_logprobs(state))
                    if done:
                        yield chunk({}, state.finish_reason, new_logprobs(state))
            if include_usage and state is not None:
                yield _event({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(state)})
        except (RequestError, EngineError) as e:
            yield _error_event(e)
        yield "data: [DONE]\n\n"

    def _completion_logprobs(self, ids: list[int], entries: list[TokenLogprob | None], start: int = 0) -> dict:
        """OpenAI's completions logprobs object for these tokens: tokens, token_logprobs, top_logprobs,
        text_offset (of each token's own text from `start`; a UTF-8 character split across tokens
        counts once per piece). A None entry has no log-probability."""
        tokens = [self.tokenizer.decode([t]) for t in ids]
        offsets = []
        for t in tokens:
            offsets.append(start)
            start += len(t)
        return {"tokens": tokens,
                "token_logprobs": [None if e is None else e[0] for e in entries],
                "top_logprobs": [None if e is None else {self.tokenizer.decode([t]): v for t, v in e[1]} for e in entries],
                "text_offset": offsets}

    def _chat_logprobs(self, ids: list[int], entries: list[TokenLogprob]) -> list[dict]:
        """OpenAI's chat `logprobs.content` entries for these tokens."""
        def entry(t: int, lp: float) -> dict:
            piece = self.tokenizer.decode([t])
            return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}

        return [{**entry(t, lp), "top_logprobs": [entry(a, v) for a, v in top]} for t, (lp, top) in zip(ids, entries)]


class _TokenCursor:
    """The output tokens of a streamed request that no chunk has reported yet."""

    def __init__(self) -> None:
        self.sent = 0

    def take(self, state) -> tuple[list[int], list[TokenLogprob]]:
        # Only up to streamed_tokens: the engine thread may already have appended later tokens.
        start, self.sent = self.sent, state.streamed_tokens
        return state.output_ids[start:self.sent], state.logprobs[start:self.sent]


def _usage(req) -> dict[str, int]:
    return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.output_ids),
            "total_tokens": len(req.prompt_ids) + len(req.output_ids)}


def _event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _error_event(e: Exception) -> str:
    """A failure once the stream has begun (its status, 200, is sent): OpenAI's error shape as an event."""
    kind = "invalid_request_error" if isinstance(e, RequestError) else "server_error"
    return _event({"error": {"message": str(e), "type": kind, "param": None, "code": None}})


# -- the app

async def _on_api_error(request: Request, e: APIError) -> JSONResponse:
    return e.response()


async def _on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    """A 400 about the first error, naming its top-level field ("max_tokens", "messages"), or None
    when the body as a whole is wrong (not JSON, not an object)."""
    err = e.errors()[0]
    path = [str(p) for p in err["loc"][1:]]  # loc[0] is "body"
    return APIError(400, f"{'.'.join(path) or 'request body'}: {err['msg']}", path[0] if path else None).response()


async def _on_http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Routing's 404 and 405."""
    response = APIError(e.status_code, f"{e.detail}: {request.method} {request.url.path}",
                        code="not_found" if e.status_code == 404 else None).response()
    response.headers.update(e.headers or {})
    return response


async def _on_server_error(request: Request, e: Exception) -> JSONResponse:
    """A bug, still in OpenAI's shape (Starlette raises it on to the server, which logs it)."""
    return APIError(500, f"internal error ({type(e).__name__})", type="server_error").response()


def build_asgi_app(api: CompletionsAPI) -> FastAPI:
    """The HTTP app (the Serve Router returns it from `__serve_build_asgi_app__`; tests run it in
    process). Behind a Serve route prefix, which arrives as ASGI root_path, FastAPI routes past it."""
    app = FastAPI(title="raymoe", docs_url=None, redoc_url=None, openapi_url=None)  # OpenAI's routes only
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_server_error)
    max_bytes = api.limits.max_body_bytes

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:  # no key: health checks carry none
        return {"status": "ok"}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(api.authorize)])

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await api.completions(await _read_body(request, CompletionBody, max_bytes))

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await api.chat_completions(await _read_body(request, ChatBody, max_bytes))

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": api.model_name, "object": "model", "created": api.created, "owned_by": "raymoe"}]}

    @v1.get("/expert_load")
    async def expert_load() -> dict[str, Any]:
        if not api.expert_load:
            return {"layers": []}
        load = api.expert_load()
        return await load if inspect.isawaitable(load) else load

    app.include_router(v1)
    return app
