"""Disaggregated serving end to end: a TP 2 prefill server and a TP 1 decode server (every
pull gathers heads from both prefill ranks) behind the proxy. Outputs are checked against
HF transformers; bytes pulled against the KV spec's block size; block lifecycles through
/metrics. Covers prompts shorter than a block, full and partial decode-side prefix hits,
forged params, and one request id across both legs. The first-token handoff in both proxy modes
(`--first-token prefill`: the prefill's token streamed at once, the decode stream continues after
it; `decode`: the decode answer relayed as is) gives the colocated output: text, token ids and
log-probs, streamed or not, completions and chat, seeded sampling, a first token that ends the
request (its hold released), and a character split across the first two tokens."""

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
    proxy.wait_healthy(180)
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
    # The decode side receives the whole prompt and computes the prefill's first token itself.
    return math.ceil(prompt_len / BLOCK_SIZE) - cached_blocks


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
    prompt = fresh_prompt(2 * BLOCK_SIZE)
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


@pytest.fixture(scope="module")
def proxies(pd, cluster):
    """The module's proxy (`--first-token prefill`, the default) and one with `--first-token decode`."""
    prefill, decode, proxy = pd
    relay = cluster.proxy([prefill], [decode], "--health-interval", "1", "--first-token", "decode")
    relay.wait_healthy(180)
    return {"prefill": proxy, "decode": relay}


def _logprob_pairs(logprobs: dict | None, chat: bool) -> list[tuple[int, float]]:
    if logprobs is None:
        return []
    if chat:
        return [(e["token_id"], e["logprob"]) for e in logprobs["content"]]
    return list(zip(logprobs["token_ids"], logprobs["token_logprobs"]))


def ask(url: str, body: dict, chat: bool, stream: bool) -> dict:
    """One request's answer, streamed or not, as text, token ids, (token id, log-prob) pairs,
    finish_reason and usage; a stream's chunks are checked for the shape a colocated server sends."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = body | {"stream": stream, "return_token_ids": True}
    if not stream:
        r = httpx.post(f"{url}{path}", json=body, timeout=60)
        assert r.status_code == 200, r.text
        answer = r.json()
        choice = answer["choices"][0]
        assert answer["kv_transfer_params"] is None  # nothing of the legs leaks to the client
        return {"text": choice["message"]["content"] if chat else choice["text"], "ids": choice["token_ids"],
                "logprobs": _logprob_pairs(choice["logprobs"], chat), "finish": choice["finish_reason"],
                "usage": answer["usage"]}
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), chunks
    out = {"text": "", "ids": [], "logprobs": [], "chunks": chunks}
    for i, c in enumerate(chunks):
        choice = c["choices"][0]
        last = i == len(chunks) - 1
        assert (choice["finish_reason"] is None) != last and ("usage" in c) == last, chunks
        if chat:
            assert ("role" in choice["delta"]) == (i == 0), chunks
        out["text"] += choice["delta"]["content"] if chat else choice["text"]
        out["ids"] += choice["token_ids"]
        out["logprobs"] += _logprob_pairs(choice["logprobs"], chat)
    out |= {"finish": chunks[-1]["choices"][0]["finish_reason"], "usage": chunks[-1]["usage"]}
    return out


def assert_same_answer(got: dict, want: dict) -> None:
    assert got["ids"] == want["ids"] and got["text"] == want["text"] and got["finish"] == want["finish"]
    assert got["usage"] == want["usage"]
    assert [t for t, _ in got["logprobs"]] == [t for t, _ in want["logprobs"]]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(got["logprobs"], want["logprobs"]))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_both_first_token_modes_answer_as_colocated_with_logprobs(pd, proxies, hf, mode, stream):
    prefill, decode, _ = pd
    for chat in (False, True):
        body = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
        if chat:
            body |= {"messages": [{"role": "user", "content": f"Count the stones {mode} {stream}"}],
                     "logprobs": True, "top_logprobs": 2}
        else:
            body |= {"prompt": fresh_prompt(37), "logprobs": 2}
        got = ask(proxies[mode].url, body, chat, stream)
        want = ask(decode.url, body, chat, stream)  # colocated on the decode server
        assert_same_answer(got, want)
        if not chat:
            assert got["ids"] == hf.generate(body["prompt"], 6)[0]
        if stream:
            first = got["chunks"][0]["choices"][0]["token_ids"]
            # The prefill's token comes alone, at once; a relayed decode stream starts with t1 and t2.
            assert first == (got["ids"][:1] if mode == "prefill" else got["ids"][:2])
    settle(prefill, decode)


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_seeded_sampling_through_the_proxy_equals_colocated(pd, proxies, mode):
    prefill, decode, _ = pd
    body = {"prompt": fresh_prompt(21), "max_tokens": 10, "temperature": 3.0, "seed": 1234, "ignore_eos": True}
    for stream in (False, True):
        got, want = ask(proxies[mode].url, body, False, stream), ask(decode.url, body, False, stream)
        assert got["ids"] == want["ids"] and len(set(got["ids"])) > 1
    settle(prefill, decode)


@pytest.fixture(scope="module")
def eos_first_prompt(hf) -> list[int]:
    """A prompt whose greedy first token is EOS (id 0 in the tiny tokenizer)."""
    torch = hf.torch
    candidates = torch.randint(3, 500, (4096, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first = hf.model(candidates).logits[:, -1].argmax(-1)
    hits = (first == hf.model.config.eos_token_id).nonzero()
    assert len(hits), "no prompt of 6 tokens starts with EOS under this model"
    return candidates[int(hits[0])].tolist()


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_a_first_token_that_ends_the_request_is_answered_and_releases_the_hold(pd, proxies, mode,
                                                                               eos_first_prompt):
    """max_tokens 1, or EOS as the first token: the answer equals colocated's, and the prefill's
    hold is released (its pool free, nothing held) rather than left to its lease."""
    prefill, decode, _ = pd
    cases = [({"prompt": fresh_prompt(40), "max_tokens": 1, "temperature": 0.0, "ignore_eos": True}, "length"),
             ({"prompt": eos_first_prompt, "max_tokens": 5, "temperature": 0.0}, "stop")]
    for body, finish in cases:
        for stream in (False, True):
            got, want = ask(proxies[mode].url, body, False, stream), ask(decode.url, body, False, stream)
            assert_same_answer(got, want)
            assert got["finish"] == finish and len(got["ids"]) == 1
            settle(prefill, decode)
    assert metrics(prefill.url)["kvxfer_kv_expired_leases_total"] == 0


def test_a_character_split_across_the_first_two_tokens_streams_whole(pd, proxies, hf, tiny_qwen3):
    """The prefill's first token is an incomplete UTF-8 sequence: its chunk holds it back, and the
    decode stream resumes from that state, so the streamed text is the colocated one."""
    from transformers import AutoTokenizer

    prefill, decode, _ = pd
    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    prompt = next(p for p in (fresh_prompt(12) for _ in range(200))
                  if tok.decode(hf.generate(p, 1)[0]).endswith("\ufffd"))
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
    want = ask(decode.url, body, False, True)
    for mode in ("prefill", "decode"):
        got = ask(proxies[mode].url, body, False, True)
        assert got["ids"] == want["ids"] and got["text"] == want["text"]
        assert got["text"] == ask(decode.url, body, False, False)["text"]
    assert ask(proxies["prefill"].url, body, False, True)["chunks"][0]["choices"][0]["text"] == ""
    # The split character's first token alone completes the request: the stream ends with the
    # U+FFFD a colocated server flushes, not with nothing.
    one = body | {"max_tokens": 1}
    want = ask(decode.url, one, False, True)
    assert want["text"].endswith("\ufffd")
    for mode in ("prefill", "decode"):
        got = ask(proxies[mode].url, one, False, True)
        assert got["ids"] == want["ids"] and got["text"] == want["text"], mode
        assert "held_back_text" not in got["chunks"][-1]
    settle(prefill, decode)


def test_a_dead_tp_rank_makes_the_server_unhealthy(pd):
    """Runs last in this module: it breaks the prefill server."""
    prefill, decode, proxy = pd
    workers = child_pids(prefill.proc.pid)
    assert len(workers) == PREFILL_TP - 1  # rank 0 runs in the server process
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while (r := httpx.get(f"{prefill.url}/health", timeout=10)).status_code != 503:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)
    problems = " ".join(r.json()["problems"])
    assert "TP rank 1" in problems or "engine is not running" in problems, problems
    r = httpx.post(f"{prefill.url}/v1/completions", json={"prompt": "hi"}, timeout=10)
    assert r.status_code == 503  # an answer, not a hang
    # The proxy stops sending there, and says why.
    deadline = time.monotonic() + 60
    while (r := httpx.post(f"{proxy.url}/v1/completions", json={"prompt": "hi"}, timeout=10)).status_code != 503:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.3)
    assert "no healthy prefill server" in r.json()["error"]["message"]
