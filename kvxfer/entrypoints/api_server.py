"""OpenAI-compatible HTTP API of one kvxfer engine (role prefill, decode or both).

Routes: /v1/completions, /v1/chat/completions (JSON or server-sent events), /v1/models,
/v1/abort/{request_id} (used by the proxy to release a prefill's held blocks; the optional JSON
body `{"transfer_token": ...}` names the hold), /health, /metrics. `kv_transfer_params` are
parsed once here (`parse_kv_transfer_params`) and checked by the engine when it takes the
request, so a bad request is a 4xx that changes nothing (an id in use: 409). The response
status is sent only once the first output exists, so a failed KV pull is an HTTP error rather
than a broken stream.

A P/D request's text continues across servers: a prefill leg's stream holds back a trailing
incomplete UTF-8 sequence (the decode side completes it), and a decode leg whose router already
streamed the prefill's first token (`first_token_streamed`) starts its stream after that token,
with the text state the prefill's stream ended in.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvxfer.connectors.base import HTTP_STATUS_OF_KIND
from kvxfer.connectors.metadata import (
    KVTransferParams,
    RemoteDecodeParams,
    RemotePrefillParams,
    parse_kv_transfer_params,
)
from kvxfer.engine.request import RequestIdInUse, RequestOutput
from kvxfer.entrypoints.async_engine import AsyncEngine, EngineDead, RequestStream
from kvxfer.entrypoints.metrics import ServerMetrics
from kvxfer.entrypoints.protocol import (
    REQUEST_ID_RE,
    AbortRequest,
    BadRequest,
    ChatCompletionRequest,
    CompletionRequest,
    parse_body,
    parse_request_id,
)
from kvxfer.entrypoints.outputs import as_dict, logprob_entries
from kvxfer.entrypoints.render import IncrementalText, Renderer

if TYPE_CHECKING:
    from kvxfer.engine.engine import LLMEngine
    from kvxfer.engine.sampling_params import SamplingParams

OpenAIRequest = CompletionRequest | ChatCompletionRequest

DISCONNECT_POLL_S = 1.0


@dataclass
class ServerContext:
    engine: AsyncEngine
    renderer: Renderer
    metrics: ServerMetrics
    model_name: str
    role: str  # "prefill" | "decode" | "both"
    sampling_params: Callable[..., SamplingParams]  # kvxfer's SamplingParams (the class)
    max_model_len: int  # prompt + generated tokens one sequence may reach
    ranks_problem: Callable[[], str | None]  # any thread, never waits for the engine thread
    engine_stats: Callable[[LLMEngine], dict[str, Any]]  # runs on the engine thread
    side_channel_problem: Callable[[], str | None] | None = None  # blocking; None: nothing to check


def error_body(message: str, status: int, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "code": status}}


def build_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(title="kvxfer", docs_url=None, redoc_url=None)

    @app.exception_handler(BadRequest)
    async def _bad_request(_: Request, exc: BadRequest) -> JSONResponse:
        ctx.metrics.rejected.labels(str(exc.status)).inc()
        return JSONResponse(error_body(exc.message, exc.status), status_code=exc.status)

    @app.exception_handler(EngineDead)
    async def _engine_dead(_: Request, exc: EngineDead) -> JSONResponse:
        return JSONResponse(error_body(str(exc), 503, "engine_unavailable"), status_code=503)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_body(CompletionRequest, await request.body())
        prompt_ids = ctx.renderer.encode_prompt(req.prompt)
        return await _generate(ctx, request, req, prompt_ids, req.max_tokens, req.logprobs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_body(ChatCompletionRequest, await request.body())
        prompt_ids = ctx.renderer.encode_chat(req.messages)
        max_tokens = req.token_limit(default=max(1, ctx.max_model_len - len(prompt_ids)))
        top = (req.top_logprobs or 0) if req.logprobs else None
        return await _generate(ctx, request, req, prompt_ids, max_tokens, top, chat=True)

    @app.post("/v1/abort/{request_id}")
    async def abort(request_id: str, request: Request) -> dict:
        if not REQUEST_ID_RE.match(request_id):
            raise BadRequest("request id must be 1-128 characters of [A-Za-z0-9._:-]")
        token = parse_body(AbortRequest, await request.body() or b"{}").transfer_token
        outcome = await ctx.engine.abort(request_id, token)
        return {"request_id": request_id, "outcome": outcome}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": ctx.model_name, "object": "model", "created": 0, "owned_by": "kvxfer",
                "max_model_len": ctx.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        problems = await _health_problems(ctx)
        # The step time is information (load), never a reason to be unhealthy.
        busy = {"step_seconds": round(ctx.engine.step_seconds, 3)}
        if problems:
            return JSONResponse({"status": "unavailable", "problems": problems} | busy, status_code=503)
        return JSONResponse({"status": "ok", "role": ctx.role} | busy)

    @app.get("/metrics")
    async def metrics() -> Response:
        stats = await ctx.engine.call(ctx.engine_stats, timeout_s=10) if ctx.engine.alive else {}
        return Response(ctx.metrics.render(stats), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


async def _health_problems(ctx: ServerContext) -> list[str]:
    """Whether the server can serve, from state that does not wait for a running step: the
    engine thread, the TP rank processes, the side channel."""
    if not ctx.engine.alive:
        return [f"engine is not running: {ctx.engine.error!r}"]
    problems = [p for p in (ctx.ranks_problem(),) if p]
    if ctx.side_channel_problem is not None:
        problem = await asyncio.to_thread(ctx.side_channel_problem)
        if problem:
            problems.append(problem)
    return problems


async def _generate(
    ctx: ServerContext, request: Request, req: OpenAIRequest, prompt_ids: list[int], max_tokens: int,
    top_logprobs: int | None, chat: bool,
) -> Response:
    request_id = parse_request_id(request.headers.get("x-request-id")) or uuid.uuid4().hex
    if req.model is not None and req.model != ctx.model_name:
        raise BadRequest(f"model {req.model!r} is not served here (this server serves {ctx.model_name!r})", 404)
    if len(prompt_ids) + max_tokens > ctx.max_model_len:
        raise BadRequest(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds this server's "
            f"context length ({ctx.max_model_len} tokens: the model's positions or the KV pool, the smaller)"
        )
    try:
        kv = parse_kv_transfer_params(req.kv_transfer_params)
    except ValueError as exc:  # KVParamsError: the message names the field
        raise BadRequest(str(exc)) from None
    params = ctx.sampling_params(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
        ignore_eos=req.ignore_eos, logprobs=top_logprobs,
    )
    try:
        stream = await ctx.engine.add_request(request_id, prompt_ids, params, kv)
    except (KeyError, RequestIdInUse):  # in flight here, or still held for a remote reader
        raise BadRequest(f"request id {request_id!r} is in use", status=409) from None
    except ValueError as exc:  # incl. KVParamsError from the engine's check of the params
        raise BadRequest(str(exc)) from None

    view = _ResponseView(ctx, request_id, req, chat, top_logprobs, kv)
    watch = _DisconnectWatch(request)
    try:
        first = await _next_or_disconnect(stream, watch)
    except BaseException:
        stream.close()
        raise
    if first is None:  # the client left before the first token; the request is aborted
        stream.close()
        return Response(status_code=499)
    if first.finished and first.finish_reason == "error":
        stream.close()
        return _engine_error(first)
    if req.stream:
        return StreamingResponse(_sse(view, stream, first), media_type="text/event-stream",
                                 headers={"X-Request-Id": request_id})
    output = first
    try:
        while not output.finished:
            output = await _next_or_disconnect(stream, watch)
            if output is None:
                return Response(status_code=499)
    finally:
        stream.close()
    if output.finish_reason == "error":
        return _engine_error(output)
    return JSONResponse(view.full(output), headers={"X-Request-Id": request_id})


def _error_status(output: RequestOutput) -> tuple[int, str]:
    """(HTTP status, error type) of a failed output, by its KV failure kind
    (`HTTP_STATUS_OF_KIND`): 400 when the kv_transfer_params were wrong (found once the decode
    side has the prefill engine's metadata), 409 when another pull claimed their token, 504 when
    the prefill's lease ran out before the pull; else 502 (a peer or the engine failed)."""
    status = HTTP_STATUS_OF_KIND.get(output.error_kind, 502)
    return status, "invalid_request_error" if status < 500 else "engine_error"


def _engine_error(output: RequestOutput) -> JSONResponse:
    status, kind = _error_status(output)
    return JSONResponse(error_body(output.error or "request failed", status, kind), status_code=status)


class _DisconnectWatch:
    """Asks the server whether the client left, at most every DISCONNECT_POLL_S."""

    def __init__(self, request: Request):
        self.request = request
        self.next_check = time.monotonic() + DISCONNECT_POLL_S

    async def gone(self) -> bool:
        if time.monotonic() < self.next_check:
            return False
        self.next_check = time.monotonic() + DISCONNECT_POLL_S
        return await self.request.is_disconnected()


async def _next_or_disconnect(stream: RequestStream, watch: _DisconnectWatch) -> RequestOutput | None:
    """The next output, or None once the client has disconnected (noticed within about
    DISCONNECT_POLL_S, also while outputs keep coming)."""
    while True:
        try:
            output = await asyncio.wait_for(stream.next(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            output = None
        if await watch.gone():
            return None
        if output is not None:
            return output


async def _sse(view: _ResponseView, stream: RequestStream, output: RequestOutput) -> AsyncIterator[str]:
    # Cancelled by Starlette when the client disconnects: `finally` aborts the request.
    try:
        while True:
            if output.finish_reason == "error":
                yield _event(error_body(output.error or "request failed", *_error_status(output)))
                return
            yield _event(view.chunk(output))
            if output.finished:
                yield "data: [DONE]\n\n"
                return
            output = await stream.next()
    except EngineDead as exc:
        yield _event(error_body(str(exc), 503, "engine_unavailable"))
    finally:
        stream.close()


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _ResponseView:
    """Builds the OpenAI JSON of one request (completion or chat; full or chunks)."""

    def __init__(self, ctx: ServerContext, request_id: str, req: OpenAIRequest, chat: bool, top_logprobs: int | None,
                 kv: KVTransferParams | None):
        self.ctx = ctx
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.req = req
        self.chat = chat
        self.top_logprobs = top_logprobs
        self.text = IncrementalText(ctx.renderer)
        self.num_sent = 0  # output tokens already in a chunk
        # A prefill leg's text continues on the decode side: never flush an incomplete character.
        self.continues = isinstance(kv, RemoteDecodeParams)
        if isinstance(kv, RemotePrefillParams) and kv.first_token_streamed:
            # The router sent the prefill's chunk of t1: resume from exactly where it ended (the
            # same function on the same tokenizer gives the same held-back state).
            self.text.delta([kv.first_token_id], final=False)
            self.num_sent = 1

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.ctx.model_name}

    def _tail(self, output: RequestOutput) -> dict:
        extra = {
            "usage": {
                "prompt_tokens": len(output.prompt_token_ids),
                "completion_tokens": len(output.output_token_ids),
                "total_tokens": len(output.prompt_token_ids) + len(output.output_token_ids),
            },
            "kv_transfer_params": as_dict(output.kv_transfer_params),
            "kv_transfer_stats": as_dict(output.kv_transfer_stats),
        }
        if self.req.return_token_ids:
            extra["prompt_token_ids"] = list(output.prompt_token_ids)
        return extra

    def full(self, output: RequestOutput) -> dict:
        text = self.ctx.renderer.decode(list(output.output_token_ids))
        choice: dict[str, Any] = {"index": 0, "finish_reason": output.finish_reason,
                                  "logprobs": self._logprobs(output, 0)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        if self.req.return_token_ids:
            choice["token_ids"] = list(output.output_token_ids)
        body = self._head("chat.completion" if self.chat else "text_completion")
        return body | {"choices": [choice]} | self._tail(output)

    def chunk(self, output: RequestOutput) -> dict:
        ids = list(output.output_token_ids)
        delta = self.text.delta(ids, final=output.finished and not self.continues)
        start, self.num_sent = self.num_sent, len(ids)
        choice: dict[str, Any] = {"index": 0, "finish_reason": output.finish_reason if output.finished else None,
                                  "logprobs": self._logprobs(output, start)}
        if self.chat:
            choice["delta"] = {"content": delta} | ({"role": "assistant"} if start == 0 else {})
        else:
            choice["text"] = delta
        if self.req.return_token_ids:
            choice["token_ids"] = ids[start:]
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = [choice]
        if output.finished and self.continues:
            # What a colocated final chunk would flush (an incomplete character as U+FFFD): a router
            # whose request this token completes ends the client's stream with it.
            body["held_back_text"] = self.text.held_back(ids)
        return body | self._tail(output) if output.finished else body

    def _logprobs(self, output: RequestOutput, start: int) -> dict | None:
        if self.top_logprobs is None:
            return None
        entries = logprob_entries(output, max(1, self.top_logprobs))[start:]
        tok = self.ctx.renderer.token_text
        if self.chat:
            content = [
                {"token": tok(t), "logprob": lp, "token_id": t,
                 "top_logprobs": [{"token": tok(i), "logprob": v, "token_id": i} for i, v in top]}
                for t, lp, top in entries
            ]
            return {"content": content}
        return {
            "tokens": [tok(t) for t, _, _ in entries],
            "token_ids": [t for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{tok(i): v for i, v in top} for _, _, top in entries],
            "top_token_logprobs": [[{"token_id": i, "logprob": v} for i, v in top] for _, _, top in entries],
        }
