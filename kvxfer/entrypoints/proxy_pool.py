"""The proxy's backends: one server's state (health, load, prefix index) and the background
reads that keep it: /health checks and /metrics load reports.

Health is whether a backend can serve, not how busy it is: a refused connection or a 503 marks
it down at once, a slow /health answer only after several in a row (a server's /health does not
wait for its engine, so slowness means a starved host, not a long step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx

from kvxfer.entrypoints.prefix_index import PrefixIndex
from kvxfer.entrypoints.proxy_load import Load, parse_load

SLOW_CHECKS_TO_FAIL = 3  # consecutive timed-out /health checks before a backend is marked down
DEFAULT_INDEX_BLOCKS = 4096  # a server's index size until its /metrics says its pool size (--index-blocks)


@dataclass(frozen=True)
class LoadReport:
    """A server's load as its /metrics page said at `at` (monotonic seconds)."""
    at: float
    load: Load


@dataclass
class Backend:
    url: str
    healthy: bool = False
    in_flight: int = 0
    problem: str = "not checked yet"
    slow_checks: int = 0  # consecutive /health checks that timed out
    index: PrefixIndex = field(default_factory=lambda: PrefixIndex(DEFAULT_INDEX_BLOCKS))
    load: LoadReport | None = None  # the last /metrics read (None: never read, or no load gauges there)
    sent_since_report: int = 0  # requests this proxy sent it since `load` was read
    down_since: float | None = None  # monotonic time it was last marked down, None while healthy
    routed: int = 0  # requests sent to it

    def mark_down(self, problem: str, now: float) -> None:
        """Not to be picked; its index forgotten (a server that comes back has lost its cache)."""
        self.healthy, self.problem = False, problem
        if self.down_since is None:
            self.down_since = now
        self.index.clear()


async def check_backend(client: httpx.AsyncClient, backend: Backend, timeout_s: float) -> None:
    """One /health check of `backend`, its verdict written into it."""
    try:
        r = await client.get(f"{backend.url}/health", timeout=timeout_s)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        backend.mark_down(f"unreachable ({type(exc).__name__})", time.monotonic())
    except httpx.TimeoutException:
        backend.slow_checks += 1
        if backend.slow_checks >= SLOW_CHECKS_TO_FAIL:
            backend.mark_down(f"/health did not answer within {timeout_s:g}s {backend.slow_checks} times in a row",
                              time.monotonic())
        return
    except httpx.HTTPError as exc:
        backend.mark_down(f"unreachable ({type(exc).__name__})", time.monotonic())
    else:
        if r.status_code == 200:
            backend.healthy, backend.problem, backend.down_since = True, "ok", None
        else:
            backend.mark_down(f"/health returned {r.status_code}: {r.text[:200]}", time.monotonic())
    backend.slow_checks = 0


async def read_load(client: httpx.AsyncClient, backend: Backend, timeout_s: float) -> None:
    """Read `backend`'s /metrics into `backend.load` (in the background, never on a request's
    path) and size its index to its KV pool. A page without load gauges kvxfer or vLLM would
    write (`proxy_load`) leaves `load` as it was: routing then counts in-flight requests only."""
    try:
        r = await client.get(f"{backend.url}/metrics", timeout=timeout_s)
        if r.status_code != 200:
            return
        load = parse_load(r.text)
    except (httpx.HTTPError, ValueError):  # health decides whether it is down; this is only load
        return
    if load is None:
        return
    backend.load = LoadReport(time.monotonic(), load)
    backend.sent_since_report = 0
    backend.index.resize(load.num_blocks)
