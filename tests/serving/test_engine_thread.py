"""The server's engine thread under long steps: a caller that gives up never kills the loop,
/health answers from published state while the engine is busy, and the proxy keeps a busy
server in rotation.

A long step is made deterministically by a command that blocks the engine thread on an event
(the thread is then exactly as unavailable as during a long step), released by the test.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from serving_helpers import STARTUP_S, Cluster, InProcessServer, wait_all_blocks_free

from kvxfer.engine import EngineConfig, LLMEngine
from kvxfer.engine.sampling_params import SamplingParams
from kvxfer.entrypoints.async_engine import AsyncEngine

GATE_S = 120.0  # upper bound on any block, so a failing test cannot hang the engine thread


def _blocker(gate: threading.Event, entered: threading.Event):
    def block(engine):
        entered.set()
        gate.wait(GATE_S)
        return "done"

    return block


async def _collect(stream) -> list[int]:
    output = await stream.next()
    while not output.finished:
        output = await stream.next()
    stream.close()
    return list(output.output_token_ids)


def test_callers_that_give_up_never_kill_the_engine_loop(tiny_qwen3):
    engine = AsyncEngine(LLMEngine(EngineConfig(tiny_qwen3, num_kv_blocks=64)))
    engine.start()

    async def scenario():
        gate, entered = threading.Event(), threading.Event()
        try:
            # 1. A caller that times out while its command runs (cancel comes too late).
            with pytest.raises(asyncio.TimeoutError):
                await engine.call(_blocker(gate, entered), timeout_s=0.2)
            assert await asyncio.to_thread(entered.wait, 60)
            # 2. A caller that times out while its command waits behind a busy engine thread.
            with pytest.raises(asyncio.TimeoutError):
                await engine.call(lambda e: "late", timeout_s=0.2)
            # 3. An add whose handler is cancelled while queued: the engine never takes it.
            add = asyncio.ensure_future(engine.add_request("r1", [1, 2, 3], SamplingParams(max_tokens=2), None))
            while not engine.is_active("r1"):
                await asyncio.sleep(0.01)
            add.cancel()
            with pytest.raises(asyncio.CancelledError):
                await add
        finally:
            gate.set()
        # The loop survived all three and still serves; the cancelled add left nothing behind.
        assert await engine.call(lambda e: e.has_unfinished_requests(), timeout_s=60) is False
        assert engine.alive, engine.error
        stream = await engine.add_request("r1", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0), None)
        assert len(await _collect(stream)) == 2

    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert engine.error is None


class _SlowAddEngine(LLMEngine):
    """A real engine whose add_request blocks after taking the request, until released."""

    gate = threading.Event()
    entered = threading.Event()

    def add_request(self, *args, **kwargs):
        request = super().add_request(*args, **kwargs)
        self.entered.set()
        self.gate.wait(GATE_S)
        return request


def test_add_whose_caller_gives_up_while_it_runs_is_aborted(tiny_qwen3):
    """The engine took the request but nobody listens: it is aborted, not run to the end unseen."""
    llm = _SlowAddEngine(EngineConfig(tiny_qwen3, num_kv_blocks=64))
    engine = AsyncEngine(llm)
    engine.start()

    async def scenario():
        params = SamplingParams(max_tokens=1000, ignore_eos=True)
        add = asyncio.ensure_future(engine.add_request("r2", [1, 2, 3], params, None))
        try:
            assert await asyncio.to_thread(llm.entered.wait, 60)
            add.cancel()
            with pytest.raises(asyncio.CancelledError):
                await add
        finally:
            llm.gate.set()
        deadline = time.monotonic() + 60
        while await engine.call(lambda e: e.has_unfinished_requests(), timeout_s=60):
            assert time.monotonic() < deadline, "the abandoned request still runs"
            await asyncio.sleep(0.05)
        stats = await engine.call(lambda e: e.stats(), timeout_s=60)
        assert stats["num_free_blocks"] == stats["num_blocks"]

    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert engine.error is None


def _proxy_health(proxy_url: str) -> dict:
    r = httpx.get(f"{proxy_url}/health", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_busy_server_stays_healthy_and_in_the_proxy_rotation(tiny_qwen3, tmp_path):
    cluster = Cluster(tiny_qwen3, tmp_path)
    prefill = InProcessServer(tiny_qwen3, "prefill")
    gate, entered = threading.Event(), threading.Event()
    try:
        decode = cluster.server("decode", "decode")
        proxy = cluster.proxy([prefill], [decode], "--health-interval", "0.5")
        cluster.wait_healthy()
        body = {"prompt": [5, 6, 7, 8, 9], "max_tokens": 3, "temperature": 0.0, "return_token_ids": True}
        before = httpx.post(f"{proxy.url}/v1/completions", json=body, timeout=STARTUP_S).json()

        prefill.engine.submit_nowait(_blocker(gate, entered))  # the prefill engine is now "in a long step"
        assert entered.wait(60)
        r = httpx.get(f"{prefill.url}/health", timeout=30)
        assert r.status_code == 200, r.text
        # A request arrives while the engine is busy; the proxy must route it, not answer 503.
        result: dict = {}
        client = threading.Thread(target=lambda: result.update(
            r=httpx.post(f"{proxy.url}/v1/completions", json=body, timeout=STARTUP_S)))
        client.start()
        # Several rounds of the proxy's checks pass while the engine stays blocked.
        first = _proxy_health(proxy.url)["health_rounds"]
        while (h := _proxy_health(proxy.url))["health_rounds"] < first + 4:
            assert all(b["healthy"] for b in h["prefill"]), h
            time.sleep(0.1)
        assert not gate.is_set() and client.is_alive()  # still inside the "long step"
        gate.set()
        client.join(STARTUP_S)
        assert result["r"].status_code == 200, result["r"].text
        assert result["r"].json()["choices"][0]["token_ids"] == before["choices"][0]["token_ids"]
        wait_all_blocks_free(prefill.url)
    finally:
        gate.set()
        cluster.stop()
        prefill.stop()
