"""The OpenAI-compatible HTTP API over an Engine (scheduler.py), as a FastAPI app:

    POST /v1/completions        {"model", "prompt", ...}     -> text_completion (or SSE chunks with stream)
    POST /v1/chat/completions   {"model", "messages", ...}   -> chat.completion (or chat.completion.chunk SSE)
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", running, waiting, limits}   (never needs the API key)

Every error is OpenAI's shape, {"error": {"message", "type", "param", "code"}}: malformed JSON and schema
violations 400, a missing or wrong API key 401, an unknown model or route 404, the context exceeded 400,
the queue full 429, the server shutting down 503. Streaming answers are server-sent events `data: {json}`
ending with `data: [DONE]`. A request whose client disconnects is cancelled and its cache row freed.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..runtime.inputs import chat_messages, check_text, encode_chat, stop_strings, token_ids
from ..runtime.sampling import SamplingParams
from .logprobs import CompletionLogprobs, chat_logprobs
from .scheduler import Engine, Rejected
from .schemas import ChatRequest, CompletionRequest

DISCONNECT_POLL_S = 0.25
"""While a request waits for its next event, how often the client's connection is checked."""
MAX_CHARS_PER_TOKEN = 64
"""Text longer than context_len * this is refused before tokenising (no token is that long), so a huge body
costs no tokenizer time."""
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               429: "rate_limit_error", 503: "service_unavailable"}


class _StreamingResponse(StreamingResponse):
    """A streaming response that calls on_close however it ends, even when the client is gone before the body
    generator first runs (its own `finally` would then never run and the request would go on for nobody)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def error(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": status}
    return JSONResponse({"error": body}, status_code=status)


class APIKeyMiddleware:
    """Every path but /health needs `Authorization: Bearer <key>` (checked before the body is read)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await error(401, "a missing or wrong API key: send the header 'Authorization: Bearer <key>'")(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    first = errs[0] if errs else {}
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "), None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if not loc and first.get("type") == "missing":
        return "the body is missing: send a JSON object", None
    msgs = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in errs[:5]]
    return "invalid request: " + "; ".join(msgs), (loc[0] if loc else None)


def create_app(llm, *, model_name: str = "fastllm", api_key: str | None = None, **engine_options) -> FastAPI:
    """The app serving `llm` (a fastllm.LLM); its engine thread runs while the app's lifespan does.
    engine_options go to the Engine (max_seqs, max_queue, context_len, kv_cache_tokens, block_size)."""
    engine = Engine(llm, **engine_options)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="fastllm", description=__doc__, lifespan=lifespan)
    app.state.engine = engine
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return error(400, *_validation_message(exc))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Rejected)
    async def _rejected(request, exc: Rejected):
        return error(exc.status, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):  # a bug: still OpenAI's shape (the traceback is logged)
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health():
        if engine.dead is not None:
            return error(503, f"the generation engine stopped: {engine.dead}")
        return {"status": "ok", **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "fastllm", "max_model_len": engine.context_len}]}

    def _prepare(body, prompt_ids: list[int], max_tokens: int | None):
        if body.model != model_name:
            raise Rejected(404, f"the model {body.model!r} is not served here; this server serves {model_name!r}")
        if max_tokens is None:
            max_tokens = max(1, engine.context_len - len(prompt_ids))
        try:
            stop = stop_strings(body.stop)
        except ValueError as e:
            raise Rejected(400, str(e)) from None
        params = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed,
                                repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                                frequency_penalty=body.frequency_penalty)
        return engine.submit(prompt_ids, max_tokens, params, stop, logprobs=body.top_logprobs_count())

    def _encode_text(text: str, messages=None) -> list[int]:
        """The prompt's token ids (of the chat template's rendering when messages are given), each checked
        against the model's vocabulary (a tokenizer may know more ids than the model has rows)."""
        if len(text) > engine.context_len * MAX_CHARS_PER_TOKEN:
            raise Rejected(400, f"the prompt has {len(text)} characters, far more than this model's context of "
                                f"{engine.context_len} tokens can hold")
        try:
            if messages is None:
                ids = llm.tokenizer.encode(check_text(text, "prompt"))
            else:
                ids = encode_chat(llm.tokenizer, messages)
            return token_ids(ids, llm.model.cfg.vocab_size, "the prompt's token ids")
        except (TypeError, ValueError) as e:  # bad text, the template's refusals and failures, ids past the vocab
            raise Rejected(400, str(e)) from None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if isinstance(body.prompt, str):
            ids = _encode_text(body.prompt)
        else:
            try:
                ids = token_ids(body.prompt, llm.model.cfg.vocab_size, "prompt")
            except ValueError as e:
                raise Rejected(400, f"prompt token ids must be in [0, {llm.model.cfg.vocab_size}): {e}") from None
        req = _prepare(body, ids, body.max_tokens)
        fmt = CompletionLogprobs(llm.tokenizer) if body.logprobs is not None else None

        def choice(text, entries):
            return {"text": text, "logprobs": fmt(entries) if fmt else None}

        return await _respond(request, req, body, "cmpl", "text_completion", choice, choice)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        try:
            messages = chat_messages([m.model_dump(include={"role", "content"}) for m in body.messages])
        except ValueError as e:
            raise Rejected(400, str(e)) from None
        ids = _encode_text("".join(m["content"] for m in messages), messages)
        req = _prepare(body, ids, body.max_completion_tokens or body.max_tokens)
        first = [True]

        def logprobs(entries):
            return chat_logprobs(llm.tokenizer, entries) if body.logprobs else None

        def delta(piece, entries):
            d = {"content": piece}
            if first[0]:
                d, first[0] = {"role": "assistant", **d}, False
            return {"delta": d, "logprobs": logprobs(entries)}

        return await _respond(request, req, body, "chatcmpl", "chat.completion", delta,
                              lambda text, entries: {"message": {"role": "assistant", "content": text},
                                                     "logprobs": logprobs(entries)})

    async def _events(request: Request, req):
        """The request's events until done or error; cancels it when the client goes away (or on exit)."""
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(req.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                yield ev
                if ev[0] != "text":
                    return
        finally:
            engine.cancel(req)

    async def _respond(request, req, body, prefix, obj, chunk_choice, final_choice):
        head = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()),
                "model": model_name}

        def usage():
            return {"prompt_tokens": len(req.prompt), "completion_tokens": req.generated,
                    "total_tokens": len(req.prompt) + req.generated}

        if not body.stream:
            text, entries, reason = [], [], None
            async for ev in _events(request, req):
                if ev[0] == "text":
                    text.append(ev[1])
                    entries.extend(ev[2])
                elif ev[0] == "done":
                    reason = ev[1]
                else:
                    return error(ev[1], ev[2])
            choice = {"index": 0, **final_choice("".join(text), entries), "finish_reason": reason}
            return {**head, "choices": [choice], "usage": usage()}

        chunk_head = {**head, "object": obj + ".chunk"} if obj == "chat.completion" else head
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def sse(data) -> str:
            return f"data: {json.dumps(data)}\n\n"

        async def stream():
            try:
                async for ev in _events(request, req):
                    if ev[0] == "text":
                        choice = {"index": 0, **chunk_choice(ev[1], ev[2]), "finish_reason": None}
                        yield sse({**chunk_head, "choices": [choice]})
                    elif ev[0] == "done":
                        choice = {"index": 0, **chunk_choice("", []), "finish_reason": ev[1]}
                        yield sse({**chunk_head, "choices": [choice]})
                        if include_usage:
                            yield sse({**chunk_head, "choices": [], "usage": usage()})
                    else:
                        yield sse({"error": {"message": ev[2], "type": ERROR_TYPES.get(ev[1], "server_error"),
                                             "param": None, "code": ev[1]}})
                yield "data: [DONE]\n\n"
            finally:
                engine.cancel(req)

        return _StreamingResponse(stream(), on_close=lambda: engine.cancel(req), media_type="text/event-stream")

    return app
