"""Disaggregated serving end to end: a TP 2 prefill server and a TP 1 decode server (every
pull gathers heads from both prefill ranks) behind the proxy. Outputs are checked against
HF transformers; bytes pulled against the KV spec's block size; block lifecycles through
/metrics. Covers prompts shorter than a block, full and partial decode-side prefix hits,
forged params, and one request id across both legs."""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import random
import signal
import time

import httpx
import pytest
from serving_helpers import BLOCK_SIZE, HFGreedy, child_pids, metrics, wait_all_blocks_free, wait_metric

PREFILL_TP, DECODE_TP = 2, 1


@pytest.fixture(scope="module")
def pd(cluster):
    # A long lease: blocks freed during these tests were freed by a notification or a release.
    prefill = cluster.server("prefill", "prefill", PREFILL_TP, "--kv-lease-seconds", "300")
    decode = cluster.server("decode", "decode", DECODE_TP, "--kv-handshake-timeout", "5")
    cluster.wait_healthy()
    proxy = cluster.proxy([prefill], [decode], "--health-interval", "1")
    proxy.wait_healthy(60)
    return prefill, decode, proxy


@pytest.fixture(scope="module")
def hf(tiny_qwen3):
    return HFGreedy(tiny_qwen3)


@pytest.fixture(scope="module")
def block_bytes(tiny_qwen3) -> int:
    """Bytes of one block, all KV heads and layers: what a decode engine pulls per block."""
    from kvxfer.models import load_model_config

    return load_model_config(tiny_qwen3).kv_cache_spec(BLOCK_SIZE, "float32").bytes_per_block(1)


RNG = random.Random(7)


def fresh_prompt(n: int) -> list[int]:
    """Random token ids: no earlier prompt shares a whole block with it (barring a 1-in-500**16 draw)."""
    return [RNG.randrange(3, 500) for _ in range(n)]


def blocks_read(prompt_len: int, cached_blocks: int = 0) -> int:
    # The decode side computes the last prompt token itself, for its logits.
    return math.ceil((prompt_len - 1) / BLOCK_SIZE) - cached_blocks


def complete(url: str, prompt: list[int], max_tokens: int = 6, **extra) -> dict:
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
        "return_token_ids": True} | extra)
    assert r.status_code == 200, r.text
    return r.json()


def settle(prefill, decode) -> None:
    wait_all_blocks_free(prefill.url)
    wait_all_blocks_free(decode.url)
    assert metrics(prefill.url)["kvxfer_kv_held_requests"] == 0


@pytest.mark.parametrize("n", [5, BLOCK_SIZE, BLOCK_SIZE + 1, 3 * BLOCK_SIZE, 4 * BLOCK_SIZE + 7])
def test_proxy_output_equals_hf_and_pulls_the_prompt(pd, hf, block_bytes, n):
    prefill, decode, proxy = pd
    prompt = fresh_prompt(n)
    body = complete(proxy.url, prompt)
    assert body["choices"][0]["token_ids"] == hf.generate(prompt, 6)[0]
    stats = body["kv_transfer_stats"]
    assert stats["bytes"] == blocks_read(n) * block_bytes
    # One descriptor per (block, prefill rank): each block's heads live on both prefill ranks.
    assert stats["descriptors"] == blocks_read(n) * PREFILL_TP
    settle(prefill, decode)


def test_streamed_chat_through_proxy(pd, hf, tokenizer_ids):
    prefill, decode, proxy = pd
    messages = [{"role": "user", "content": "Why does the river flow to the ocean?"}]
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", timeout=60, json={
            "messages": messages, "max_tokens": 7, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "return_token_ids": True}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    ids = sum((c["choices"][0]["token_ids"] for c in chunks), [])
    assert ids == hf.generate(tokenizer_ids(messages), 7)[0]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["kv_transfer_stats"]["bytes"] > 0
    settle(prefill, decode)


@pytest.fixture(scope="module")
def tokenizer_ids(tiny_qwen3):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen3)

    def ids(messages):
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    return ids


def test_one_request_id_for_both_legs(pd):
    prefill, decode, proxy = pd
    r = httpx.post(f"{proxy.url}/v1/completions", headers={"X-Request-Id": "both-legs-1"}, timeout=60,
                   json={"prompt": fresh_prompt(20), "max_tokens": 2})
    assert r.status_code == 200 and r.json()["id"] == "cmpl-both-legs-1"
    assert r.headers["x-request-id"] == "both-legs-1"
    # The prefill leg, as the proxy sends it, names the same id in the params it returns.
    leg = httpx.post(f"{prefill.url}/v1/completions", headers={"X-Request-Id": "both-legs-2"}, timeout=60,
                     json={"prompt": fresh_prompt(20), "max_tokens": 1,
                           "kv_transfer_params": {"do_remote_decode": True}}).json()
    assert leg["kv_transfer_params"]["remote_request_id"] == "both-legs-2"
    before = metrics(prefill.url)
    released, refused = before["kvxfer_kv_released_total"], before["kvxfer_kv_refused_releases_total"]
    token = {"transfer_token": leg["kv_transfer_params"]["transfer_token"]}
    assert httpx.post(f"{prefill.url}/v1/abort/both-legs-2").json()["outcome"] == "unknown"  # needs the token
    assert httpx.post(f"{prefill.url}/v1/abort/both-legs-2", json=token).json()["outcome"] == "released"
    settle(prefill, decode)
    m = metrics(prefill.url)
    assert m["kvxfer_kv_released_total"] == released + 1 and m["kvxfer_kv_held_requests"] == 0
    assert httpx.post(f"{prefill.url}/v1/abort/both-legs-2", json=token).json()["outcome"] == "unknown"
    # The token-less release of a held request was refused and counted; once nothing of that id
    # is held, a release is "unknown" with nothing to refuse.
    m = metrics(prefill.url)
    assert m["kvxfer_kv_refused_releases_total"] == refused + 1 and m["kvxfer_kv_refused_notifications_total"] == 0


def test_full_prefix_hit_on_decode_not_on_prefill(pd, hf):
    prefill, decode, proxy = pd
    prompt = fresh_prompt(2 * BLOCK_SIZE + 1)
    complete(decode.url, prompt, max_tokens=1)  # colocated on decode: caches both full blocks there
    before = metrics(prefill.url)
    body = complete(proxy.url, prompt)
    assert body["choices"][0]["token_ids"] == hf.generate(prompt, 6)[0]
    assert (body["kv_transfer_stats"] or {"bytes": 0})["bytes"] == 0  # nothing to pull
    # The prefill side was still notified: its blocks are freed by the decode side, not the lease.
    settle(prefill, decode)
    m = metrics(prefill.url)
    assert m["kvxfer_kv_sends_completed_total"] == before["kvxfer_kv_sends_completed_total"] + 1
    assert m["kvxfer_kv_expired_leases_total"] == before["kvxfer_kv_expired_leases_total"]


def test_partial_prefix_hit_pulls_only_the_suffix(pd, hf, block_bytes):
    prefill, decode, proxy = pd
    prefix = fresh_prompt(2 * BLOCK_SIZE)
    first = prefix + fresh_prompt(9)
    second = prefix + fresh_prompt(30)
    complete(proxy.url, first)  # decode now caches the two prefix blocks
    body = complete(proxy.url, second)
    assert body["choices"][0]["token_ids"] == hf.generate(second, 6)[0]
    assert body["kv_transfer_stats"]["bytes"] == blocks_read(len(second), cached_blocks=2) * block_bytes
    assert blocks_read(len(second), cached_blocks=2) < blocks_read(len(second))
    settle(prefill, decode)


def test_single_token_prompt(pd, hf):
    prefill, decode, proxy = pd
    prompt = fresh_prompt(1)
    body = complete(proxy.url, prompt)
    assert body["choices"][0]["token_ids"] == hf.generate(prompt, 6)[0]
    settle(prefill, decode)


def test_concurrent_requests_through_proxy(pd, hf):
    prefill, decode, proxy = pd
    prompts = [fresh_prompt(n) for n in (3, 15, 16, 17, 31, 40, 64, 90)]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        bodies = list(pool.map(lambda p: complete(proxy.url, p, 5), prompts))
    for prompt, body in zip(prompts, bodies):
        assert body["choices"][0]["token_ids"] == hf.generate(prompt, 5)[0]
        assert body["kv_transfer_stats"]["bytes"] > 0
    settle(prefill, decode)


def test_decode_metrics_count_the_bytes(pd, block_bytes):
    prefill, decode, proxy = pd
    before = metrics(decode.url)
    n = 3 * BLOCK_SIZE + 2
    body = complete(proxy.url, fresh_prompt(n), 2)
    after = metrics(decode.url)
    assert after["kvxfer_kv_transfer_bytes_total"] - before["kvxfer_kv_transfer_bytes_total"] == \
        body["kv_transfer_stats"]["bytes"] == blocks_read(n) * block_bytes
    assert after["kvxfer_kv_transfers_total"] - before["kvxfer_kv_transfers_total"] == 1
    assert after["kvxfer_kv_transfer_seconds_total"] > before["kvxfer_kv_transfer_seconds_total"]
    settle(prefill, decode)


def _prefill_leg(prefill, prompt) -> dict:
    r = httpx.post(f"{prefill.url}/v1/completions", timeout=60, json={
        "prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
    assert r.status_code == 200
    return r.json()["kv_transfer_params"]


@pytest.mark.parametrize("forge,expect", [
    (lambda p: p | {"remote_block_ids": [100_000 + i for i in range(len(p["remote_block_ids"]))]},
     "out of range"),
    (lambda p: p | {"remote_tp_size": 4}, "remote TP"),
    (lambda p: p | {"remote_engine_id": "no-such-engine"}, "unknown remote engine"),
    (lambda p: p | {"remote_num_tokens": p["remote_num_tokens"] + 1}, "remote_num_tokens"),
    (lambda p: p | {"remote_block_ids": p["remote_block_ids"][:-1]}, "remote_block_ids"),
], ids=["ids beyond the peer's pool", "wrong TP size", "unknown engine", "token count", "block count"])
def test_forged_params_are_4xx_and_leak_nothing(pd, forge, expect):
    prefill, decode, _ = pd
    prompt = fresh_prompt(2 * BLOCK_SIZE + 3)
    params = _prefill_leg(prefill, prompt)
    try:
        r = httpx.post(f"{decode.url}/v1/completions", timeout=60, json={
            "prompt": prompt, "max_tokens": 3, "kv_transfer_params": forge(params)})
        assert r.status_code == 400, r.text
        assert expect in r.json()["error"]["message"]
        # The genuine params still work afterwards, and both pools end up entirely free.
        r = httpx.post(f"{decode.url}/v1/completions", timeout=60, json={
            "prompt": prompt, "max_tokens": 3, "kv_transfer_params": params})
        assert r.status_code == 200 and r.json()["kv_transfer_stats"]["bytes"] > 0
    finally:  # a failure here must not leave the hold to fail the later tests
        token = params.get("transfer_token")
        httpx.post(f"{prefill.url}/v1/abort/{params['remote_request_id']}", timeout=30,
                   json={"transfer_token": token} if token else None)
    settle(prefill, decode)


def test_proxy_rejects_bad_json_and_passes_client_errors_through(pd):
    prefill, decode, proxy = pd
    r = httpx.post(f"{proxy.url}/v1/completions", content=b"{nope", timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{proxy.url}/v1/completions", json={"prompt": "hi", "temperature": "hot"}, timeout=10)
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = httpx.post(f"{proxy.url}/v1/completions", json={"prompt": "hi", "max_tokens": -3}, timeout=30)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    settle(prefill, decode)  # the prefill leg that ran for the last one was released


def _aborts(url: str) -> float:
    return metrics(url).get('kvxfer_requests_total{finish_reason="abort"}', 0.0)


def test_client_leaving_mid_stream_aborts_the_decode_request(pd):
    prefill, decode, proxy = pd
    before = _aborts(decode.url)
    with httpx.stream("POST", f"{proxy.url}/v1/completions", timeout=60, json={
            "prompt": fresh_prompt(40), "max_tokens": 3000, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
    wait_metric(decode.url, 'kvxfer_requests_total{finish_reason="abort"}', before + 1, timeout_s=60)
    settle(prefill, decode)


def test_client_leaving_a_non_streamed_request_aborts_it(pd):
    prefill, decode, proxy = pd
    before = _aborts(decode.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{proxy.url}/v1/completions", timeout=httpx.Timeout(60, read=3.0),
                   json={"prompt": fresh_prompt(40), "max_tokens": 3000, "ignore_eos": True})
    # The proxy notices, closes its decode leg, and the decode server aborts the request.
    wait_metric(decode.url, 'kvxfer_requests_total{finish_reason="abort"}', before + 1, timeout_s=60)
    settle(prefill, decode)


def test_a_dead_tp_rank_makes_the_server_unhealthy(pd):
    """Runs last in this module: it breaks the prefill server."""
    prefill, decode, proxy = pd
    workers = child_pids(prefill.proc.pid)
    assert len(workers) == PREFILL_TP - 1  # rank 0 runs in the server process
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while (r := httpx.get(f"{prefill.url}/health", timeout=10)).status_code != 503:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)
    problems = " ".join(r.json()["problems"])
    assert "TP rank 1" in problems or "engine is not running" in problems, problems
    r = httpx.post(f"{prefill.url}/v1/completions", json={"prompt": "hi"}, timeout=10)
    assert r.status_code == 503  # an answer, not a hang
    # The proxy stops sending there, and says why.
    deadline = time.monotonic() + 10
    while (r := httpx.post(f"{proxy.url}/v1/completions", json={"prompt": "hi"}, timeout=10)).status_code != 503:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.3)
    assert "no healthy prefill server" in r.json()["error"]["message"]
