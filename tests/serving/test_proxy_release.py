"""The proxy frees what a prefill leg holds however the request ends (finding 6), and never
acts on another client's request (a 409 leaves the holder alone).

The prefill server runs in this process behind a test wrapper of its ASGI app, which can hold
a prefill answer (the engine has finished and holds the blocks, the answer has not reached the
proxy) or replace it with a body that is not JSON; decode server and proxy are real processes.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import httpx
import pytest
from serving_helpers import STARTUP_S, Cluster, InProcessServer, metrics, wait_all_blocks_free, wait_metric

from kvxfer.ports import free_ports

GATE_S = 120.0
CLOSED_PORT = free_ports(1)[0]  # probed free, never bound: a side channel nobody serves
LEASE_S = 20  # far beyond a leg and a failed handshake, short enough to wait for once


class PrefillWrapper:
    """ASGI wrapper: in mode "hold" a /v1/completions answer waits for `gate` (after `ready`
    is set), in mode "garbage" it is replaced by a 200 whose body is not JSON, in mode
    "misdirect" its kv_transfer_params (in a JSON answer or a streamed one's event) name a
    side-channel port where nobody listens."""

    def __init__(self, app):
        self.app = app
        self.mode: str | None = None
        self.gate, self.ready = threading.Event(), threading.Event()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/completions" or self.mode is None:
            return await self.app(scope, receive, send)
        if self.mode == "garbage":
            async def swallow(message):
                pass

            await self.app(scope, receive, swallow)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/html")]})
            await send({"type": "http.response.body", "body": b"<html>upstream hiccup</html>"})
            return

        if self.mode == "misdirect":
            held: list[dict] = []

            async def rewrite(message):
                # A JSON answer (its length changes: the start waits for it) or a streamed one's
                # events, each in its own body message.
                if message["type"] == "http.response.start":
                    if any(k == b"content-length" for k, _ in message["headers"]):
                        held.append(message)
                        return
                    return await send(message)
                raw = message.get("body", b"")
                sse = raw.startswith(b"data: ")
                payload = raw[6:].strip() if sse else raw
                if payload.startswith(b"{"):
                    body = json.loads(payload)
                    if body.get("kv_transfer_params"):
                        body["kv_transfer_params"]["remote_port"] = CLOSED_PORT
                    raw = json.dumps(body).encode()
                    raw = b"data: " + raw + b"\n\n" if sse else raw
                if held:
                    headers = [(k, v) for k, v in held[0]["headers"] if k != b"content-length"]
                    await send(held.pop() | {"headers": headers + [(b"content-length", str(len(raw)).encode())]})
                await send(message | {"body": raw})

            return await self.app(scope, receive, rewrite)

        async def late(message):
            if message["type"] == "http.response.start":
                self.ready.set()
                await asyncio.to_thread(self.gate.wait, GATE_S)
            await send(message)

        await self.app(scope, receive, late)


@pytest.fixture(scope="module")
def setup(tiny_qwen3, tmp_path_factory):
    cluster = Cluster(tiny_qwen3, tmp_path_factory.mktemp("logs"))
    holder: list[PrefillWrapper] = []
    prefill = InProcessServer(tiny_qwen3, "prefill", "--kv-lease-seconds", str(LEASE_S),
                              wrap=lambda app: holder.append(PrefillWrapper(app)) or holder[0])
    try:
        # A decode's transfer time-out (+ the pin margin) must fit inside the prefill's lease.
        fit = ("--kv-transfer-timeout", str(LEASE_S // 2))
        decode = cluster.server("decode", "decode", 1, *fit)
        recompute = cluster.server("recompute", "decode", 1, "--kv-failure-policy", "recompute",
                                   "--kv-handshake-timeout", "2", *fit)
        proxy = cluster.proxy([prefill], [decode], "--health-interval", "0.5")
        recompute_proxy = cluster.proxy([prefill], [recompute], "--health-interval", "0.5")
        cluster.wait_healthy()
        yield prefill, holder[0], decode, proxy, recompute, recompute_proxy
    finally:
        holder[0].gate.set()
        cluster.stop()
        prefill.stop()


def _request(prompt: list[int], request_id: str) -> bytes:
    body = json.dumps({"prompt": prompt, "max_tokens": 4, "temperature": 0.0}).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
            b"X-Request-Id: " + request_id.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
            b"\r\n\r\n" + body)


def test_client_leaving_after_the_prefill_finished_releases_its_hold(setup):
    prefill, wrapper, decode, proxy, _, _ = setup
    wrapper.mode, wrapper.gate, wrapper.ready = "hold", threading.Event(), threading.Event()
    gone = metrics(proxy.url).get('kvxfer_proxy_requests_total{status="499"}', 0.0)
    try:
        with socket.create_connection(("127.0.0.1", int(proxy.url.rsplit(":", 1)[1])), timeout=30) as client:
            client.sendall(_request(list(range(1, 40)), "leaves-early"))
            # The prefill engine has finished (its blocks are held); its answer waits in the wrapper.
            assert wrapper.ready.wait(STARTUP_S)
        # The client has left. Once the proxy has noticed, the prefill answer may go out.
        wait_metric(proxy.url, 'kvxfer_proxy_requests_total{status="499"}', gone + 1, timeout_s=30)
    finally:
        wrapper.gate.set()
        wrapper.mode = None
    # Freed by the proxy's release, well before the lease would have.
    m = wait_all_blocks_free(prefill.url, timeout_s=LEASE_S - 2)
    assert m.get("kvxfer_kv_expired_leases_total", 0.0) == 0
    wait_all_blocks_free(decode.url)


def test_prefill_answer_that_is_not_json_is_a_502_and_frees_the_prefill(setup):
    prefill, wrapper, decode, proxy, _, _ = setup
    wrapper.mode = "garbage"
    try:
        r = httpx.post(f"{proxy.url}/v1/completions", timeout=STARTUP_S,
                       json={"prompt": list(range(1, 40)), "max_tokens": 4})
    finally:
        wrapper.mode = None
    assert r.status_code == 502, r.text
    assert "no readable kv_transfer_params" in r.json()["error"]["message"]
    # Released by id (or, without a token to name the hold, by the short lease).
    wait_all_blocks_free(prefill.url, timeout_s=LEASE_S + 20)
    assert httpx.get(f"{proxy.url}/health", timeout=30).status_code == 200


def test_a_409_for_a_duplicate_id_leaves_the_holder_alone(setup):
    prefill, wrapper, decode, proxy, _, _ = setup
    wrapper.mode, wrapper.gate, wrapper.ready = "hold", threading.Event(), threading.Event()
    body = {"prompt": list(range(3, 30)), "max_tokens": 4, "temperature": 0.0, "return_token_ids": True}
    result: dict = {}
    first = threading.Thread(target=lambda: result.update(r=httpx.post(
        f"{proxy.url}/v1/completions", json=body, headers={"X-Request-Id": "shared-id"}, timeout=STARTUP_S)))
    first.start()
    try:
        assert wrapper.ready.wait(STARTUP_S)  # the first request's prefill finished and holds its blocks
        wrapper.mode = None
        aborts = metrics(proxy.url).get('kvxfer_proxy_prefill_aborts_total{by="id"}', 0.0)
        dup = httpx.post(f"{proxy.url}/v1/completions", json=body, headers={"X-Request-Id": "shared-id"},
                         timeout=STARTUP_S)
        assert dup.status_code == 409, dup.text
        assert metrics(proxy.url).get('kvxfer_proxy_prefill_aborts_total{by="id"}', 0.0) == aborts
    finally:
        wrapper.gate.set()
        first.join(STARTUP_S)
    assert result["r"].status_code == 200, result["r"].text
    assert result["r"].json()["kv_transfer_stats"]["bytes"] > 0  # its hold was still there to read
    wait_all_blocks_free(prefill.url)
    wait_all_blocks_free(decode.url)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "streamed"])
def test_recompute_is_visible_and_frees_the_prefill(setup, stream):
    """A pull that fails under the recompute policy still answers, but says so: in the
    response, in the decode server's and the proxy's metrics. Nobody read the prefill's
    blocks, so the proxy releases them at once."""
    prefill, wrapper, _, _, recompute, proxy = setup
    prompt = [(i * 13) % 480 + 5 for i in range(37)]
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
    before = {"decode": metrics(recompute.url).get("kvxfer_kv_recomputed_total", 0.0),
              "proxy": metrics(proxy.url).get("kvxfer_proxy_kv_recomputed_total", 0.0),
              "released": metrics(prefill.url).get("kvxfer_kv_released_total", 0.0)}
    wrapper.mode = "misdirect"
    try:
        if stream:
            with httpx.stream("POST", f"{proxy.url}/v1/completions", json=body | {"stream": True},
                              timeout=STARTUP_S) as r:
                assert r.status_code == 200
                events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
            final, tokens = events[-1], [t for e in events for t in e["choices"][0]["token_ids"]]
        else:
            r = httpx.post(f"{proxy.url}/v1/completions", json=body, timeout=STARTUP_S)
            assert r.status_code == 200, r.text
            final = r.json()
            tokens = final["choices"][0]["token_ids"]
    finally:
        wrapper.mode = None
    reference = httpx.post(f"{recompute.url}/v1/completions", json=body, timeout=STARTUP_S).json()
    assert tokens == reference["choices"][0]["token_ids"]  # computed locally, correctly
    stats = final["kv_transfer_stats"]
    assert stats["recomputed"] is True and stats["bytes"] == 0 and stats["error_kind"], stats
    assert metrics(recompute.url)["kvxfer_kv_recomputed_total"] == before["decode"] + 1
    assert metrics(proxy.url)["kvxfer_proxy_kv_recomputed_total"] == before["proxy"] + 1
    assert httpx.get(f"{proxy.url}/health", timeout=30).json()["kv_recomputed"] == before["proxy"] + 1
    wait_metric(prefill.url, "kvxfer_kv_released_total", before["released"] + 1)  # by the proxy, not the lease
    wait_all_blocks_free(prefill.url)


@pytest.fixture(scope="module")
def queued(setup, tiny_qwen3, tmp_path_factory):
    """A decode server that runs one sequence at a time (a second one queues, its pull not
    started), behind its own proxy to the same prefill server."""
    prefill = setup[0]
    cluster = Cluster(tiny_qwen3, tmp_path_factory.mktemp("queued-logs"))
    try:
        decode = cluster.server("queued", "decode", 1, "--max-num-seqs", "1", "--kv-transfer-timeout", str(LEASE_S // 2))
        proxy = cluster.proxy([prefill], [decode], "--health-interval", "0.5")
        cluster.wait_healthy()
        yield prefill, decode, proxy
    finally:
        cluster.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "streamed"])
def test_decode_abort_before_the_pull_releases_the_prefill(queued, stream):
    """An operator aborts a request the decode server had queued, before its pull started:
    the answer (200, finish_reason "abort") says nobody read the prefill's blocks, so the proxy
    releases them at once with the token instead of leaving them to the lease."""
    prefill, decode, proxy = queued
    before = metrics(prefill.url)
    body = {"prompt": list(range(5, 41)), "max_tokens": 4, "temperature": 0.0, "ignore_eos": True, "stream": stream}
    blocker = {"prompt": [7, 8, 9], "max_tokens": 4000, "ignore_eos": True}  # holds the decode's one slot

    async def go() -> str:
        async with httpx.AsyncClient(timeout=STARTUP_S) as client:
            slot = asyncio.ensure_future(client.post(f"{decode.url}/v1/completions", json=blocker,
                                                     headers={"X-Request-Id": f"blocker-{stream}"}))
            await asyncio.to_thread(wait_metric, decode.url, "kvxfer_running_requests", 1, 60)
            headers = {"X-Request-Id": f"queued-{stream}"}
            leg = asyncio.ensure_future(client.post(f"{proxy.url}/v1/completions", json=body, headers=headers))
            await asyncio.to_thread(wait_metric, decode.url, "kvxfer_waiting_requests", 1, 60)
            assert metrics(decode.url).get("kvxfer_waiting_for_remote_kv_requests", 0.0) == 0  # not pulling
            aborted = await client.post(f"{decode.url}/v1/abort/queued-{stream}")
            assert aborted.json()["outcome"] == "aborted", aborted.text
            r = await leg
            await client.post(f"{decode.url}/v1/abort/blocker-{stream}")
            await slot
            assert r.status_code == 200, r.text
            return r.text

    text = asyncio.run(go())
    assert '"finish_reason":"abort"' in text.replace(" ", ""), text
    wait_metric(prefill.url, "kvxfer_kv_released_total", before["kvxfer_kv_released_total"] + 1)
    m = wait_all_blocks_free(prefill.url, timeout_s=LEASE_S - 2)  # released, not expired
    assert m.get("kvxfer_kv_expired_leases_total", 0.0) == before.get("kvxfer_kv_expired_leases_total", 0.0)
    wait_all_blocks_free(decode.url)
