"""The proxy as a P/D router in front of real servers (2 prefill + 1 decode, tiny model, one
module-scoped set): prompts sharing a prefix land on the prefill server that computed it (its
prefix-cache hits show it), short prompts take the colocated path (header, /metrics) and give
the greedy tokens HF gives, and a killed prefill server is dropped and later requests succeed.
No timing: every wait is for an observable state, with a generous deadline."""

from __future__ import annotations

import random
import time

import httpx
import pytest
from serving_helpers import HFGreedy, metrics

HITS = "kvxfer_prefix_cache_hit_blocks_total"
BLOCK = 16
DEADLINE_S = 120


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


SYS_A, SYS_B = ids(1, 8 * BLOCK), ids(2, 8 * BLOCK)  # two "system prompts" of 8 blocks


@pytest.fixture(scope="module")
def servers(cluster):
    prefill = [cluster.server(f"prefill{i}", "prefill", 1, "--kv-lease-seconds", "300") for i in range(2)]
    decode = cluster.server("decode", "decode", 1, "--kv-handshake-timeout", "5")
    cluster.wait_healthy()
    common = ("--health-interval", "0.5", "--policy", "prefix_aware", "--tokenizer", cluster.model_dir)
    routed = cluster.proxy(prefill, [decode], *common, "--drop-after", "1", "--admin-token", "secret-token")
    colocating = cluster.proxy(prefill, [decode], *common, "--colocate-below", "48")
    for p in (routed, colocating):
        p.wait_healthy(60)
    return prefill, decode, routed, colocating


@pytest.fixture(scope="module")
def hf(tiny_qwen3):
    return HFGreedy(tiny_qwen3)


def complete(proxy_url: str, prompt, max_tokens: int = 4) -> httpx.Response:
    r = httpx.post(f"{proxy_url}/v1/completions", timeout=DEADLINE_S,
                   json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                         "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r


def routed_counts(proxy_url: str) -> dict[str, int]:
    health = httpx.get(f"{proxy_url}/health", timeout=30).json()
    return {b["url"]: b["routed"] for b in health["prefill"]}


def hits(url: str) -> float:
    return metrics(url).get(HITS, 0.0)


def test_shared_prefix_prompts_land_on_the_server_that_has_them(servers):
    prefill, _, proxy, _ = servers
    urls = [p.url for p in prefill]
    before = routed_counts(proxy.url)
    complete(proxy.url, SYS_A + ids(10, 20))
    after = routed_counts(proxy.url)
    (a,) = [u for u in urls if after[u] > before[u]]
    (b,) = [u for u in urls if u != a]
    hits_a, hits_b = hits(a), hits(b)
    # A new prefix goes to the server with nothing indexed (both idle): the other one.
    complete(proxy.url, SYS_B + ids(20, 20))
    assert routed_counts(proxy.url)[b] == after[b] + 1
    for turn in range(3):  # more user turns after each system prompt: each to its server
        complete(proxy.url, SYS_A + ids(100 + turn, 20))
        complete(proxy.url, SYS_B + ids(200 + turn, 20))
    final = routed_counts(proxy.url)
    assert final[a] == after[a] + 3 and final[b] == after[b] + 1 + 3
    # ... where each reused its system prompt's 8 cached blocks (the engine's own count)
    assert hits(a) - hits_a >= 3 * 8 and hits(b) - hits_b >= 3 * 8
    m = metrics(proxy.url)
    assert m["kvxfer_proxy_matched_blocks_total"] >= 6 * 8


def test_short_prompts_take_the_colocated_path_with_the_same_tokens(servers, hf):
    _, _, _, proxy = servers
    before = metrics(proxy.url)
    short = ids(30, 20)  # 20 uncached tokens < 48: the decode server alone
    r = complete(proxy.url, short, max_tokens=6)
    assert r.headers["x-kvxfer-path"] == "colocated"
    assert r.json()["choices"][0]["token_ids"] == hf.generate(short, 6)[0]
    long = ids(31, 5 * BLOCK)  # 80 uncached tokens: prefill, then decode
    r = complete(proxy.url, long, max_tokens=6)
    assert r.headers["x-kvxfer-path"] == "disaggregated"
    assert r.json()["choices"][0]["token_ids"] == hf.generate(long, 6)[0]
    # The decode server now holds that prompt: a follow-up whose uncached part is short stays there.
    follow = long + ids(32, 10)
    r = complete(proxy.url, follow, max_tokens=6)
    assert r.headers["x-kvxfer-path"] == "colocated"
    assert r.json()["choices"][0]["token_ids"] == hf.generate(follow, 6)[0]
    # Text prompts are tokenized by the proxy (--tokenizer): a short one is colocated, streamed too.
    with httpx.stream("POST", f"{proxy.url}/v1/completions", timeout=DEADLINE_S,
                      json={"prompt": "a short question", "max_tokens": 3, "stream": True}) as s:
        assert s.status_code == 200 and s.headers["x-kvxfer-path"] == "colocated"
        assert b"[DONE]" in b"".join(s.iter_bytes())
    after = metrics(proxy.url)
    assert after['kvxfer_proxy_routed_total{path="colocated"}'] - before.get(
        'kvxfer_proxy_routed_total{path="colocated"}', 0) == 3
    assert after['kvxfer_proxy_routed_total{path="disaggregated"}'] - before.get(
        'kvxfer_proxy_routed_total{path="disaggregated"}', 0) == 1


def test_admin_endpoint_needs_the_token(servers):
    prefill, _, proxy, _ = servers
    body = {"role": "prefill", "url": prefill[0].url}
    assert httpx.post(f"{proxy.url}/admin/servers", json=body, timeout=30).status_code == 401
    r = httpx.post(f"{proxy.url}/admin/servers", json={"role": "router", "url": prefill[0].url}, timeout=30,
                   headers={"Authorization": "Bearer secret-token"})
    assert r.status_code == 400 and "role" in r.text
    r = httpx.post(f"{proxy.url}/admin/servers", json=body, timeout=30,
                   headers={"Authorization": "Bearer secret-token"})
    assert r.status_code == 200 and r.json()["healthy"] is True  # already there: the same server
    assert len(httpx.get(f"{proxy.url}/health", timeout=30).json()["prefill"]) == 2


def test_killed_prefill_server_is_dropped_and_later_requests_succeed(servers):
    prefill, _, proxy, _ = servers
    # Kill the server holding SYS_A (routed there above), so its prefix must move.
    counts = routed_counts(proxy.url)
    complete(proxy.url, SYS_A + ids(300, 20))
    holder = next(p for p in prefill if routed_counts(proxy.url)[p.url] > counts[p.url])
    survivor = next(p for p in prefill if p is not holder)
    holder.kill()
    deadline = time.monotonic() + DEADLINE_S
    while [b["url"] for b in httpx.get(f"{proxy.url}/health", timeout=30).json()["prefill"]] != [survivor.url]:
        assert time.monotonic() < deadline, "the killed prefill server was not dropped"
        time.sleep(0.2)
    assert httpx.get(f"{proxy.url}/health", timeout=30).json()["dropped"] >= 1
    before = hits(survivor.url)
    for turn in range(3):
        complete(proxy.url, SYS_A + ids(400 + turn, 20))
    assert hits(survivor.url) - before >= 2 * 8  # the prefix moved: computed once, then reused there
