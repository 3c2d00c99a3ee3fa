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

Modules: `proxy` (this: the app, flags, main), `proxy_router` (the legs and the relay),
`proxy_relay` (payload helpers), `proxy_pool` (backends, health).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.responses import Response

from kvxfer.entrypoints import http_server
from kvxfer.entrypoints.proxy_pool import SLOW_CHECKS_TO_FAIL, Backend, Pool  # noqa: F401 (re-exported)
from kvxfer.entrypoints.proxy_relay import upstream_error as _upstream_error  # noqa: F401 (tests)
from kvxfer.entrypoints.proxy_router import FIRST_TOKEN_MODES, UPSTREAM_IDLE_S, Router  # noqa: F401


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
