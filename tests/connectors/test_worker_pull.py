"""NIXL connector workers pulling KV between real processes over UCX (CPU memory).

Prefill and decode ranks are separate processes; each process hosts the ranks of several
engines, one per (spec, TP). Expected bytes come from the design's head partition, written
out in the test, never from the connector's slices.
"""

import time

import numpy as np
import pytest
from connector_actors import Actor, held_heads

from kvxfer.connectors.base import RecvRequest
from kvxfer.connectors.config import KVTransferConfig
from kvxfer.ports import free_port
from kvxfer.specs import FullAttentionSpec, MLAAttentionSpec

SPECS = {
    "gqa4": FullAttentionSpec(num_kv_heads=4, head_size=8, num_layers=3, block_size=4, dtype="float32"),
    "gqa2": FullAttentionSpec(num_kv_heads=2, head_size=8, num_layers=3, block_size=4, dtype="float32"),
    "mla": MLAAttentionSpec(num_kv_heads=1, head_size=12, num_layers=3, block_size=4, dtype="float32"),
}
POOL = 24
TIMEOUT = 30


class Cluster:
    """Four prefill-side and four decode-side processes; engines are created on first use."""

    def __init__(self) -> None:
        self.prefill = [Actor(f"prefill-{i}") for i in range(4)]
        self.decode = [Actor(f"decode-{i}") for i in range(4)]
        self.configs = {}

    def engine(self, side: str, spec: str, tp: int, identity: str = "test-model"):
        """(the engine's rank actors, its worker key, its config), created on first use."""
        key = (side, spec, tp, identity)
        actors = (self.prefill if side == "prefill" else self.decode)[:tp]
        for attempt in range(3):  # a probed free port may be taken by another process before we bind it
            if key in self.configs:
                break
            if side == "prefill":
                config = KVTransferConfig(role="prefill", side_channel_port=free_port(), lease_seconds=TIMEOUT)
            else:
                config = KVTransferConfig(role="decode", handshake_timeout_s=2.0, transfer_timeout_s=10.0)
            for rank, actor in enumerate(actors):
                actor.submit("add_worker", key, config, SPECS[spec], rank, tp, POOL, identity)
            errors = []
            for actor in actors:
                try:
                    actor.result()
                except RuntimeError as e:
                    errors.append(e)
            if not errors:
                self.configs[key] = config
            elif "cannot bind the KV side channel" not in str(errors[0]) or attempt == 2:
                raise errors[0]
            else:
                for actor in actors:
                    actor.call("drop", key)
        return actors, key, self.configs[key]

    def close(self) -> None:
        for actor in self.prefill + self.decode:
            actor.close()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        yield c
    finally:
        c.close()


def recv_request(req_id, prefill_cfg, p_tp, decode_ids, prefill_ids, **override) -> RecvRequest:
    fields = dict(request_id=req_id, remote_request_id=req_id, remote_engine_id=prefill_cfg.engine_id,
                  remote_host="127.0.0.1", remote_port=prefill_cfg.side_channel_port, remote_tp_size=p_tp,
                  local_block_ids=decode_ids, remote_block_ids=prefill_ids)
    fields.update(override)
    return RecvRequest(**fields)


def pull(decode, d_key, requests, timeout=TIMEOUT):
    for actor in decode:
        actor.call("load", d_key, requests)
    for actor in decode:
        actor.submit("poll", d_key, timeout, [r.request_id for r in requests], ())
    return [actor.result(timeout + 10) for actor in decode]


def fill_prefill(prefill, p_key, spec, p_tp, prefill_ids, seed):
    head = spec.bytes_per_head_block()
    data = np.random.default_rng(seed).integers(0, 256, (len(prefill_ids), spec.num_kv_heads, head), dtype=np.uint8)
    for r, actor in enumerate(prefill):
        actor.call("fill", p_key, prefill_ids, data[:, held_heads(spec.num_kv_heads, r, p_tp)])
    return data


PAIRS = (
    [("gqa4", p, d) for p, d in [(1, 1), (1, 2), (2, 1), (2, 2), (2, 4), (4, 2), (1, 4), (4, 1)]]
    + [("gqa2", p, d) for p, d in [(1, 4), (4, 1), (4, 2), (2, 4), (4, 4)]]
    + [("mla", p, d) for p, d in [(1, 2), (2, 1), (4, 2), (1, 4), (4, 1)]]
)


@pytest.mark.parametrize("spec_name,p_tp,d_tp", PAIRS)
def test_pull_moves_exactly_each_decode_ranks_heads(cluster, spec_name, p_tp, d_tp):
    spec = SPECS[spec_name]
    prefill, p_key, p_cfg = cluster.engine("prefill", spec_name, p_tp)
    decode, d_key, _ = cluster.engine("decode", spec_name, d_tp)
    rng = np.random.default_rng(p_tp * 7 + d_tp)
    prefill_ids = rng.permutation(POOL)[:9].tolist()
    decode_ids = sorted(rng.permutation(POOL)[:9].tolist())  # runs of adjacent blocks, as an allocator gives
    data = fill_prefill(prefill, p_key, spec, p_tp, prefill_ids, seed=p_tp + 10 * d_tp)
    for actor in decode:
        actor.call("clear", d_key)
    req_id = f"{spec_name}-{p_tp}-{d_tp}"
    for actor in prefill:
        actor.call("hold", p_key, req_id, TIMEOUT)
    for actor in prefill:
        actor.submit("poll", p_key, TIMEOUT, (), (req_id,))
    outs = pull(decode, d_key, [recv_request(req_id, p_cfg, p_tp, decode_ids, prefill_ids)])
    sends = [actor.result(TIMEOUT + 10) for actor in prefill]

    for d, (actor, out) in enumerate(zip(decode, outs)):
        assert out["failed_recving"] == {} and req_id in out["finished_recving"]
        heads = held_heads(spec.num_kv_heads, d, d_tp)
        expected = np.zeros((POOL, len(heads), spec.bytes_per_head_block()), np.uint8)
        expected[decode_ids] = data[:, heads]
        np.testing.assert_array_equal(actor.call("dump", d_key), expected)
        stats = out["recv_stats"][req_id]
        assert stats["bytes"] == len(decode_ids) * len(heads) * spec.bytes_per_head_block()
        assert stats["descriptors"] >= 1 and stats["gbps"] > 0
    # Every prefill rank is released by its readers' notifications, not by the lease.
    for out in sends:
        assert req_id in out["finished_sending"] and not out["expired_sending"]


def test_notifications_before_the_hold_still_count(cluster):
    prefill, p_key, p_cfg = cluster.engine("prefill", "gqa4", 2)
    decode, d_key, _ = cluster.engine("decode", "gqa4", 1)
    outs = pull(decode, d_key, [recv_request("early", p_cfg, 2, [1, 2], [3, 4])])
    assert "early" in outs[0]["finished_recving"]
    time.sleep(0.1)
    for actor in prefill:
        actor.call("hold", p_key, "early", TIMEOUT)
    for actor in prefill:
        out = actor.call("poll", p_key, 5, (), ("early",))
        assert "early" in out["finished_sending"] and not out["expired_sending"]


def test_full_local_hit_notifies_without_reading(cluster):
    prefill, p_key, p_cfg = cluster.engine("prefill", "gqa2", 4)
    decode, d_key, _ = cluster.engine("decode", "gqa2", 2)
    for actor in prefill:
        actor.call("hold", p_key, "hit", TIMEOUT)
    outs = pull(decode, d_key, [recv_request("hit", p_cfg, 4, [], [])])
    for out in outs:
        assert "hit" in out["finished_recving"] and out["recv_stats"]["hit"]["bytes"] == 0
    for actor in prefill:
        out = actor.call("poll", p_key, 5, (), ("hit",))
        assert "hit" in out["finished_sending"] and not out["expired_sending"]


def test_lease_expiry_frees_and_counts(cluster):
    prefill, p_key, _ = cluster.engine("prefill", "mla", 2)
    before = [actor.call("counters", p_key)["expired_leases"] for actor in prefill]
    for actor in prefill:
        actor.call("hold", p_key, "abandoned", 0.5)
    start = time.monotonic()
    for actor in prefill:
        out = actor.call("poll", p_key, 5, (), ("abandoned",))
        assert out["expired_sending"] == {"abandoned"} and "abandoned" in out["finished_sending"]
    assert time.monotonic() - start < 3
    for actor, b in zip(prefill, before):
        assert actor.call("counters", p_key)["expired_leases"] == b + 1
        assert not actor.call("has_pending", p_key)


def test_remote_block_ids_beyond_the_peer_pool_fail_clearly(cluster):
    prefill, p_key, p_cfg = cluster.engine("prefill", "gqa4", 1)
    decode, d_key, _ = cluster.engine("decode", "gqa4", 2)
    for actor in decode:
        actor.call("clear", d_key)
    out = pull(decode, d_key, [recv_request("oob", p_cfg, 1, [0, 1], [2, POOL + 3])])
    for o in out:
        assert "out of range for the peer's pool of 24 blocks" in o["failed_recving"]["oob"]
    for actor in decode:
        assert not actor.call("dump", d_key).any()  # nothing was read
        assert not actor.call("has_pending", d_key)
    out = pull(decode, d_key, [recv_request("tp-lie", p_cfg, 2, [0], [2])])
    assert all("remote TP 2" in o["failed_recving"]["tp-lie"] for o in out)


def test_unknown_engine_dead_port_and_other_model_fail_by_handshake(cluster):
    prefill, p_key, p_cfg = cluster.engine("prefill", "gqa4", 2)
    decode, d_key, _ = cluster.engine("decode", "gqa4", 1)
    [out] = pull(decode, d_key, [recv_request("ghost", p_cfg, 2, [0], [0], remote_engine_id="ghost-engine")])
    assert "unknown remote engine 'ghost-engine'" in out["failed_recving"]["ghost"]
    start = time.monotonic()
    dead = recv_request("dead", p_cfg, 2, [0], [0], remote_engine_id="gone", remote_port=free_port())
    [out] = pull(decode, d_key, [dead])
    assert "timed out after 2.0s" in out["failed_recving"]["dead"] and time.monotonic() - start < 6
    other, o_key, _ = cluster.engine("decode", "gqa4", 1, identity="another-model")
    [out] = pull(other, o_key, [recv_request("foreign", p_cfg, 2, [0], [0])])
    assert "model_identity" in out["failed_recving"]["foreign"]


def test_dead_prefill_peer_fails_the_load_promptly(cluster):
    spec = SPECS["gqa4"]
    victim = Actor("prefill-victim")
    try:
        config = KVTransferConfig(role="prefill", side_channel_port=free_port(), lease_seconds=TIMEOUT)
        victim.call("add_worker", "victim", config, spec, 0, 1, POOL)
        decode, d_key, _ = cluster.engine("decode", "gqa4", 2)
        [out, _] = pull(decode, d_key, [recv_request("alive", config, 1, [5, 6], [1, 2])])
        assert "alive" in out["finished_recving"]
        victim.kill()
        start = time.monotonic()
        outs = pull(decode, d_key, [recv_request("orphan", config, 1, [5, 6], [1, 2])])
        for o in outs:
            assert "orphan" in o["failed_recving"]
        assert time.monotonic() - start < 12  # within the transfer time-out, not a hang
        for actor in decode:
            assert not actor.call("has_pending", d_key)
    finally:
        victim.close()


@pytest.mark.cuda
def test_vram_pull_between_processes():
    """KV pools in GPU memory (registered as VRAM); the same exact-bytes check."""
    spec = SPECS["gqa4"]
    prefill, decode = [Actor("vram-prefill-0"), Actor("vram-prefill-1")], [Actor("vram-decode-0")]
    try:
        p_cfg = KVTransferConfig(role="prefill", side_channel_port=free_port(), lease_seconds=TIMEOUT)
        d_cfg = KVTransferConfig(role="decode", handshake_timeout_s=5.0)
        for rank, actor in enumerate(prefill):
            actor.call("add_worker", "p", p_cfg, spec, rank, 2, POOL, "test-model", "cuda")
        decode[0].call("add_worker", "d", d_cfg, spec, 0, 1, POOL, "test-model", "cuda")
        prefill_ids, decode_ids = [3, 4, 5, 11], [0, 1, 7, 8]
        data = fill_prefill(prefill, "p", spec, 2, prefill_ids, seed=3)
        [out] = pull(decode, "d", [recv_request("vram", p_cfg, 2, decode_ids, prefill_ids)])
        assert "vram" in out["finished_recving"], out["failed_recving"]
        expected = np.zeros((POOL, spec.num_kv_heads, spec.bytes_per_head_block()), np.uint8)
        expected[decode_ids] = data
        np.testing.assert_array_equal(decode[0].call("dump", "d"), expected)
    finally:
        for actor in prefill + decode:
            actor.close()
