"""kill -9 under load: a prefill server, a decode server and the proxy SIGKILLed (whole process
group, TP workers included) while requests run. Every request ends (output or error) within
its time-out, the survivors stay healthy and their pools drain (held blocks of a dead reader
go by release or lease), and a restarted proxy serves again."""

from __future__ import annotations

import asyncio
import random

import httpx
from faults_helpers import Tally, drive, make_plans
from serving_helpers import Cluster, wait_all_blocks_free

LEASE_S = 8
LOAD = {"plain": 0.8, "leave": 0.2}


async def _load_with_kill(proxy_url: str, decode_urls: list[str], plans, victim, after: int):
    """Run `plans`; SIGKILL `victim` once `after` requests have ended, so the others are in
    flight or still to come (a random moment under load, not after it)."""
    tally = Tally()

    async def kill_when_loaded() -> None:
        while sum(tally.outcomes.values()) < after:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(victim.kill)

    killer = asyncio.ensure_future(kill_when_loaded())
    await drive(proxy_url, decode_urls, plans, concurrency=12, tally=tally)
    await killer
    assert sum(tally.outcomes.values()) == len(plans)
    return tally


def test_kill_9_prefill_decode_and_proxy_under_load(tiny_qwen3, tmp_path):
    rng = random.Random(7)
    cluster = Cluster(tiny_qwen3, tmp_path)
    try:
        prefill = [cluster.server(f"prefill{i}", "prefill", 1, "--kv-lease-seconds", str(LEASE_S))
                   for i in range(2)]
        decode = [cluster.server(f"decode{i}", "decode", 1, "--kv-transfer-timeout", "5",
                                 "--kv-handshake-timeout", "5") for i in range(2)]
        proxy = cluster.proxy(prefill, decode, "--health-interval", "0.5")
        cluster.wait_healthy()
        figures = {}
        for step, victim in enumerate((prefill[0], decode[0])):
            plans = make_plans(40, seed=10 + step, kinds=LOAD)
            tally = asyncio.run(_load_with_kill(proxy.url, [d.url for d in decode], plans, victim,
                                                rng.randint(3, 20)))
            assert not tally.hung, f"requests never ended after killing {victim.name}: {tally.hung}"
            assert not victim.alive()
            figures[victim.name] = (dict(tally.outcomes), round(tally.seconds, 1))
        survivors = [prefill[1], decode[1]]
        for s in survivors:
            wait_all_blocks_free(s.url, timeout_s=LEASE_S + 60)
            assert httpx.get(f"{s.url}/health", timeout=30).status_code == 200
        # The proxy routes around the dead: new requests complete.
        r = httpx.post(f"{proxy.url}/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2}, timeout=120)
        assert r.status_code == 200, r.text

        # Now the proxy itself dies under load: clients get errors at once, servers drain.
        plans = make_plans(40, seed=20, kinds=LOAD)
        tally = asyncio.run(_load_with_kill(proxy.url, [d.url for d in survivors[1:]], plans, proxy,
                                            rng.randint(3, 20)))
        assert not tally.hung, f"requests never ended after killing the proxy: {tally.hung}"
        figures["proxy"] = (dict(tally.outcomes), round(tally.seconds, 1))
        for s in survivors:
            wait_all_blocks_free(s.url, timeout_s=LEASE_S + 60)
        again = cluster.proxy(survivors[:1], survivors[1:])
        again.wait_healthy(180)
        r = httpx.post(f"{again.url}/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2}, timeout=120)
        assert r.status_code == 200, r.text
        print(f"\nkill -9 figures (outcomes, seconds): {figures}")
    finally:
        cluster.stop()
