"""Failures between and during the legs: servers SIGKILLed (process group, as in a crash),
no hang anywhere, every block freed, by policy on the decode side (fail / recompute)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from serving_helpers import BLOCK_SIZE, HFGreedy, metrics, wait_all_blocks_free

LEASE = "300"  # far beyond any wait here: blocks freed in these tests were not freed by expiry


@pytest.fixture(scope="module")
def servers(cluster):
    s = {
        "prefill": cluster.server("prefill", "prefill", 1, "--kv-lease-seconds", LEASE),
        "decode_streamed": cluster.server("decode_streamed", "decode", 1),
        "decode_dead": cluster.server("decode_dead", "decode", 1),
        "prefill_dead": cluster.server("prefill_dead", "prefill", 1, "--kv-lease-seconds", LEASE),
        "decode_fail": cluster.server("decode_fail", "decode", 1, "--kv-failure-policy", "fail",
                                      "--kv-handshake-timeout", "3", "--kv-transfer-timeout", "5"),
        "decode_recompute": cluster.server("decode_recompute", "decode", 1, "--kv-failure-policy", "recompute",
                                           "--kv-handshake-timeout", "3", "--kv-transfer-timeout", "5"),
    }
    cluster.wait_healthy()
    return s


@pytest.fixture(scope="module")
def hf(tiny_qwen3):
    return HFGreedy(tiny_qwen3)


def prompt_of(n: int, seed: int) -> list[int]:
    return [(seed * 131 + i * 17) % 497 + 3 for i in range(n)]


def prefill_leg(prefill, prompt) -> dict:
    # Greedy, as the decode legs below: the params carry the first token, which they continue from.
    r = httpx.post(f"{prefill.url}/v1/completions", timeout=60, json={
        "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "kv_transfer_params": {"do_remote_decode": True}})
    assert r.status_code == 200, r.text
    return r.json()["kv_transfer_params"]


def test_decode_killed_mid_stream(cluster, servers):
    prefill, decode = servers["prefill"], servers["decode_streamed"]
    proxy = cluster.proxy([prefill], [decode], "--health-interval", "1")
    proxy.wait_healthy(180)
    events = []
    with httpx.stream("POST", f"{proxy.url}/v1/completions", timeout=httpx.Timeout(60, read=30), json={
            "prompt": prompt_of(40, 1), "max_tokens": 3000, "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    decode.kill()
    # The client is told (an error event, then the stream's end), not left waiting (the 30 s read
    # time-out).
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert "decode server" in last["error"]["message"] and "mid-stream" in last["error"]["message"]
    assert len(events) < 3000
    # The decode side had already pulled and notified: the prefill blocks are free, not leased.
    wait_all_blocks_free(prefill.url)
    assert metrics(prefill.url)["kvxfer_kv_held_requests"] == 0
    # The proxy now knows the decode server is gone and refuses without running a prefill leg.
    deadline = time.monotonic() + 60
    while httpx.get(f"{proxy.url}/health", timeout=30).status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    prompt_tokens = metrics(prefill.url)["kvxfer_prompt_tokens_total"]
    r = httpx.post(f"{proxy.url}/v1/completions", json={"prompt": "hello"}, timeout=30)
    assert r.status_code == 503 and "no healthy decode server" in r.json()["error"]["message"]
    assert metrics(prefill.url)["kvxfer_prompt_tokens_total"] == prompt_tokens


def test_decode_leg_failure_releases_the_prefill_blocks(cluster, servers):
    prefill, decode = servers["prefill"], servers["decode_dead"]
    # Health checks far apart: the proxies still believe the decode server is up.
    proxy = cluster.proxy([prefill], [decode], "--health-interval", "600")
    streamed = cluster.proxy([prefill], [decode], "--health-interval", "600")
    proxy.wait_healthy(180)
    streamed.wait_healthy(180)
    decode.kill()
    before = metrics(prefill.url)
    r = httpx.post(f"{proxy.url}/v1/completions", json={"prompt": prompt_of(50, 2), "max_tokens": 4}, timeout=60)
    assert r.status_code == 503 and "no healthy decode server" in r.json()["error"]["message"]
    after = metrics(prefill.url)
    assert after["kvxfer_prompt_tokens_total"] == before["kvxfer_prompt_tokens_total"] + 50  # prefill ran
    # ... and its held blocks were released at once, not after the 300 s lease.
    wait_all_blocks_free(prefill.url, timeout_s=60)
    assert metrics(prefill.url)["kvxfer_kv_held_requests"] == 0
    # Streamed, the client already has the prefill's token when the decode leg fails: an error
    # event and the stream's end, and the hold released as well.
    with httpx.stream("POST", f"{streamed.url}/v1/completions", timeout=60, json={
            "prompt": prompt_of(50, 6), "max_tokens": 4, "stream": True, "return_token_ids": True}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) == 3 and events[-1] == "[DONE]", events
    assert len(json.loads(events[0])["choices"][0]["token_ids"]) == 1
    assert "no healthy decode server" in json.loads(events[1])["error"]["message"]
    wait_all_blocks_free(prefill.url, timeout_s=60)
    assert metrics(prefill.url)["kvxfer_kv_held_requests"] == 0


def test_prefill_killed_between_the_legs(cluster, servers, hf):
    prefill = servers["prefill_dead"]
    fail, recompute = servers["decode_fail"], servers["decode_recompute"]
    # decode_fail has pulled from this prefill before (handshake cached); decode_recompute has not.
    warm = prompt_of(2 * BLOCK_SIZE + 3, 3)
    r = httpx.post(f"{fail.url}/v1/completions", timeout=60, json={
        "prompt": warm, "max_tokens": 2, "kv_transfer_params": prefill_leg(prefill, warm)})
    assert r.status_code == 200 and r.json()["kv_transfer_stats"]["bytes"] > 0
    prompt_a, prompt_b = prompt_of(3 * BLOCK_SIZE + 5, 4), prompt_of(2 * BLOCK_SIZE + 9, 5)
    params_a, params_b = prefill_leg(prefill, prompt_a), prefill_leg(prefill, prompt_b)
    prefill.kill()

    # Each leg has a 60 s client time-out: a hang fails the test, a busy machine does not.
    r = httpx.post(f"{fail.url}/v1/completions", timeout=60, json={
        "prompt": prompt_a, "max_tokens": 4, "kv_transfer_params": params_a})
    assert r.status_code == 502, r.text
    assert "KV transfer failed" in r.json()["error"]["message"]
    r = httpx.post(f"{recompute.url}/v1/completions", timeout=60, json={
        "prompt": prompt_b, "max_tokens": 4, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True,
        "kv_transfer_params": params_b})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == hf.generate(prompt_b, 4)[0]  # computed locally
    assert not (r.json()["kv_transfer_stats"] or {}).get("bytes")

    for decode in (fail, recompute):
        wait_all_blocks_free(decode.url)
        assert metrics(decode.url)["kvxfer_kv_transfer_failures_total"] >= 1
        assert httpx.get(f"{decode.url}/health").status_code == 200
    r = httpx.post(f"{fail.url}/v1/completions", timeout=60, json={
        "prompt": prompt_a, "max_tokens": 4, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True})
    assert r.json()["choices"][0]["token_ids"] == hf.generate(prompt_a, 4)[0]  # still serving


def test_proxy_without_a_live_prefill_server_is_503(cluster, servers):
    dead = servers["prefill_dead"]
    if dead.alive():
        dead.kill()
    proxy = cluster.proxy([dead], [servers["decode_fail"]], "--health-interval", "1")
    deadline = time.monotonic() + 30
    while True:
        try:
            health = httpx.get(f"{proxy.url}/health", timeout=2)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline
            time.sleep(0.3)
    assert health.status_code == 503 and health.json()["prefill"][0]["healthy"] is False
    r = httpx.post(f"{proxy.url}/v1/completions", json={"prompt": "hello"}, timeout=30)
    assert r.status_code == 503
    assert "no healthy prefill server" in r.json()["error"]["message"] and dead.url in r.json()["error"]["message"]


def test_dead_backends_are_skipped(cluster, servers):
    live_prefill, live_decode = servers["prefill"], servers["decode_fail"]
    dead_prefill, dead_decode = servers["prefill_dead"], servers["decode_dead"]
    for dead in (dead_prefill, dead_decode):
        if dead.alive():
            dead.kill()
    proxy = cluster.proxy([dead_prefill, live_prefill], [dead_decode, live_decode], "--health-interval", "1")
    proxy.wait_healthy(180)
    for i in range(4):  # round robin would otherwise hit each dead server twice
        r = httpx.post(f"{proxy.url}/v1/completions", json={"prompt": prompt_of(20, 10 + i), "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["kv_transfer_stats"]["bytes"] > 0
    status = httpx.get(f"{proxy.url}/health").json()
    assert [b["healthy"] for b in status["prefill"]] == [False, True]
    assert [b["healthy"] for b in status["decode"]] == [False, True]
    wait_all_blocks_free(live_prefill.url)
