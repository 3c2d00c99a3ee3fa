"""P/D proxy router: prefill leg on one server, decode leg (streamed through) on another.

For each request: the prefill leg (max_tokens=1, not streamed, `do_remote_decode`) returns the
`kv_transfer_params` the decode leg needs; both legs carry one X-Request-Id. Backends are
health-checked in the background and on every failed connection; a failure after a successful
prefill aborts the prefill request on its server so its held blocks are freed at once.

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
                 health_interval_s: float, health_timeout_s: float):
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
        params = _prefill_params(resp) if resp.status_code == 200 else None
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

        prefill_body = body | {"max_tokens": 1, "stream": False, "kv_transfer_params": {"do_remote_decode": True}}
        prefill_body.pop("stream_options", None)
        if "max_completion_tokens" in body:
            prefill_body["max_completion_tokens"] = 1
        leg = asyncio.ensure_future(self._send(self.prefill, path, prefill_body, headers, stream=False))
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
        params = _prefill_params(resp)
        if params is None:
            await self.abort(prefill, request_id)  # its answer is unreadable: end what may still run
            return error_json(502, f"prefill server {prefill.url} returned no readable kv_transfer_params "
                                   f"({resp.text[:200]!r})")
        token = _token(params)

        decode_body = body | {"kv_transfer_params": params}
        stream = bool(body.get("stream"))
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
        return StreamingResponse(self._relay(resp, prefill, decode, request_id, token),
                                 media_type="text/event-stream", headers=headers)

    def _unread(self, payload: bytes) -> bool:
        """Whether a decode answer (or its final event) says nobody may have read the prefill's
        blocks, so the proxy releases them now rather than leave them to the lease: its KV was
        recomputed locally (`kv_transfer_stats.recomputed`; counted, so a broken transfer path
        never passes as healthy), or it was aborted (finish_reason "abort", perhaps before its
        pull started). Releasing one that was read is harmless: a hold pinned by its reader
        is released only after its ReadDone or pin, one already freed answers "unknown"."""
        if b'"recomputed"' not in payload and b'"abort"' not in payload:
            return False
        try:
            answer = json.loads(payload)
            recomputed = (answer.get("kv_transfer_stats") or {}).get("recomputed") is True
            aborted = any(c.get("finish_reason") == "abort" for c in answer.get("choices") or ())
        except (ValueError, AttributeError):
            return False
        if recomputed:
            self.metrics.recomputed.inc()
        return recomputed or aborted

    async def _relay(self, resp: httpx.Response, prefill: Backend, decode: Backend, request_id: str,
                     token: str | None):
        completed, unread, pending = False, False, b""
        try:
            async for chunk in resp.aiter_raw():
                yield chunk
                # Scan whole events for the final one's kv_transfer_stats; chunks may split them.
                *events, pending = (pending + chunk).split(b"\n\n")
                for event in events:
                    if event.startswith(b"data: {"):
                        unread |= self._unread(event[6:])
            completed = True
        except httpx.HTTPError as exc:
            decode.healthy, decode.problem = False, f"failed mid-stream ({type(exc).__name__})"
            message = f"decode server {decode.url} failed mid-stream: {exc!r}"
            logger.warning("%s: %s", request_id, message)
            payload = {"error": {"message": message, "type": "upstream_error", "code": 502}}
            yield f"data: {json.dumps(payload)}\n\n".encode()
        finally:
            decode.in_flight -= 1
            # Also runs when the client disconnected (cancellation): shield the clean-up.
            with anyio.CancelScope(shield=True):
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


def _prefill_params(resp: httpx.Response) -> dict | None:
    """The `kv_transfer_params` object of a prefill answer, or None when there is none or the
    body is not a JSON object."""
    try:
        params = resp.json().get("kv_transfer_params")
    except (ValueError, AttributeError):
        return None
    return params if isinstance(params, dict) else None


def _token(params: dict) -> str | None:
    token = params.get("transfer_token")
    return token if isinstance(token, str) else None


def _passthrough_error(resp: httpx.Response, who: str) -> Response:
    if 400 <= resp.status_code < 500:  # the client's request was bad: pass the server's answer on
        return Response(resp.content, status_code=resp.status_code, media_type="application/json")
    try:
        detail = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        detail = resp.text[:500]
    return error_json(502, f"{who} returned {resp.status_code}: {detail}")


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
    parser.add_argument("--log-level", default="info")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    router = Router(args.prefill, args.decode, args.policy, args.request_timeout, args.health_interval,
                    args.health_timeout)
    http_server.run(build_app(router), args.host, args.port, args.log_level)
    return 0
