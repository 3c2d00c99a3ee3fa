"""Hostile input to a decode server: property-based `kv_transfer_params` (hypothesis), and an
attacker's own valid params aimed at a victim's held blocks. The server stays healthy, nothing
leaks, and no foreign KV is ever returned: a completion computed from another request's blocks
must be an error, never output.

`test_victims_blocks_are_never_returned` needs the prefill side's transfer tokens (H1).
"""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_helpers import BLOCK_SIZE, Cluster, wait_all_blocks_free

LEASE_S = 8
PROMPT = [(i * 37) % 480 + 7 for i in range(2 * BLOCK_SIZE + 5)]


@pytest.fixture(scope="module")
def pd(tiny_qwen3, tmp_path_factory):
    cluster = Cluster(tiny_qwen3, tmp_path_factory.mktemp("hostile-logs"))
    try:
        prefill = cluster.server("prefill", "prefill", 1, "--kv-lease-seconds", str(LEASE_S))
        decode = cluster.server("decode", "decode", 1, "--kv-transfer-timeout", "3", "--kv-handshake-timeout", "2")
        cluster.wait_healthy()
        yield prefill, decode
    finally:
        cluster.stop()


def _prefill_leg(prefill, prompt: list[int]) -> dict:
    r = httpx.post(f"{prefill.url}/v1/completions", timeout=120, json={
        "prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
    assert r.status_code == 200, r.text
    return r.json()["kv_transfer_params"]


_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2, 1 << 40), st.text(max_size=12),
                    st.floats(allow_nan=False, allow_infinity=False), st.lists(st.integers(-3, 1 << 20), max_size=6))


def _hostile_params(genuine: dict):
    """Genuine params with fields replaced, dropped or added, or no object at all."""
    mutated = st.fixed_dictionaries({}, optional={k: _scalar for k in genuine}).map(
        lambda changes: genuine | changes)
    dropped = st.sets(st.sampled_from(sorted(genuine))).map(
        lambda keys: {k: v for k, v in genuine.items() if k not in keys})
    extra = st.dictionaries(st.text(min_size=1, max_size=8), _scalar, max_size=3).map(lambda d: d | genuine)
    return st.one_of(mutated, dropped, extra, _scalar, st.dictionaries(st.text(max_size=8), _scalar, max_size=4))


def test_property_based_params_never_break_the_decode_server(pd):
    prefill, decode = pd
    genuine = _prefill_leg(prefill, PROMPT)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(params=_hostile_params(genuine))
    def one(params):
        r = httpx.post(f"{decode.url}/v1/completions", timeout=120, json={
            "prompt": PROMPT, "max_tokens": 2, "kv_transfer_params": params})
        # An answer, never a server error: 4xx for bad params, 502 for a peer that fails,
        # 200 only for params that are the genuine ones in effect.
        assert r.status_code in (200, 400, 404, 409, 422, 502), (params, r.status_code, r.text)
        if r.status_code == 200 and isinstance(params, dict) and params.get("do_remote_prefill"):
            assert {k: params.get(k) for k in ("remote_block_ids", "remote_request_id")} == \
                {k: genuine[k] for k in ("remote_block_ids", "remote_request_id")}, params

    one()
    assert httpx.get(f"{decode.url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{prefill.url}/health", timeout=30).status_code == 200
    wait_all_blocks_free(decode.url)
    wait_all_blocks_free(prefill.url, timeout_s=LEASE_S + 60)


def test_victims_blocks_are_never_returned(pd):
    """An attacker's own valid params naming the victim's held blocks (or request id) get an
    error, not a completion computed from the victim's KV."""
    prefill, decode = pd
    victim_prompt = [(i * 11) % 480 + 9 for i in range(len(PROMPT))]
    victim = _prefill_leg(prefill, victim_prompt)
    for forged in ("remote_block_ids", "both"):
        attacker = _prefill_leg(prefill, PROMPT)
        params = attacker | {"remote_block_ids": victim["remote_block_ids"]}
        if forged == "both":
            params["remote_request_id"] = victim["remote_request_id"]
        r = httpx.post(f"{decode.url}/v1/completions", timeout=120, json={
            "prompt": PROMPT, "max_tokens": 2, "kv_transfer_params": params})
        assert r.status_code in (400, 403, 409), f"{forged}: {r.status_code} {r.text[:300]}"
        httpx.post(f"{prefill.url}/v1/abort/{attacker['remote_request_id']}", timeout=30,
                   json={"transfer_token": attacker.get("transfer_token")} if attacker.get("transfer_token") else None)
    # The victim's own transfer still works afterwards.
    r = httpx.post(f"{decode.url}/v1/completions", timeout=120, json={
        "prompt": victim_prompt, "max_tokens": 2, "kv_transfer_params": victim})
    assert r.status_code == 200 and r.json()["kv_transfer_stats"]["bytes"] > 0, r.text
    wait_all_blocks_free(decode.url)
    wait_all_blocks_free(prefill.url, timeout_s=LEASE_S + 60)
