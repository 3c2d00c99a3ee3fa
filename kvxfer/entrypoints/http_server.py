"""How kvxfer's HTTP servers (`kvxfer serve`, `kvxfer proxy`) run under uvicorn, and how long
they keep an idle connection open. uvicorn's "auto" event loop and HTTP parser are uvloop and
httptools when installed (they are dependencies: each proxied leg costs about 1 ms less)."""

from __future__ import annotations

# A server closes a keep-alive connection idle this long; its pooling clients must drop idle
# connections sooner (the proxy's pool: proxy.UPSTREAM_IDLE_S). Otherwise a request sent on a
# connection just as the server closes it fails without having reached it (a reset, or "Server
# disconnected without sending a response"), and a POST that may have been processed cannot be
# retried: with uvicorn's default (5 s) equal to httpx's pool expiry (5 s), each pooled
# connection reused after about 5 s idle raced the server's close and the proxy answered 502.
# 75 s, as nginx, is longer than the common clients' pool expiries (httpx 5 s, aiohttp 15 s).
KEEP_ALIVE_S = 75


def run(app, host: str, port: int, log_level: str) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), timeout_graceful_shutdown=5,
                timeout_keep_alive=KEEP_ALIVE_S)
