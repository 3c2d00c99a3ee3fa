"""The proxy's backends: one server's state (health, load) and a pool of one role's servers,
with their /health checks.

Health is whether a backend can serve, not how busy it is: a refused connection or a 503 marks
it down at once, a slow /health answer only after several in a row (a server's /health does not
wait for its engine, so slowness means a starved host, not a long step).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import httpx

SLOW_CHECKS_TO_FAIL = 3  # consecutive timed-out /health checks before a backend is marked down


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



async def check_backend(client: httpx.AsyncClient, backend: Backend, timeout_s: float) -> None:
    """One /health check of `backend`, its verdict written into it."""
    try:
        r = await client.get(f"{backend.url}/health", timeout=timeout_s)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        backend.healthy, backend.problem = False, f"unreachable ({type(exc).__name__})"
    except httpx.TimeoutException:
        backend.slow_checks += 1
        if backend.slow_checks >= SLOW_CHECKS_TO_FAIL:
            backend.healthy = False
            backend.problem = (f"/health did not answer within {timeout_s:g}s "
                               f"{backend.slow_checks} times in a row")
        return
    except httpx.HTTPError as exc:
        backend.healthy, backend.problem = False, f"unreachable ({type(exc).__name__})"
    else:
        backend.healthy = r.status_code == 200
        backend.problem = "ok" if backend.healthy else f"/health returned {r.status_code}: {r.text[:200]}"
    backend.slow_checks = 0
