"""kvxfer's connector inside real vLLM servers: P1 -> D1 behind `kvxfer proxy --first-token
decode`, against a colocated vLLM server of the same model (no connector) as the reference.

What could fail: the greedy tokens (a wrong head, layer or block read changes them), the bytes
each load reads (from the checkpoint's config.json: layers x blocks x block size x KV heads x
head size x K,V x 4 bytes of float32, not from kvxfer's specs), blocks left held on the prefill
(vLLM's own kv_cache_usage_perc), forged or replayed params (refused, nothing read), a killed
prefill (the decode fails the request instead of hanging). The killed-prefill test runs last:
it ends the module's prefill server.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest
from vllm_helpers import BLOCK_SIZE, complete, loads, metric, proxy, token_ids, vllm_server, wait_for

DEADLINE_S = 120.0  # bounds a hang of one request; the tests measure nothing


@pytest.fixture(scope="module")
def pd(vllm_python, tiny_qwen3, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("vllm-logs")
    procs = []
    try:
        prefill = vllm_server(vllm_python, tiny_qwen3, "prefill", log_dir, cpu=0)
        procs.append(prefill)
        decode = vllm_server(vllm_python, tiny_qwen3, "decode", log_dir, cpu=1)
        procs.append(decode)
        reference = vllm_server(vllm_python, tiny_qwen3, "reference", log_dir, cpu=0, kv_role=None)
        procs.append(reference)
        for p in procs:
            p.wait_healthy(600)
        router = proxy(prefill, decode, log_dir)
        procs.append(router)
        router.wait_healthy(180)
        yield {"prefill": prefill, "decode": decode, "reference": reference, "proxy": router,
               "config": json.loads((Path(tiny_qwen3) / "config.json").read_text())}
    finally:
        for p in reversed(procs):
            p.stop()


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(n)]


def _bytes_for(config: dict, blocks: int) -> int:
    """One load of `blocks` whole blocks, computed from the checkpoint's config (float32)."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"] * blocks * BLOCK_SIZE * config["num_key_value_heads"] * head_dim * 2 * 4


def _new_loads(decode, before: int) -> list[tuple[str, int, int]]:
    return loads(decode.log_path)[before:]


def _prefill_blocks_free(prefill) -> bool:
    return metric(prefill.url, "vllm:kv_cache_usage_perc") == 0.0


@pytest.mark.parametrize("n", [1, 31, 32, 33, 100, 200])
def test_pd_tokens_equal_colocated_and_bytes_match_the_config(pd, n):
    prompt = _prompt(n, seed=n)
    want = token_ids(complete(pd["reference"].url, prompt, 8))
    before = len(loads(pd["decode"].log_path))
    got = token_ids(complete(pd["proxy"].url, prompt, 8, timeout_s=DEADLINE_S))
    assert got == want
    new = wait_for(lambda: _new_loads(pd["decode"], before), 30, "the decode's load log line")
    assert len(new) == 1, new
    _, nbytes, descriptors = new[0]
    blocks = -(-n // BLOCK_SIZE)
    assert nbytes == _bytes_for(pd["config"], blocks)
    # One descriptor per layer and run of blocks consecutive on both sides, never more than
    # one per layer and block (vLLM's NixlConnector takes one per layer and block).
    assert pd["config"]["num_hidden_layers"] <= descriptors <= pd["config"]["num_hidden_layers"] * blocks
    wait_for(lambda: _prefill_blocks_free(pd["prefill"]), 60, "the prefill to free every block")


def test_prefix_hit_on_decode_reads_only_the_new_blocks(pd):
    base = _prompt(3 * BLOCK_SIZE, seed=1000)
    longer = base + _prompt(2 * BLOCK_SIZE + 5, seed=1001)
    assert token_ids(complete(pd["proxy"].url, base, 4, timeout_s=DEADLINE_S)) == \
        token_ids(complete(pd["reference"].url, base, 4))
    before = len(loads(pd["decode"].log_path))
    got = token_ids(complete(pd["proxy"].url, longer, 8, timeout_s=DEADLINE_S))
    assert got == token_ids(complete(pd["reference"].url, longer, 8))
    new = wait_for(lambda: _new_loads(pd["decode"], before), 30, "the decode's load log line")
    # The decode's prefix cache holds the first 3 blocks: only the 3 blocks after them are read.
    assert [b for _, b, _ in new] == [_bytes_for(pd["config"], 3)]
    wait_for(lambda: _prefill_blocks_free(pd["prefill"]), 60, "the prefill to free every block")


def test_client_disconnect_and_abort_leave_no_block_held(pd):
    prompt = _prompt(150, seed=2000)
    body = {"model": "tiny-qwen3", "prompt": prompt, "max_tokens": 1500, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{pd['proxy'].url}/v1/completions", json=body, timeout=DEADLINE_S) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data:"):
                break  # one chunk, then the client goes away
    # An abort on the prefill itself, mid-prompt: a request the client drops before it ends.
    with httpx.stream("POST", f"{pd['prefill'].url}/v1/completions", timeout=DEADLINE_S,
                      json={**body, "kv_transfer_params": {"do_remote_decode": True}, "max_tokens": 1}) as resp:
        assert resp.status_code == 200
    for name in ("prefill", "decode"):
        wait_for(lambda: metric(pd[name].url, "vllm:kv_cache_usage_perc") == 0.0, 120,
                 f"the {name} to free every block after the disconnect")
        assert metric(pd[name].url, "vllm:num_requests_running") == 0


def _prefill_params(pd, prompt: list[int]) -> dict:
    resp = complete(pd["prefill"].url, prompt, 1, kv_transfer_params={"do_remote_decode": True})
    assert resp.status_code == 200, resp.text
    params = resp.json()["kv_transfer_params"]
    assert params and params["do_remote_prefill"] is True
    return params


def _refused(resp: httpx.Response) -> bool:
    """vLLM's answer to a request its connector failed under policy "fail": an error status or
    a choice that ends with finish_reason "error"."""
    if resp.status_code != 200:
        return True
    return resp.json()["choices"][0].get("finish_reason") not in ("length", "stop")


def test_forged_and_replayed_params_are_refused_and_read_nothing(pd):
    prompt = _prompt(70, seed=3000)
    params = _prefill_params(pd, prompt)
    before = len(loads(pd["decode"].log_path))
    forged = {**params, "transfer_token": "0" * len(params["transfer_token"])}
    assert _refused(complete(pd["decode"].url, prompt, 4, timeout_s=DEADLINE_S, kv_transfer_params=forged))
    other_blocks = {**params, "remote_block_ids": [b + 1 for b in params["remote_block_ids"]]}
    assert _refused(complete(pd["decode"].url, prompt, 4, timeout_s=DEADLINE_S, kv_transfer_params=other_blocks))
    malformed = {**params, "remote_port": "not a port"}
    assert _refused(complete(pd["decode"].url, prompt, 4, timeout_s=DEADLINE_S, kv_transfer_params=malformed))
    assert _new_loads(pd["decode"], before) == []
    # The genuine params still work once (the refusals did not consume the hold) ...
    want = token_ids(complete(pd["reference"].url, prompt, 4))
    assert token_ids(complete(pd["decode"].url, prompt, 4, timeout_s=DEADLINE_S, kv_transfer_params=params)) == want
    assert len(_new_loads(pd["decode"], before)) == 1
    # ... and never twice: a replay is refused and reads nothing more.
    # (The decode's prefix cache now holds the two full blocks: the replay would read the last.)
    assert _refused(complete(pd["decode"].url, prompt, 4, timeout_s=DEADLINE_S, kv_transfer_params=params))
    assert len(_new_loads(pd["decode"], before)) == 1
    log = pd["decode"].log_path.read_text(errors="replace")
    assert "kvxfer: load of request" in log and "(params)" in log
    wait_for(lambda: _prefill_blocks_free(pd["prefill"]), 60, "the prefill to free every block")


def test_killed_prefill_fails_the_decode_request_without_hanging(pd):
    prompt = _prompt(90, seed=4000)
    params = _prefill_params(pd, prompt)
    pd["prefill"].kill()
    resp = complete(pd["decode"].url, prompt, 4, timeout_s=DEADLINE_S, kv_transfer_params=params)
    assert _refused(resp)
    log = pd["decode"].log_path.read_text(errors="replace")
    assert "(peer)" in log
    # The decode still serves: a plain request after the failure.
    assert token_ids(complete(pd["decode"].url, prompt, 4)) == token_ids(complete(pd["reference"].url, prompt, 4))
