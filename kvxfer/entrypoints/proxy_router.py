"""The proxy's request handling: the prefill leg, the decode leg, and the relay of the client's
answer, with the releases of prefill holds nobody will read (see `proxy`'s docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from kvxfer.entrypoints.metrics import ProxyMetrics
from kvxfer.entrypoints.protocol import REQUEST_ID_RE
from kvxfer.entrypoints.proxy_fleet import Fleet, FleetConfig
from kvxfer.entrypoints.proxy_policy import Pool, colocate
from kvxfer.entrypoints.proxy_pool import Backend
from kvxfer.entrypoints.proxy_prompt import PromptKey, Tokenizer, prompt_key
from kvxfer.entrypoints.proxy_relay import (
    DONE_EVENT,
    ClientGone,
    UpstreamError,
    completed_by_first_token,
    continuing,
    error_event,
    error_json,
    final_after,
    passthrough_error,
    prefill_answer,
    prefill_params,
    ready,
    sse_event,
    transfer_token_of,
    upstream_error,
)

logger = logging.getLogger("kvxfer.proxy")

DISCONNECT_POLL_S = 1.0
FIRST_TOKEN_MODES = ("prefill", "decode")
# The pool drops a connection idle this long, well before a backend closes it
# (http_server.KEEP_ALIVE_S, which says why), whatever a busy host delays.
UPSTREAM_IDLE_S = 30.0
PATH_HEADER = "X-Kvxfer-Path"  # on every routed answer: "disaggregated" or "colocated"
DEFAULT_BLOCK_SIZE = 16  # kvxfer serve's default --block-size
DEFAULT_COLOCATE_BELOW = 0  # measured: docs/benchmarks.md "Conditional disaggregation"


def dropped_connection(exc: httpx.HTTPError) -> bool:
    """The server closed the connection or it broke (not a time-out: a slow server may still be
    computing, and is aborted instead)."""
    return isinstance(exc, (httpx.NetworkError, httpx.RemoteProtocolError)) and not isinstance(
        exc, httpx.TimeoutException)


@dataclass(frozen=True)
class RouterConfig:
    fleet: FleetConfig
    request_timeout_s: float
    first_token: str = "prefill"
    block_size: int = DEFAULT_BLOCK_SIZE  # the servers' KV block size: what one index hash covers
    colocate_below: int = DEFAULT_COLOCATE_BELOW  # uncached prompt tokens below which the decode server serves alone


class Router:
    def __init__(self, prefill: list[str], decode: list[str], config: RouterConfig,
                 tokenizer: Tokenizer | None = None):
        if config.first_token not in FIRST_TOKEN_MODES:
            raise ValueError(f"first_token must be one of {FIRST_TOKEN_MODES}, got {config.first_token!r}")
        if config.block_size <= 0 or config.colocate_below < 0:
            raise ValueError(f"block_size must be positive and colocate_below not negative, got "
                             f"{config.block_size} and {config.colocate_below}")
        self.config = config
        self.first_token = config.first_token  # who sends the client its first token (module docstring)
        self.tokenizer = tokenizer
        timeout = httpx.Timeout(connect=5.0, read=config.request_timeout_s, write=30.0, pool=30.0)
        limits = httpx.Limits(max_connections=1000, keepalive_expiry=UPSTREAM_IDLE_S)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits)
        self.fleet = Fleet(prefill, decode, config.fleet, self.client)
        self.prefill, self.decode = self.fleet.prefill, self.fleet.decode
        self.metrics = ProxyMetrics()
        self._cleanups: set[asyncio.Future] = set()

    async def check_health(self) -> None:
        await self.fleet.check_round()

    async def _send(self, pool: Pool, path: str, body: dict, headers: dict, stream: bool,
                    key: PromptKey | None = None, by_prefix_match: bool | None = None, tried: set[str] | None = None):
        """Send to a healthy backend chosen by the pool's policy, none of `tried` (updated); a
        backend that refuses the connection is marked down and the next one is tried, as is a
        prefill server that drops it (`_prefill_dropped`). Returns (backend, response) with the
        backend's load counted and the prompt's blocks recorded in its index."""
        tried = set() if tried is None else tried
        while (choice := pool.choose(tried, key, time.monotonic(), by_prefix_match)) is not None:
            backend = choice.backend
            tried.add(backend.url)
            backend.in_flight += 1
            try:
                req = self.client.build_request("POST", f"{backend.url}{path}", json=body, headers=headers)
                resp = await self.client.send(req, stream=stream)
            except asyncio.CancelledError:  # the client left (see _unless_gone)
                backend.in_flight -= 1
                raise
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                backend.in_flight -= 1
                backend.mark_down(f"unreachable ({type(exc).__name__})", time.monotonic())
                logger.warning("%s server %s unreachable: %r", pool.role, backend.url, exc)
                continue
            except httpx.HTTPError as exc:
                backend.in_flight -= 1
                if pool is self.prefill and dropped_connection(exc):
                    self._prefill_dropped(backend, headers, exc)
                    continue
                raise UpstreamError(502, f"{pool.role} server {backend.url} failed: {exc!r}", backend) from None
            backend.routed += 1
            backend.sent_since_report += 1
            if key is not None:  # it computes (and caches) the prompt now
                backend.index.insert(key.hashes)
                if pool is self.prefill or by_prefix_match:  # a choice made by prefix
                    self.metrics.prompt_blocks.inc(len(key.hashes))
                    self.metrics.matched_blocks.inc(choice.matched_blocks)
            return backend, resp
        raise UpstreamError(503, f"no healthy {pool.role} server ({pool.describe()})")

    def _prefill_dropped(self, backend: Backend, headers: dict, exc: httpx.HTTPError) -> None:
        """A prefill server closed the connection before its answer was read (it died, or was
        killed with the request on it): nothing reached the client yet and a prefill has no
        effect but its hold, so the leg is recomputed on another server (`_send` goes on to the
        next); this one is asked to end the request by id, in case it is alive, and health
        decides whether it is down (a dead one refuses the next connection at once)."""
        self.metrics.prefill_retries.inc()
        logger.warning("%s: prefill server %s dropped the connection (%r); recomputing the prefill elsewhere",
                       headers.get("X-Request-Id"), backend.url, exc)
        self._spawn(self.abort(backend, headers["X-Request-Id"]))

    async def _prefill_leg(self, path: str, body: dict, headers: dict, stream: bool, key: PromptKey | None):
        """`_send` to a prefill server, its answer read to the end (one token: a streamed answer
        is one event and [DONE], sent together once the token exists); a server that drops the
        connection before the end is left for another (`_prefill_dropped`)."""
        tried: set[str] = set()
        while True:
            backend, resp = await self._send(self.prefill, path, body, headers, stream, key, tried=tried)
            try:
                await resp.aread()
            except BaseException as exc:
                backend.in_flight -= 1
                await resp.aclose()
                if isinstance(exc, httpx.HTTPError) and dropped_connection(exc):
                    self._prefill_dropped(backend, headers, exc)
                    continue
                if isinstance(exc, httpx.HTTPError):
                    raise UpstreamError(502, f"prefill server {backend.url} failed: {exc!r}", backend) from None
                raise
            return backend, resp

    @staticmethod
    async def _unless_gone(request: Request, task: asyncio.Future, cancel: bool = True):
        """Await `task`, polling the client; if it disconnects raise ClientGone, cancelling the
        task first when `cancel` (closing the connection, which the server answers by aborting
        the request)."""
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                if cancel:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                        await task
                raise ClientGone

    async def abort(self, backend: Backend, request_id: str, transfer_token: str | None = None) -> None:
        """Ask `backend` to end `request_id`: with the token the prefill issued, its hold is
        released; by id alone, an unfinished request is aborted (a finished hold is not)."""
        body = {"transfer_token": transfer_token} if transfer_token else None
        with contextlib.suppress(httpx.HTTPError):
            await self.client.post(f"{backend.url}/v1/abort/{request_id}", json=body, timeout=5.0)
        self.metrics.prefill_aborts.labels("token" if transfer_token else "id").inc()

    def _spawn(self, coro) -> None:
        """Run a clean-up that must finish even though its request handler returns now."""
        task = asyncio.ensure_future(coro)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _release_abandoned_prefill(self, leg: asyncio.Future, request_id: str) -> None:
        """The client left during the prefill leg. Cancelling the leg could lose the params
        (and token) of a prefill that had just finished, leaving its blocks held until the
        lease, and an abort by id could end another client's request that uses the same id
        (ours may be the one refused with a 409): read the leg's answer (one token, or the
        leg's time-out) and release exactly the hold it reports."""
        try:
            prefill, resp = await leg
        except UpstreamError as exc:
            if exc.backend is not None:  # timed out: as in `_route`
                await self.abort(exc.backend, request_id)
            return
        prefill.in_flight -= 1
        params = prefill_params(prefill_answer(resp)) if resp.status_code == 200 else None
        if params is not None:
            await self.abort(prefill, request_id, transfer_token_of(params))

    async def route(self, request: Request, path: str) -> Response:
        response = await self._route(request, path)
        self.metrics.requests.labels(str(response.status_code)).inc()
        if response.status_code >= 500:  # ours, or a backend's: say which and why (error class, message)
            logger.warning("%s: %d %s", request.headers.get("x-request-id", "(no id)"), response.status_code,
                           bytes(getattr(response, "body", b""))[:1000].decode(errors="replace"))
        return response

    async def _route(self, request: Request, path: str) -> Response:
        try:
            body = json.loads(await request.body())
        except ClientDisconnect:  # left while sending its body: nothing was started
            return Response(status_code=499)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error_json(400, f"request body is not valid JSON: {exc}", "invalid_request_error")
        if not isinstance(body, dict):
            return error_json(400, "request body must be a JSON object", "invalid_request_error")
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        if not REQUEST_ID_RE.match(request_id):
            return error_json(400, "X-Request-Id must be 1-128 characters of [A-Za-z0-9._:-]", "invalid_request_error")
        if not any(b.healthy for b in self.decode.backends):  # do not prefill for nobody
            return error_json(503, f"no healthy decode server ({self.decode.describe()})")
        key = self._key(body)
        stream = bool(body.get("stream"))
        live = self.decode.live()
        decode_match = max((b.index.match(key.hashes) for b in live), default=0) if key is not None else 0
        if colocate(key, decode_match, self.config.colocate_below):
            self.metrics.paths.labels("colocated").inc()
            return await self._colocated(request, path, body, {"X-Request-Id": request_id, PATH_HEADER: "colocated"},
                                         stream, key)
        self.metrics.paths.labels("disaggregated").inc()
        headers = {"X-Request-Id": request_id, PATH_HEADER: "disaggregated"}
        first_streamed = stream and self.first_token == "prefill"  # the prefill's event goes to the client
        prefill_body = body | {"max_tokens": 1, "stream": first_streamed,
                               "kv_transfer_params": {"do_remote_decode": True}}
        prefill_body.pop("stream_options", None)
        if "max_completion_tokens" in body:
            prefill_body["max_completion_tokens"] = 1
        leg = asyncio.ensure_future(self._prefill_leg(path, prefill_body, headers, first_streamed, key))
        try:
            prefill, resp = await self._unless_gone(request, leg, cancel=False)
        except UpstreamError as exc:
            if exc.backend is not None:  # e.g. timed out: the prefill may still run or hold blocks
                await self.abort(exc.backend, request_id)
            return error_json(exc.status, exc.message)
        except ClientGone:
            self._spawn(self._release_abandoned_prefill(leg, request_id))
            return Response(status_code=499)
        prefill.in_flight -= 1
        if resp.status_code != 200:  # it holds nothing for us (and a 409 names another client's request)
            return passthrough_error(resp, f"prefill server {prefill.url}")
        answer = prefill_answer(resp)
        params = prefill_params(answer)
        if params is None:
            await self.abort(prefill, request_id)  # its answer is unreadable: end what may still run
            return error_json(502, f"prefill server {prefill.url} returned no readable kv_transfer_params "
                                   f"({resp.text[:200]!r})")
        token = transfer_token_of(params)
        complete = self.first_token == "prefill" and completed_by_first_token(body, answer)
        if first_streamed:
            return StreamingResponse(self._stream_from_first(answer, complete, path, body, headers, prefill, params, key),
                                     media_type="text/event-stream", headers=headers)
        if complete:  # nothing for a decode side to do: answer from the prefill, release its hold
            await self.abort(prefill, request_id, token)
            return JSONResponse(answer | {"kv_transfer_params": None}, headers=headers)

        return await self._decode_leg(request, path, body | {"kv_transfer_params": params}, headers, prefill, token,
                                      key)

    def _key(self, body: dict) -> PromptKey | None:
        """The prompt's key, when routing uses one (prefix-aware policy or colocation)."""
        if self.prefill.policy != "prefix_aware" and self.config.colocate_below == 0:
            return None
        return prompt_key(body, self.config.block_size, self.tokenizer)

    async def _colocated(self, request: Request, path: str, body: dict, headers: dict, stream: bool,
                         key: PromptKey | None) -> Response:
        """The decode server alone serves the request as a colocated server would (its prompt is
        short, or its prefix is cached there): the client's body as is, its answer relayed."""
        body = {k: v for k, v in body.items() if k != "kv_transfer_params"}
        try:
            decode, resp = await self._unless_gone(
                request, asyncio.ensure_future(self._send(self.decode, path, body, headers, stream, key, True)))
        except UpstreamError as exc:
            return error_json(exc.status, exc.message)
        except ClientGone:
            return Response(status_code=499)
        if resp.status_code != 200 or not stream:
            decode.in_flight -= 1
            try:
                await resp.aread()
            finally:
                await resp.aclose()
            if resp.status_code != 200:
                return passthrough_error(resp, f"decode server {decode.url}")
            return Response(resp.content, media_type="application/json", headers=headers)
        return StreamingResponse(self._relay_colocated(decode, resp), media_type="text/event-stream", headers=headers)

    async def _relay_colocated(self, decode: Backend, resp: httpx.Response) -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            decode.mark_down(f"failed mid-stream ({type(exc).__name__})", time.monotonic())
            yield error_event(502, f"decode server {decode.url} failed mid-stream: {exc!r}", "upstream_error")
            yield DONE_EVENT
        finally:
            decode.in_flight -= 1
            with anyio.CancelScope(shield=True):
                await resp.aclose()

    async def _decode_leg(self, request: Request, path: str, decode_body: dict, headers: dict, prefill: Backend,
                          token: str | None, key: PromptKey | None) -> Response:
        """The decode leg whose answer is the client's (not streamed, or `decode` mode)."""
        request_id, stream = headers["X-Request-Id"], bool(decode_body.get("stream"))
        try:
            decode, resp = await self._unless_gone(
                request, asyncio.ensure_future(self._send(self.decode, path, decode_body, headers, stream, key)))
        except (UpstreamError, ClientGone) as exc:
            # Nobody will read the prefill's blocks now (or the decode side already did).
            await self.abort(prefill, request_id, token)
            if isinstance(exc, ClientGone):
                return Response(status_code=499)
            return error_json(exc.status, exc.message)
        if resp.status_code != 200 or not stream:
            decode.in_flight -= 1
            await resp.aread()
            if resp.status_code != 200:
                await self.abort(prefill, request_id, token)
                return passthrough_error(resp, f"decode server {decode.url}")
            if self._unread(resp.content):
                await self.abort(prefill, request_id, token)
            return Response(resp.content, media_type="application/json", headers=headers)
        return StreamingResponse(self._relay(lambda: ready(decode, resp), prefill, request_id, token),
                                 media_type="text/event-stream", headers=headers)

    def _stream_from_first(self, answer: dict, complete: bool, path: str, body: dict, headers: dict,
                           prefill: Backend, params: dict, key: PromptKey | None) -> AsyncIterator[bytes]:
        """The client's stream in `prefill` mode: the prefill's event (t1) as a continuing chunk,
        then either a final chunk (t1 completed the request; the hold is released) or the decode
        leg's stream, which starts after t1."""
        request_id, token = headers["X-Request-Id"], transfer_token_of(params)
        first = sse_event(continuing(answer))
        if complete:
            return self._finish_after_first([first, sse_event(final_after(answer)), DONE_EVENT], prefill, request_id,
                                            token)
        decode_body = body | {"kv_transfer_params": params | {"first_token_streamed": True}}
        return self._relay(lambda: self._send(self.decode, path, decode_body, headers, True, key), prefill, request_id,
                           token, lead=first)

    async def _finish_after_first(self, events: list[bytes], prefill: Backend, request_id: str,
                                  token: str | None) -> AsyncIterator[bytes]:
        try:
            for event in events:
                yield event
        finally:  # also when the client left: nobody reads the prefill's blocks
            with anyio.CancelScope(shield=True):
                await self.abort(prefill, request_id, token)

    def _unread(self, payload: bytes) -> bool:
        """Whether a decode answer (or its final event) says nobody may have read the prefill's
        blocks, so the proxy releases them now rather than leave them to the lease: its KV was
        recomputed locally (`kv_transfer_stats.recomputed`; counted, so a broken transfer path
        never passes as healthy), the prefill's first token already finished it so nothing was
        pulled (`kv_transfer_stats.unread`), or it was aborted (finish_reason "abort", perhaps
        before its pull started). Releasing one that was read is harmless: a hold pinned by its
        reader is released only after its ReadDone or pin, one already freed answers "unknown"."""
        if b'"recomputed"' not in payload and b'"unread"' not in payload and b'"abort"' not in payload:
            return False
        try:
            answer = json.loads(payload)
            stats = answer.get("kv_transfer_stats") or {}
            recomputed, unread = stats.get("recomputed") is True, stats.get("unread") is True
            aborted = any(c.get("finish_reason") == "abort" for c in answer.get("choices") or ())
        except (ValueError, AttributeError):
            return False
        if recomputed:
            self.metrics.recomputed.inc()
        return recomputed or unread or aborted

    async def _relay(self, decode_leg: Callable[[], Awaitable[tuple[Backend, httpx.Response]]], prefill: Backend,
                     request_id: str, token: str | None, lead: bytes = b"") -> AsyncIterator[bytes]:
        """Stream `lead` (what the client is due already), then the decode leg's stream; once the
        client's stream has started, a failure becomes an error event and [DONE]. The prefill's
        hold is released unless the decode leg completed and read it."""
        completed, unread, pending, decode, resp = False, False, b"", None, None
        try:
            if lead:
                yield lead
            decode, resp = await decode_leg()
            if resp.status_code != 200:
                await resp.aread()
                yield error_event(*upstream_error(resp, f"decode server {decode.url}"))
                yield DONE_EVENT
                return
            async for chunk in resp.aiter_raw():
                yield chunk
                # Scan whole events for the final one's kv_transfer_stats; chunks may split them.
                *events, pending = (pending + chunk).split(b"\n\n")
                for event in events:
                    if event.startswith(b"data: {"):
                        unread |= self._unread(event[6:])
            completed = True
        except UpstreamError as exc:  # the decode leg was not taken (no server, connection failed)
            yield error_event(exc.status, exc.message)
            yield DONE_EVENT
        except httpx.HTTPError as exc:
            decode.mark_down(f"failed mid-stream ({type(exc).__name__})", time.monotonic())
            message = f"decode server {decode.url} failed mid-stream: {exc!r}"
            logger.warning("%s: %s", request_id, message)
            yield error_event(502, message, "upstream_error")
            yield DONE_EVENT
        finally:
            if decode is not None:
                decode.in_flight -= 1
            # Also runs when the client disconnected (cancellation): shield the clean-up.
            with anyio.CancelScope(shield=True):
                if resp is not None:
                    await resp.aclose()
                if unread or not completed:  # nobody read (or will read) the prefill's blocks
                    await self.abort(prefill, request_id, token)

    async def models(self) -> Response:
        pool = self.decode if any(b.healthy for b in self.decode.backends) else self.prefill
        backend = pool.pick(set())
        if backend is None:
            return error_json(503, f"no healthy server ({self.decode.describe()})")
        try:
            r = await self.client.get(f"{backend.url}/v1/models", timeout=5.0)
        except httpx.HTTPError as exc:
            return error_json(502, f"{backend.url} failed: {exc!r}")
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    def status(self) -> JSONResponse:
        ok = all(any(b.healthy for b in p.backends) for p in (self.prefill, self.decode))
        body = {"status": "ok" if ok else "unavailable", "health_rounds": self.fleet.rounds,
                "dropped": self.fleet.dropped, "kv_recomputed": int(self.metrics.recomputed._value.get())}
        body |= self.fleet.view()
        return JSONResponse(body, status_code=200 if ok else 503)
