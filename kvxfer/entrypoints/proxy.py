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

Routing (`--policy prefix_aware`, `--colocate-below`): see `proxy_policy`; servers come and go
through `proxy_fleet` (health, load reads, drop after `--drop-after`, the admin endpoint).

Modules: `proxy` (this: the app, flags, main), `proxy_router` (the legs and the relay),
`proxy_relay` (payload helpers), `proxy_policy` (which server, which path), `proxy_fleet`
(servers over time), `proxy_pool` (one server's state and reads), `proxy_prompt` (a request's
prompt key), `prefix_index` (chained block hashes, per-server LRU index).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kvxfer.entrypoints import http_server
from kvxfer.entrypoints.proxy_fleet import DEFAULT_DROP_AFTER_S, FleetConfig
from kvxfer.entrypoints.proxy_policy import (  # noqa: F401
    DEFAULT_BALANCE,
    DEFAULT_MAX_AGE_S,
    POLICIES,
    Pool,
)
from kvxfer.entrypoints.proxy_pool import (  # noqa: F401
    DEFAULT_INDEX_BLOCKS,
    SLOW_CHECKS_TO_FAIL,
    Backend,
)
from kvxfer.entrypoints.proxy_prompt import load_tokenizer
from kvxfer.entrypoints.proxy_relay import error_json
from kvxfer.entrypoints.proxy_relay import upstream_error as _upstream_error  # noqa: F401 (tests)
from kvxfer.entrypoints.proxy_router import (  # noqa: F401 (UPSTREAM_IDLE_S: tests)
    DEFAULT_BLOCK_SIZE,
    DEFAULT_COLOCATE_BELOW,
    FIRST_TOKEN_MODES,
    UPSTREAM_IDLE_S,
    Router,
    RouterConfig,
)


class ServerChange(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST/DELETE /admin/servers."""
    role: str
    url: str


def build_app(router: Router, admin_token: str | None = None) -> FastAPI:


    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await router.check_health()
        task = asyncio.create_task(router.fleet.loop())
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

    async def server_change(request: Request) -> ServerChange | Response:
        """The change a caller holding the admin token asks for, or the error answer."""
        if admin_token is None:
            return error_json(404, "the admin endpoint is off (start the proxy with --admin-token)")
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {admin_token}".encode()):
            return error_json(401, "Authorization must be 'Bearer <the proxy's --admin-token>'", "auth_error")
        try:
            change = msgspec.json.decode(await request.body(), type=ServerChange)
            router.fleet.pool(change.role)
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            return error_json(400, f"bad server change ({{'role': 'prefill'|'decode', 'url': ...}}): {exc}",
                              "invalid_request_error")
        return change

    @app.post("/admin/servers")
    async def add_server(request: Request) -> Response:
        change = await server_change(request)
        if isinstance(change, Response):
            return change
        try:
            backend = await router.fleet.add(change.role, change.url)
        except ValueError as exc:
            return error_json(400, str(exc), "invalid_request_error")
        return JSONResponse({"role": change.role, "url": backend.url, "healthy": backend.healthy,
                             "status": backend.problem})

    @app.delete("/admin/servers")
    async def remove_server(request: Request) -> Response:
        change = await server_change(request)
        if isinstance(change, Response):
            return change
        if not router.fleet.remove(change.role, change.url):
            return error_json(404, f"no {change.role} server {change.url}", "invalid_request_error")
        return JSONResponse({"role": change.role, "url": change.url, "removed": True})

    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill", nargs="+", required=True, metavar="URL", help="prefill server base URLs")
    parser.add_argument("--decode", nargs="+", required=True, metavar="URL", help="decode server base URLs")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--policy", choices=POLICIES, default="round_robin",
                        help="prefix_aware: prefill by prefix match within --balance, decode by KV room and "
                             "running requests from the servers' /metrics (docs/architecture.md, proxy routing)")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                        help="the servers' KV block size in tokens: what one prefix-index entry covers")
    parser.add_argument("--tokenizer", default=None, metavar="NAME_OR_PATH",
                        help="HF tokenizer of the model, to index text prompts by token ids (without it text is "
                             "indexed by characters and token counts estimated)")
    parser.add_argument("--balance", type=int, default=DEFAULT_BALANCE,
                        help="in-flight requests the best prefix match may have above the least-loaded prefill server")
    parser.add_argument("--index-blocks", type=int, default=DEFAULT_INDEX_BLOCKS,
                        help="blocks a server's prefix index holds until its /metrics reports its KV pool size")
    parser.add_argument("--load-max-age", type=float, default=DEFAULT_MAX_AGE_S,
                        help="seconds a server's /metrics load report is used for decode selection")
    parser.add_argument("--colocate-below", type=int, default=DEFAULT_COLOCATE_BELOW,
                        help="serve a request on the decode server alone when fewer than this many of its prompt "
                             "tokens are uncached there (0: always disaggregate)")
    parser.add_argument("--drop-after", type=float, default=DEFAULT_DROP_AFTER_S,
                        help="seconds a server may stay down before it leaves its pool (0: never)")
    parser.add_argument("--admin-token", default=None,
                        help="enable POST/DELETE /admin/servers for callers sending 'Authorization: Bearer TOKEN'")
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
    fleet = FleetConfig(args.policy, args.health_interval, args.health_timeout, args.balance, args.load_max_age,
                        args.index_blocks, args.drop_after)
    config = RouterConfig(fleet, args.request_timeout, args.first_token, args.block_size, args.colocate_below)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    http_server.run(build_app(Router(args.prefill, args.decode, config, tokenizer), args.admin_token), args.host,
                    args.port, args.log_level)
    return 0
