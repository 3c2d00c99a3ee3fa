"""Requests in flight on a prefill server that dies: the proxy's failure policy finishes them
(their prefill recomputed on the other server, the greedy tokens HF gives, none hung, none an
error), and later requests succeed on the remaining server. Real processes: 2 prefill + 1
decode kvxfer servers, tiny model, a round-robin proxy.

No timing: the dying server is stopped (SIGSTOP) so the requests routed to it are held there,
in flight, a state the proxy's /health shows; only then is it killed (SIGKILL), which closes
their connections. Every wait is for an observable state, with a generous deadline."""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import signal
import time

import httpx
import pytest
from serving_helpers import HFGreedy, metrics

DEADLINE_S = 180
NUM_REQUESTS = 4  # round robin over 2 servers: 2 of them held on the stopped one


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


@pytest.fixture(scope="module")
def servers(cluster):
    prefill = [cluster.server(f"prefill{i}", "prefill", 1, "--kv-lease-seconds", "300") for i in range(2)]
    decode = cluster.server("decode", "decode", 1, "--kv-handshake-timeout", "5")
    cluster.wait_healthy()
    # Health checks of the stopped server time out slowly (3 x 60 s before it would be marked
    # down): while it is stopped both servers stay in the rotation, so round robin puts half
    # the requests on it.
    proxy = cluster.proxy(prefill, [decode], "--policy", "round_robin", "--health-interval", "0.5",
                          "--health-timeout", "60")
    proxy.wait_healthy(60)
    return prefill, decode, proxy


@pytest.fixture(scope="module")
def hf(tiny_qwen3):
    return HFGreedy(tiny_qwen3)


def ask(proxy_url: str, prompt: list[int], stream: bool) -> list[int]:
    """The request's tokens; raises on an error answer or an error event."""
    body = {"prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "return_token_ids": True,
            "stream": stream}
    if not stream:
        r = httpx.post(f"{proxy_url}/v1/completions", json=body, timeout=DEADLINE_S)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]
    tokens: list[int] = []
    with httpx.stream("POST", f"{proxy_url}/v1/completions", json=body, timeout=DEADLINE_S) as s:
        assert s.status_code == 200, s.read()
        for line in s.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            tokens += event["choices"][0].get("token_ids") or []
    return tokens


def prefill_view(proxy_url: str) -> dict[str, dict]:
    return {b["url"]: b for b in httpx.get(f"{proxy_url}/health", timeout=30).json()["prefill"]}


def wait_for(what: str, condition) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.mark.slow  # three servers and a stopped, then killed, one: 2-2.5 min on 2 cores
def test_requests_in_flight_on_a_dying_prefill_server_are_finished(servers, hf):
    prefill, _, proxy = servers
    dying, survivor = prefill
    prompts = [ids(50 + i, 40 + 8 * i) for i in range(NUM_REQUESTS)]
    retries_before = metrics(proxy.url).get("kvxfer_proxy_prefill_retries_total", 0.0)
    os.killpg(dying.proc.pid, signal.SIGSTOP)
    stopped = True
    try:
        with concurrent.futures.ThreadPoolExecutor(NUM_REQUESTS) as pool:
            # Streamed and not: both prefill legs (read whole, and relayed as the first event).
            futures = [pool.submit(ask, proxy.url, p, i % 2 == 1) for i, p in enumerate(prompts)]
            wait_for("requests were not held on the stopped prefill server",
                     lambda: prefill_view(proxy.url)[dying.url]["in_flight"] == NUM_REQUESTS // 2)
            dying.kill()  # SIGKILL to the stopped group: it dies with the requests on it
            stopped = False
            results = [f.result(timeout=DEADLINE_S) for f in futures]
    finally:
        if stopped:
            dying.kill()
    for prompt, tokens in zip(prompts, results):
        assert tokens == hf.generate(prompt, 5)[0]
    m = metrics(proxy.url)
    assert m["kvxfer_proxy_prefill_retries_total"] - retries_before == NUM_REQUESTS // 2
    # The dead server is marked down (its next connection is refused), and later requests
    # succeed on the one left.
    wait_for("the killed prefill server was not marked down",
             lambda: prefill_view(proxy.url)[dying.url]["healthy"] is False)
    routed = prefill_view(proxy.url)[survivor.url]["routed"]
    for i in range(3):
        later = ids(80 + i, 30)
        assert ask(proxy.url, later, stream=i == 1) == hf.generate(later, 5)[0]
    assert prefill_view(proxy.url)[survivor.url]["routed"] == routed + 3
