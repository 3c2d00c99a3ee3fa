"""The OpenAI-compatible API of one colocated server: outputs against HF, streaming, chat,
log-probs, bad requests (4xx, nothing changed), aborts and client disconnects, metrics."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from serving_helpers import HFGreedy, metrics, wait_all_blocks_free, wait_metric

PROMPT = "The cache is split into blocks of sixteen tokens"


@pytest.fixture(scope="module")
def server(cluster):
    s = cluster.server("both", "both", 1, "--kv-connector", "none")
    cluster.wait_healthy()
    return s


@pytest.fixture(scope="module")
def hf(tiny_qwen3):
    return HFGreedy(tiny_qwen3)


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen3)


def post(server, path, body, **kw):
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kw)


def sse_events(response: httpx.Response) -> list[dict | str]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
    return events


def test_health_and_models(server):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["role"] == "both" and health["step_seconds"] >= 0
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-qwen3"]


def test_completion_matches_hf_greedy(server, hf, tokenizer):
    body = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0.0,
                                            "ignore_eos": True, "return_token_ids": True, "logprobs": 1}).json()
    prompt_ids = tokenizer.encode(PROMPT)
    ref_ids, ref_lps = hf.generate(prompt_ids, 6)
    choice = body["choices"][0]
    assert body["prompt_token_ids"] == prompt_ids
    assert choice["token_ids"] == ref_ids
    assert choice["text"] == tokenizer.decode(ref_ids, skip_special_tokens=True)
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(ref_lps, abs=1e-4)
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 6,
                             "total_tokens": len(prompt_ids) + 6}
    assert body["kv_transfer_params"] is None and body["kv_transfer_stats"] is None


def assert_top_matches(got: list[list[tuple[int, float]]], ref: list[list[tuple[int, float]]]) -> None:
    assert len(got) == len(ref)
    for ours, theirs in zip(got, ref):
        assert [v for _, v in ours] == pytest.approx([v for _, v in theirs], abs=1e-4)
        assert ours[0][0] == theirs[0][0]  # tiny presets have clear top-1 gaps


def test_top_logprobs_match_hf(server, hf, tokenizer):
    prompt_ids = tokenizer.encode(PROMPT)
    ref = hf.top_logprobs(prompt_ids, 4, 3)
    body = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0.0,
                                            "ignore_eos": True, "logprobs": 3}).json()
    logprobs = body["choices"][0]["logprobs"]
    top = [[(e["token_id"], e["logprob"]) for e in pos] for pos in logprobs["top_token_logprobs"]]
    assert all(len(pos) == 3 for pos in top) and all(len(pos) == 3 for pos in logprobs["top_logprobs"])
    assert_top_matches(top, ref)
    messages = [{"role": "user", "content": PROMPT}]
    chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    body = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 3, "temperature": 0.0,
                                                 "ignore_eos": True, "logprobs": True, "top_logprobs": 2}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert_top_matches([[(e["token_id"], e["logprob"]) for e in c["top_logprobs"]] for c in content],
                       hf.top_logprobs(chat_ids, 3, 2))


def test_streaming_equals_non_streaming(server):
    req = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
    full = post(server, "/v1/completions", req).json()
    with httpx.stream("POST", f"{server.url}/v1/completions", json=req | {"stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 2  # tokens arrive as they are generated
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == full["choices"][0]["token_ids"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 10


def test_chat_uses_the_tokenizer_template(server, tokenizer, hf):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
    body = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "temperature": 0.0,
                                                 "ignore_eos": True}).json()
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    assert body["object"] == "chat.completion"
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    ref_ids, _ = hf.generate(prompt_ids, 4)
    assert body["choices"][0]["message"] == {"role": "assistant",
                                             "content": tokenizer.decode(ref_ids, skip_special_tokens=True)}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                      json={"messages": messages, "max_tokens": 4, "temperature": 0.0, "ignore_eos": True,
                            "stream": True, "logprobs": True}) as r:
        chunks = sse_events(r)[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == body["choices"][0]["message"]["content"]
    assert [e["token_id"] for c in chunks for e in c["choices"][0]["logprobs"]["content"]] == ref_ids


BAD_REQUESTS = [
    ("not json", b'{"prompt": "x", ', "Invalid JSON"),
    ("not an object", b"[1, 2]", "object"),
    ("missing prompt", {"max_tokens": 3}, "prompt"),
    ("string max_tokens", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("negative max_tokens", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("zero max_tokens", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("string temperature", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("top_p zero", {"prompt": "x", "top_p": 0.0}, "top_p"),
    ("n=2", {"prompt": "x", "n": 2}, "n"),
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("prompt as int", {"prompt": 5}, "prompt"),
    ("token id beyond vocab", {"prompt": [1, 2, 100000]}, "out of range"),
    ("negative token id", {"prompt": [1, -2]}, "prompt"),
    ("too long", {"prompt": [5] * 4000, "max_tokens": 200}, "context length"),
    ("unknown model", {"prompt": "x", "model": "gpt-9"}, "not served here"),
    ("kv params not an object", {"prompt": "x", "kv_transfer_params": [1]}, "kv_transfer_params"),
    ("kv params unknown key", {"prompt": "x", "kv_transfer_params": {"do_remote_decode": True, "evil": 1}},
     "evil"),
    ("kv params both flags", {"prompt": "x", "kv_transfer_params": {"do_remote_decode": True,
                                                                     "do_remote_prefill": True}}, "exclusive"),
    ("kv params missing fields", {"prompt": "x", "kv_transfer_params": {"do_remote_prefill": True}},
     "remote_engine_id"),
    ("kv params bad port", {"prompt": "hello world", "kv_transfer_params": {
        "do_remote_prefill": True, "remote_engine_id": "e", "remote_host": "127.0.0.1", "remote_port": 70000,
        "remote_block_ids": [0], "remote_request_id": "r", "remote_tp_size": 1, "remote_num_tokens": 2}},
     "remote_port"),
    ("kv params string block ids", {"prompt": "hello world", "kv_transfer_params": {
        "do_remote_prefill": True, "remote_engine_id": "e", "remote_host": "127.0.0.1", "remote_port": 5000,
        "remote_block_ids": ["0"], "remote_request_id": "r", "remote_tp_size": 1, "remote_num_tokens": 2}},
     "remote_block_ids"),
    ("kv params without a connector", {"prompt": [1, 2, 3], "kv_transfer_params": {
        "do_remote_prefill": True, "remote_engine_id": "e", "remote_host": "127.0.0.1", "remote_port": 5000,
        "remote_block_ids": [0], "remote_request_id": "r", "remote_tp_size": 1, "remote_num_tokens": 3}},
     "kv_transfer_params"),
    ("kv params remote fields without flag", {"prompt": "x", "kv_transfer_params": {"remote_port": 5000}},
     "only valid with do_remote_prefill"),
]


@pytest.mark.parametrize("name,body,expect", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_is_4xx_and_changes_nothing(server, name, body, expect):
    before = metrics(server.url)
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {
        "json": body}
    r = httpx.post(f"{server.url}/v1/completions", timeout=30, **kw)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert expect in error["message"] and error["type"] == "invalid_request_error"
    after = metrics(server.url)
    changed = {k: (before.get(k), v) for k, v in after.items()
               if before.get(k) != v and not k.startswith("kvxfer_rejected_requests")}
    assert changed == {}
    assert after["kvxfer_kv_free_blocks"] == after["kvxfer_kv_blocks"]


def test_bad_chat_and_header(server):
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["message"]
    r = post(server, "/v1/chat/completions", {"messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"prompt": "x"}, headers={"X-Request-Id": "bad id!"})
    assert r.status_code == 400 and "X-Request-Id" in r.json()["error"]["message"]


def test_duplicate_request_id_in_flight_is_409(server):
    long = {"prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=long, timeout=60,
                      headers={"X-Request-Id": "dup-1"}) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the response
        next(lines)
        again = post(server, "/v1/completions", {"prompt": "x"}, headers={"X-Request-Id": "dup-1"})
        assert again.status_code == 409 and "in use" in again.json()["error"]["message"]
        assert httpx.post(f"{server.url}/v1/abort/dup-1").status_code == 200
        events = [json.loads(x[6:]) if x != "data: [DONE]" else "[DONE]" for x in lines if x.startswith("data: ")]
    finals = [e for e in events if isinstance(e, dict) and e["choices"][0]["finish_reason"]]
    assert finals and finals[-1]["choices"][0]["finish_reason"] == "abort"
    assert events[-1] == "[DONE]"
    wait_all_blocks_free(server.url)


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    aborted = metrics(server.url).get('kvxfer_requests_total{finish_reason="abort"}', 0.0)
    long = {"prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=long, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    # The connection is closed here, thousands of tokens early.
    wait_metric(server.url, 'kvxfer_requests_total{finish_reason="abort"}', aborted + 1)
    m = wait_all_blocks_free(server.url)
    assert m["kvxfer_running_requests"] == 0


def test_disconnect_while_waiting_for_a_non_streamed_response(server):
    aborted = metrics(server.url).get('kvxfer_requests_total{finish_reason="abort"}', 0.0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", timeout=httpx.Timeout(60, read=3.0),
                   json={"prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True})
    # Noticed although tokens keep coming: an abort, not a finish by length, shows it.
    wait_metric(server.url, 'kvxfer_requests_total{finish_reason="abort"}', aborted + 1, timeout_s=60)
    wait_all_blocks_free(server.url)


def test_metrics_count_requests_and_tokens(server):
    before = metrics(server.url)
    for n in (3, 5):
        assert post(server, "/v1/completions", {"prompt": [7, 8, 9, 10], "max_tokens": n,
                                                "ignore_eos": True}).status_code == 200
    after = metrics(server.url)
    key = 'kvxfer_requests_total{finish_reason="length"}'
    assert after[key] - before.get(key, 0) == 2
    assert after["kvxfer_generation_tokens_total"] - before["kvxfer_generation_tokens_total"] == 8
    assert after["kvxfer_prompt_tokens_total"] - before["kvxfer_prompt_tokens_total"] == 8
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("kvxfer_kv_transfer_bytes_total", "kvxfer_kv_transfer_seconds_total",
                 "kvxfer_kv_transfer_descriptors_total", "kvxfer_kv_free_blocks"):
        assert f"\n{name} " in text


def test_concurrent_requests_are_batched_and_correct(server, hf):
    import concurrent.futures

    prompts = [[11 + i, 40 + i, 90 + i, 7] * (1 + i % 3) for i in range(6)]
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        bodies = list(pool.map(lambda p: post(server, "/v1/completions", {
            "prompt": p, "max_tokens": 5, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}).json(), prompts))
    assert time.monotonic() - start < 60
    for prompt, body in zip(prompts, bodies):
        assert body["choices"][0]["token_ids"] == hf.generate(prompt, 5)[0]
