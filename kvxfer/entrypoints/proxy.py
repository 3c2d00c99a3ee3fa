"""P/D proxy router: prefill leg on one server, decode leg (streamed through) on another.

For each request: the prefill leg (max_tokens=1, `do_remote_decode`) computes the prompt,
samples the first token (t1) and returns the `kv_transfer_params` the decode leg needs (they
carry t1); both legs carry one X-Request-Id. With `--first-token prefill` (the default) a
streamed request's prefill leg is streamed too, and its event (t1) is the client's first chunk
at once; the decode leg (`first_token_streamed`: its stream starts after t1) pulls the prompt's
KV, computes t1's position and continues, so the pull and the decode leg's hops land between
t1 and t2, not before t1. A request that t1 already completes (the prefill stopped, or the
client asked one token) is answered from the prefill alone and its hold released. With
`--first-token decode` the decode leg's answer is relayed as is (t1 included, as a vLLM-style
backend answers). Backends are health-checked in the background and on every failed
connection; a failure after a successful prefill releases the prefill's held blocks at once.

Health is whether a backend can serve, not how busy it is: a refused connection or a 503 marks
it down at once, a slow /health answer only after several in a row (a server's /health does not
wait for its engine, so slowness means a starved host, not a long step).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from kvxfer.entrypoints import http_server
from kvxfer.entrypoints.metrics import ProxyMetrics
from kvxfer.entrypoints.protocol import REQUEST_ID_RE

logger = logging.getLogger("kvxfer.proxy")

DISCONNECT_POLL_S = 1.0
FIRST_TOKEN_MODES = ("prefill", "decode")
DONE_EVENT = b"data: [DONE]\n\n"
SLOW_CHECKS_TO_FAIL = 3  # consecutive timed-out /health checks before a backend is marked down
# The pool drops a connection idle this long, well before a backend closes it
# (http_server.KEEP_ALIVE_S, which says why), whatever a busy host delays.
UPSTREAM_IDLE_S = 30.0


@dataclass
class Backend:
    url: str
    healthy: bool = False
    in_flight: int = 0
    problem: str = "not checked yet"
    slow_checks: int = 0  # consecutive /health checks that timed out


@dataclass
class Pool:
    role: str
    backends: list[Backend]
    policy: str
    _turn: itertools.count = field(default_factory=itertools.count)

    def pick(self, exclude: set[str]) -> Backend | None:
        live = [b for b in self.backends if b.healthy and b.url not in exclude]
        if not live:
            return None
        if self.policy == "least_loaded":
            return min(live, key=lambda b: b.in_flight)
        return live[next(self._turn) % len(live)]

    def describe(self) -> str:
        return "; ".join(f"{b.url}: {b.problem}" for b in self.backends)


class ClientGone(Exception):
    """The client disconnected while a leg was in progress."""


class UpstreamError(Exception):
    def __init__(self, status: int, message: str, backend: Backend | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.backend = backend  # set when the request may have reached it


def error_json(status: int, message: str, kind: str = "proxy_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class Router:
    def __init__(self, prefill: list[str], decode: list[str], policy: str, request_timeout_s: float,
                 health_interval_s: float, health_timeout_s: float, first_token: str = "prefill"):
        if first_token not in FIRST_TOKEN_MODES:
            raise ValueError(f"first_token must be one of {FIRST_TOKEN_MODES}, got {first_token!r}")
        self.first_token = first_token  # who sends the client its first token (module docstring)
        self.prefill = Pool("prefill", [Backend(u.rstrip("/")) for u in prefill], policy)
        self.decode = Pool("decode", [Backend(u.rstrip("/")) for u in decode], policy)
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.health_rounds = 0  # completed rounds of checks, shown in /health
        timeout = httpx.Timeout(connect=5.0, read=request_timeout_s, write=30.0, pool=30.0)
        limits = httpx.Limits(max_connections=1000, keepalive_expiry=UPSTREAM_IDLE_S)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits)
        self.metrics = ProxyMetrics()
        self._cleanups: set[asyncio.Future] = set()

    async def check_health(self) -> None:
        async def one(backend: Backend) -> None:
            try:
                r = await self.client.get(f"{backend.url}/health", timeout=self.health_timeout_s)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                backend.healthy, backend.problem = False, f"unreachable ({type(exc).__name__})"
            except httpx.TimeoutException:
                backend.slow_checks += 1
                if backend.slow_checks >= SLOW_CHECKS_TO_FAIL:
                    backend.healthy = False
                    backend.problem = (f"/health did not answer within {self.health_timeout_s:g}s "
                                       f"{backend.slow_checks} times in a row")
                return
            except httpx.HTTPError as exc:
                backend.healthy, backend.problem = False, f"unreachable ({type(exc).__name__})"
            else:
                backend.healthy = r.status_code == 200
                backend.problem = "ok" if backend.healthy else f"/health returned {r.status_code}: {r.text[:200]}"
            backend.slow_checks = 0

        await asyncio.gather(*(one(b) for b in self.prefill.backends + self.decode.backends))
        self.health_rounds += 1

    async def health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_health()

    async def _send(self, pool: Pool, path: str, body: dict, headers: dict, stream: bool):
        """Send to a healthy backend; a backend that refuses the connection is marked down and
        the next one is tried. Returns (backend, response) with the backend's load counted."""
        tried: set[str] = set()
        while (backend := pool.pick(tried)) is not None:
            tried.add(backend.url)
            backend.in_flight += 1
            try:
                req = self.client.build_request("POST", f"{backend.url}{path}", json=body, headers=headers)
                return backend, await self.client.send(req, stream=stream)
            except asyncio.CancelledError:  # the client left (see _unless_gone)
                backend.in_flight -= 1
                raise
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                backend.in_flight -= 1
                backend.healthy, backend.problem = False, f"unreachable ({type(exc).__name__})"
                logger.warning("%s server %s unreachable: %r", pool.role, backend.url, exc)
            except httpx.HTTPError as exc:
                backend.in_flight -= 1
                raise UpstreamError(502, f"{pool.role} server {backend.url} failed: {exc!r}", backend) from None
        raise UpstreamError(503, f"no healthy {pool.role} server ({pool.describe()})")

    async def _prefill_leg(self, path: str, body: dict, headers: dict, stream: bool):
        """`_send` to a prefill server, its answer read to the end (one token: a streamed answer
        is one event and [DONE], sent together once the token exists)."""
        backend, resp = await self._send(self.prefill, path, body, headers, stream)
        try:
            await resp.aread()
        except BaseException as exc:
            backend.in_flight -= 1
            await resp.aclose()
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
        params = _prefill_params(_prefill_answer(resp)) if resp.status_code == 200 else None
        if params is not None:
            await self.abort(prefill, request_id, _token(params))

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
        headers = {"X-Request-Id": request_id}
        if not any(b.healthy for b in self.decode.backends):  # do not prefill for nobody
            return error_json(503, f"no healthy decode server ({self.decode.describe()})")

        stream = bool(body.get("stream"))
        first_streamed = stream and self.first_token == "prefill"  # the prefill's event goes to the client
        prefill_body = body | {"max_tokens": 1, "stream": first_streamed,
                               "kv_transfer_params": {"do_remote_decode": True}}
        prefill_body.pop("stream_options", None)
        if "max_completion_tokens" in body:
            prefill_body["max_completion_tokens"] = 1
        leg = asyncio.ensure_future(self._prefill_leg(path, prefill_body, headers, first_streamed))
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
            return _passthrough_error(resp, f"prefill server {prefill.url}")
        answer = _prefill_answer(resp)
        params = _prefill_params(answer)
        if params is None:
            await self.abort(prefill, request_id)  # its answer is unreadable: end what may still run
            return error_json(502, f"prefill server {prefill.url} returned no readable kv_transfer_params "
                                   f"({resp.text[:200]!r})")
        token = _token(params)
        complete = self.first_token == "prefill" and _completed_by_first_token(body, answer)
        if first_streamed:
            return StreamingResponse(self._stream_from_first(answer, complete, path, body, headers, prefill, params),
                                     media_type="text/event-stream", headers=headers)
        if complete:  # nothing for a decode side to do: answer from the prefill, release its hold
            await self.abort(prefill, request_id, token)
            return JSONResponse(answer | {"kv_transfer_params": None}, headers=headers)

        return await self._decode_leg(request, path, body | {"kv_transfer_params": params}, headers, prefill, token)

    async def _decode_leg(self, request: Request, path: str, decode_body: dict, headers: dict, prefill: Backend,
                          token: str | None) -> Response:
        """The decode leg whose answer is the client's (not streamed, or `decode` mode)."""
        request_id, stream = headers["X-Request-Id"], bool(decode_body.get("stream"))
        try:
            decode, resp = await self._unless_gone(
                request, asyncio.ensure_future(self._send(self.decode, path, decode_body, headers, stream)))
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
                return _passthrough_error(resp, f"decode server {decode.url}")
            if self._unread(resp.content):
                await self.abort(prefill, request_id, token)
            return Response(resp.content, media_type="application/json", headers=headers)
        return StreamingResponse(self._relay(lambda: _ready(decode, resp), prefill, request_id, token),
                                 media_type="text/event-stream", headers=headers)

    def _stream_from_first(self, answer: dict, complete: bool, path: str, body: dict, headers: dict,
                           prefill: Backend, params: dict) -> AsyncIterator[bytes]:
        """The client's stream in `prefill` mode: the prefill's event (t1) as a continuing chunk,
        then either a final chunk (t1 completed the request; the hold is released) or the decode
        leg's stream, which starts after t1."""
        request_id, token = headers["X-Request-Id"], _token(params)
        first = _event(_continuing(answer))
        if complete:
            return self._finish_after_first([first, _event(_final_after(answer)), DONE_EVENT], prefill, request_id,
                                            token)
        decode_body = body | {"kv_transfer_params": params | {"first_token_streamed": True}}
        return self._relay(lambda: self._send(self.decode, path, decode_body, headers, True), prefill, request_id,
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
                yield _error_event(*_upstream_error(resp, f"decode server {decode.url}"))
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
            yield _error_event(exc.status, exc.message)
            yield DONE_EVENT
        except httpx.HTTPError as exc:
            decode.healthy, decode.problem = False, f"failed mid-stream ({type(exc).__name__})"
            message = f"decode server {decode.url} failed mid-stream: {exc!r}"
            logger.warning("%s: %s", request_id, message)
            yield _error_event(502, message, "upstream_error")
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
        pools = {p.role: [{"url": b.url, "healthy": b.healthy, "in_flight": b.in_flight, "status": b.problem}
                          for b in p.backends] for p in (self.prefill, self.decode)}
        ok = all(any(b.healthy for b in p.backends) for p in (self.prefill, self.decode))
        body = {"status": "ok" if ok else "unavailable", "health_rounds": self.health_rounds,
                "kv_recomputed": int(self.metrics.recomputed._value.get())} | pools
        return JSONResponse(body, status_code=200 if ok else 503)


async def _ready(decode: Backend, resp: httpx.Response) -> tuple[Backend, httpx.Response]:
    return decode, resp


def _prefill_answer(resp: httpx.Response) -> dict | None:
    """A prefill answer read to its end: its JSON object, or a streamed one's first event; None
    when it is neither."""
    content = resp.content
    try:
        if content.startswith(b"data: "):
            content = content[6:].split(b"\n\n", 1)[0]
        answer = json.loads(content)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def _prefill_params(answer: dict | None) -> dict | None:
    """The `kv_transfer_params` object of a prefill answer, or None when there is none."""
    params = (answer or {}).get("kv_transfer_params")
    return params if isinstance(params, dict) else None


def _completed_by_first_token(body: dict, answer: dict) -> bool:
    """Whether the prefill's token completes the client's request: the prefill stopped (EOS), or
    the client asked for one token."""
    choices = answer.get("choices")
    stopped = isinstance(choices, list) and bool(choices) and isinstance(choices[0], dict) \
        and choices[0].get("finish_reason") == "stop"
    return stopped or (body.get("max_completion_tokens") or body.get("max_tokens")) == 1


def _continuing(event: dict) -> dict:
    """The prefill's (final) event as a chunk the stream continues after, as a colocated server
    sends it: no finish_reason and none of the final chunk's fields."""
    skip = ("usage", "kv_transfer_params", "kv_transfer_stats", "prompt_token_ids", "held_back_text")
    chunk = {k: v for k, v in event.items() if k not in skip}
    chunk["choices"] = [c | {"finish_reason": None} for c in event.get("choices") or ()]
    return chunk


def _final_after(event: dict) -> dict:
    """The final chunk after the prefill's event when its token completed the request: no new
    tokens, the text the prefill held back (what a colocated server flushes at the end: an
    incomplete character as U+FFFD), the prefill's finish_reason and usage."""
    flushed = event.get("held_back_text") or ""
    choices = []
    for c in event.get("choices") or ():
        rest = {"delta": {"content": flushed}} if "delta" in c else {"text": flushed}
        if "token_ids" in c:
            rest["token_ids"] = []
        choices.append(c | {"logprobs": None} | rest)
    final = {k: v for k, v in event.items() if k != "held_back_text"}
    return final | {"choices": choices, "kv_transfer_params": None}


def _event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def _error_event(status: int, message: str, kind: str = "proxy_error") -> bytes:
    return _event({"error": {"message": message, "type": kind, "code": status}})


def _upstream_error(resp: httpx.Response, who: str) -> tuple[int, str, str]:
    """(status, message, type) of a backend's error answer: a 4xx (the client's request was bad)
    keeps the server's own status and message; a 504 (the prefill's lease ran out before the
    decode's pull: KV failure kind "expired") stays a 504."""
    try:
        detail = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        detail = resp.text[:500]
    if 400 <= resp.status_code < 500:
        return resp.status_code, detail, "invalid_request_error"
    if resp.status_code == 504:
        return 504, f"{who} returned 504: {detail}", "proxy_error"
    return 502, f"{who} returned {resp.status_code}: {detail}", "proxy_error"


def _token(params: dict) -> str | None:
    token = params.get("transfer_token")
    return token if isinstance(token, str) else None


def _passthrough_error(resp: httpx.Response, who: str) -> Response:
    if 400 <= resp.status_code < 500:  # the client's request was bad: pass the server's answer on
        return Response(resp.content, status_code=resp.status_code, media_type="application/json")
    status, message, kind = _upstream_error(resp, who)
    return error_json(status, message, kind)


def build_app(router: Router) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await router.check_health()
        task = asyncio.create_task(router.health_loop())
        yield
        task.cancel()
        await router.client.aclose()

    app = FastAPI(title="kvxfer proxy", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await router.route(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await router.route(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models() -> Response:
        return await router.models()

    @app.get("/health")
    async def health() -> Response:
        return router.status()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(router.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill", nargs="+", required=True, metavar="URL", help="prefill server base URLs")
    parser.add_argument("--decode", nargs="+", required=True, metavar="URL", help="decode server base URLs")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--policy", choices=["round_robin", "least_loaded"], default="round_robin")
    parser.add_argument("--request-timeout", type=float, default=300.0,
                        help="seconds a backend may stay silent before the request fails")
    parser.add_argument("--health-interval", type=float, default=2.0, help="seconds between backend health checks")
    parser.add_argument("--health-timeout", type=float, default=10.0,
                        help=f"seconds a /health check may take; {SLOW_CHECKS_TO_FAIL} slow checks in a row mark "
                             "a backend down (a refused connection or a 503 does at once)")
    parser.add_argument("--first-token", choices=FIRST_TOKEN_MODES, default="prefill",
                        help="who sends a streamed client its first token: the prefill server, at once (the decode "
                             "server continues after it), or the decode server (its stream relayed as is)")
    parser.add_argument("--log-level", default="info")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    router = Router(args.prefill, args.decode, args.policy, args.request_timeout, args.health_interval,
                    args.health_timeout, args.first_token)
    http_server.run(build_app(router), args.host, args.port, args.log_level)
    return 0
