"""Issue 20 hole 1: one client could fail other clients' pulls. Params naming the real prefill
engine at a wrong address, sent just before a victim's request to a decode that had not
handshaken yet, queued the victim behind a handshake with the wrong address (502 after the
handshake time-out). Now a peer is (engine id, address): each address is handshaken on its own,
a request naming a known engine elsewhere is refused at once (400), and `--kv-allowed-peers`
bounds the addresses a decode connects to at all. Real servers and NIXL."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serving_helpers import BLOCK_SIZE, Cluster, wait_all_blocks_free, wait_metric

HANDSHAKE_S = 10  # the wrong address's handshake lasts this long: the victim arrives meanwhile
PROMPT = [(i * 29) % 480 + 5 for i in range(2 * BLOCK_SIZE + 3)]


@pytest.fixture(scope="module")
def pd(tiny_qwen3, tmp_path_factory):
    cluster = Cluster(tiny_qwen3, tmp_path_factory.mktemp("peers-logs"))
    try:
        prefill = cluster.server("prefill", "prefill", 1)
        decode = cluster.server("decode", "decode", 1, "--kv-handshake-timeout", str(HANDSHAKE_S),
                                "--kv-allowed-peers", "127.0.0.0/8")
        cluster.wait_healthy()
        yield prefill, decode
    finally:
        cluster.stop()


def _prefill_leg(prefill) -> dict:
    r = httpx.post(f"{prefill.url}/v1/completions", timeout=120, json={
        "prompt": PROMPT, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
    assert r.status_code == 200, r.text
    return r.json()["kv_transfer_params"]


def _decode_leg(decode, params: dict) -> httpx.Response:
    return httpx.post(f"{decode.url}/v1/completions", timeout=120, json={
        "prompt": PROMPT, "max_tokens": 2, "kv_transfer_params": params})


def test_a_wrong_address_for_a_real_engine_does_not_fail_another_clients_pull(pd):
    prefill, decode = pd
    http_port = int(prefill.url.rsplit(":", 1)[1])  # answers, but not as a side channel
    attacker, victim = _prefill_leg(prefill), _prefill_leg(prefill)
    with ThreadPoolExecutor(1) as pool:
        wrong = pool.submit(_decode_leg, decode, attacker | {"remote_port": http_port})
        # The attacker's load waits for its handshake with the wrong address (HANDSHAKE_S long).
        wait_metric(decode.url, "kvxfer_waiting_for_remote_kv_requests", 1, 60)
        r = _decode_leg(decode, victim)
        assert r.status_code == 200 and r.json()["kv_transfer_stats"]["bytes"] > 0, (r.status_code, r.text[:300])
        answer = wrong.result(timeout=HANDSHAKE_S * 6)
    assert answer.status_code in (400, 502), answer.text  # only the attacker's own pull fails
    # Now the engine is known at its real address: another address for it is refused at once.
    r = _decode_leg(decode, attacker | {"remote_port": http_port})
    assert r.status_code == 400 and "is known at" in r.text, (r.status_code, r.text[:300])
    r = _decode_leg(decode, attacker)  # and the attacker's genuine params still pull
    assert r.status_code == 200 and r.json()["kv_transfer_stats"]["bytes"] > 0, r.text
    wait_all_blocks_free(decode.url)
    wait_all_blocks_free(prefill.url)


def test_params_naming_an_address_outside_the_allow_list_are_refused_before_connecting(pd):
    prefill, decode = pd
    params = _prefill_leg(prefill)
    for host in ("10.9.8.7", "localhost"):  # outside 127.0.0.0/8; a name is not resolved to match
        r = _decode_leg(decode, params | {"remote_host": host})
        assert r.status_code == 400 and "--kv-allowed-peers" in r.text, (host, r.status_code, r.text[:300])
    r = _decode_leg(decode, params)
    assert r.status_code == 200 and r.json()["kv_transfer_stats"]["bytes"] > 0, r.text
    wait_all_blocks_free(decode.url)
    wait_all_blocks_free(prefill.url)
