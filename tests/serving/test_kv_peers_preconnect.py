"""A decode server started with `--kv-peers` handshakes with its prefill peer at start (metadata,
then the NIXL connection to each prefill rank), so its first request pulls without a handshake;
one started without it handshakes on its first request, once. Counted by the decode servers:
`kvxfer_kv_handshakes_total` (peer handshakes of their ranks)."""

from __future__ import annotations

import random

import httpx
from serving_helpers import metrics, wait_metric

HANDSHAKES = "kvxfer_kv_handshakes_total"
RNG = random.Random(11)


def _pull(prefill, decode) -> None:
    """One request, prefill leg then decode leg; the decode leg must pull the prompt's KV."""
    body = {"model": "tiny-qwen3", "prompt": [RNG.randrange(3, 500) for _ in range(40)], "max_tokens": 2,
            "temperature": 0, "ignore_eos": True}
    first = httpx.post(f"{prefill.url}/v1/completions", timeout=60,
                       json={**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
    assert first.status_code == 200, first.text
    second = httpx.post(f"{decode.url}/v1/completions", timeout=60,
                        json={**body, "kv_transfer_params": first.json()["kv_transfer_params"]})
    assert second.status_code == 200, second.text
    answer = second.json()
    assert answer["usage"]["completion_tokens"] == 2
    assert answer["kv_transfer_stats"]["bytes"] > 0 and not answer["kv_transfer_stats"].get("recomputed")


def test_a_decode_given_its_peers_pulls_its_first_request_without_a_handshake(cluster):
    prefill = cluster.server("prefill", "prefill")
    cluster.wait_healthy()
    side_channel_port = prefill.argv[prefill.argv.index("--side-channel-port") + 1]
    connected = cluster.server("decode-peers", "decode", 1, "--kv-peers", f"127.0.0.1:{side_channel_port}")
    lazy = cluster.server("decode-lazy", "decode")
    cluster.wait_healthy()
    wait_metric(connected.url, HANDSHAKES, 1)  # at its start (reported with its first engine step)
    assert metrics(lazy.url).get(HANDSHAKES, 0) == 0

    _pull(prefill, connected)
    assert metrics(connected.url)[HANDSHAKES] == 1  # its first request did no handshake

    _pull(prefill, lazy)
    assert metrics(lazy.url)[HANDSHAKES] == 1  # the other one handshook on its first request
    _pull(prefill, lazy)
    _pull(prefill, connected)
    assert metrics(lazy.url)[HANDSHAKES] == 1 and metrics(connected.url)[HANDSHAKES] == 1  # once each
