"""The proxy's servers over time: the background round (health checks, load reads, dropping the
dead), servers added and removed at run time (flags, or the admin endpoint), and the /health
view of both pools. Nothing here runs on a request's path.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

import httpx

from kvxfer.entrypoints.prefix_index import PrefixIndex
from kvxfer.entrypoints.proxy_policy import DEFAULT_BALANCE, DEFAULT_MAX_AGE_S, Pool
from kvxfer.entrypoints.proxy_pool import (
    DEFAULT_INDEX_BLOCKS,
    Backend,
    check_backend,
    read_load,
)

ROLES = ("prefill", "decode")
DEFAULT_DROP_AFTER_S = 120.0  # a server down this long leaves its pool (0: never)


@dataclass(frozen=True)
class FleetConfig:
    policy: str
    health_interval_s: float
    health_timeout_s: float
    balance: int = DEFAULT_BALANCE
    load_max_age_s: float = DEFAULT_MAX_AGE_S
    index_blocks: int = DEFAULT_INDEX_BLOCKS
    drop_after_s: float = DEFAULT_DROP_AFTER_S


class Fleet:
    def __init__(self, prefill: list[str], decode: list[str], config: FleetConfig, client: httpx.AsyncClient):
        self.config = config
        self.client = client
        self.prefill = Pool("prefill", [], config.policy, config.balance, config.load_max_age_s)
        self.decode = Pool("decode", [], config.policy, config.balance, config.load_max_age_s)
        self.rounds = 0  # completed rounds of checks, shown in /health
        self.dropped = 0  # servers dropped after being down `drop_after_s`
        for url in prefill:
            self._add(self.prefill, url)
        for url in decode:
            self._add(self.decode, url)

    def pool(self, role: str) -> Pool:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        return self.prefill if role == "prefill" else self.decode

    def _add(self, pool: Pool, url: str) -> Backend:
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        existing = pool.find(url)
        if existing is not None:
            return existing
        backend = Backend(url, index=PrefixIndex(self.config.index_blocks))
        pool.backends.append(backend)
        return backend

    async def add(self, role: str, url: str) -> Backend:
        """Add a server (or return the one with that URL) and check it at once, so it serves
        from now if it is up."""
        backend = self._add(self.pool(role), url)
        await self._check(backend)
        return backend

    def remove(self, role: str, url: str) -> bool:
        """Take a server out of its pool; requests in flight on it finish (or fail) as they would."""
        pool = self.pool(role)
        backend = pool.find(url.rstrip("/"))
        if backend is None:
            return False
        pool.backends.remove(backend)
        backend.mark_down("removed", time.monotonic())
        return True

    async def _check(self, backend: Backend) -> None:
        await check_backend(self.client, backend, self.config.health_timeout_s)
        if backend.healthy:
            await read_load(self.client, backend, self.config.health_timeout_s)

    async def check_round(self) -> None:
        """Check every server's health, read the load of those up, drop those down too long."""
        await asyncio.gather(*(self._check(b) for b in self.prefill.backends + self.decode.backends))
        if self.config.drop_after_s > 0:
            now = time.monotonic()
            for pool in (self.prefill, self.decode):
                dead = [b for b in pool.backends
                        if b.down_since is not None and now - b.down_since >= self.config.drop_after_s]
                for b in dead:
                    pool.backends.remove(b)
                self.dropped += len(dead)
        self.rounds += 1

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            await self.check_round()

    def view(self) -> dict:
        """Both pools as /health shows them."""
        now = time.monotonic()

        def one(b: Backend) -> dict:
            load = None if b.load is None else {
                "age_s": round(now - b.load.at, 1), **asdict(b.load.load)}
            return {"url": b.url, "healthy": b.healthy, "in_flight": b.in_flight, "status": b.problem,
                    "routed": b.routed, "index_blocks": len(b.index), "load": load}

        return {p.role: [one(b) for b in p.backends] for p in (self.prefill, self.decode)}
