"""NIXL connector workers pulling KV between real processes over UCX (CPU memory).

Prefill and decode ranks are separate processes; each process hosts the ranks of several
engines, one per (spec, TP). Expected bytes come from the design's head partition, written
out in the test, never from the connector's slices.
"""

import time

import numpy as np
import pytest
from connector_actors import Actor, held_heads

from kvxfer.connectors.base import ConnectorMetadata, KVConnectorOutput, RecvRequest
from kvxfer.connectors.config import KVTransferConfig
from kvxfer.connectors.handshake import HandshakeError
from kvxfer.connectors.metadata import ReadDone, RemotePrefillParams
from kvxfer.connectors.nixl_scheduler import NixlConnectorScheduler
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
    """Four prefill-side and four decode-side processes; engines are created on first use. A
    prefill engine's hold table and side channel (its scheduler side) live in this process."""

    def __init__(self) -> None:
        self.prefill = [Actor(f"prefill-{i}") for i in range(4)]
        self.decode = [Actor(f"decode-{i}") for i in range(4)]
        self.configs = {}
        self.tables: dict = {}  # prefill worker key -> NixlConnectorScheduler
        self.actors: dict = {}  # worker key -> its rank actors

    def engine(self, side: str, spec: str, tp: int, identity: str = "test-model", lease: float = TIMEOUT,
               actors=None, config=None, tag: str = ""):
        """(the engine's rank actors, its worker key, its config), created on first use."""
        key = (side, spec, tp, identity, lease, tag)
        actors = actors or (self.prefill if side == "prefill" else self.decode)[:tp]
        for attempt in range(3):  # a probed free port may be taken by another process before we bind it
            if key in self.configs:
                break
            if side == "prefill":
                config = config or KVTransferConfig(role="prefill", side_channel_port=free_port(), lease_seconds=lease)
                try:
                    self.tables[key] = NixlConnectorScheduler(config, SPECS[spec], tp, identity)
                except HandshakeError as e:
                    if attempt == 2:
                        raise
                    config = None
                    continue
            else:
                config = config or KVTransferConfig(role="decode", handshake_timeout_s=2.0, transfer_timeout_s=10.0)
            for rank, actor in enumerate(actors):
                actor.call("add_worker", key, config, SPECS[spec], rank, tp, POOL, identity)
            if side == "prefill":
                wait_for(lambda: self.tables[key].server.metadata() is not None, "ranks to register")
            self.configs[key] = config
            self.actors[key] = actors
        return self.actors[key], key, self.configs[key]

    def hold(self, p_key, req_id: str, prefill_ids: list[int], apply: bool = True) -> RemotePrefillParams:
        """Hold a request on the prefill engine the way the engine does: in its table, then (at
        the next step) on every rank."""
        table = self.tables[p_key]
        params = table.hold(req_id, prefill_ids, len(prefill_ids) * SPECS[p_key[1]].block_size, 0)
        if apply:
            self.step(p_key)
        return params

    def step(self, p_key) -> ConnectorMetadata:
        meta = self.tables[p_key].build_connector_meta(None)
        for actor in self.actors[p_key]:
            actor.call("apply", p_key, meta)
        return meta

    def finished(self, p_key, outs) -> None:
        """Report the prefill ranks' outputs to the table (as the engine does once all ranks have)."""
        done = set.intersection(*(o["finished_sending"] for o in outs))
        self.tables[p_key].update_connector_output(KVConnectorOutput(finished_sending=done))

    def close(self) -> None:
        for actor in self.prefill + self.decode:
            actor.close()
        for table in self.tables.values():
            table.shutdown()


def wait_for(cond, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        yield c
    finally:
        c.close()


def recv_request(req_id, params: RemotePrefillParams, decode_ids, **override) -> RecvRequest:
    fields = dict(request_id=req_id, remote_request_id=params.remote_request_id,
                  remote_engine_id=params.remote_engine_id, remote_instance_id=params.remote_instance_id,
                  remote_host=params.remote_host, remote_port=params.remote_port, remote_tp_size=params.remote_tp_size,
                  transfer_token=params.transfer_token, held_block_ids=list(params.remote_block_ids),
                  local_block_ids=[decode_ids], remote_block_ids=[list(params.remote_block_ids[: len(decode_ids)])])
    fields.update(override)
    return RecvRequest(**fields)


def pull(decode, d_key, requests, timeout=TIMEOUT):
    for actor in decode:
        actor.call("load", d_key, requests)
    for actor in decode:
        actor.submit("poll", d_key, timeout, [r.request_id for r in requests], ())
    return [actor.result(timeout + 10) for actor in decode]


def poll_sends(prefill, p_key, ids, timeout=TIMEOUT):
    for actor in prefill:
        actor.submit("poll", p_key, timeout, (), tuple(ids))
    return [actor.result(timeout + 10) for actor in prefill]


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
    prefill, p_key, _ = cluster.engine("prefill", spec_name, p_tp)
    decode, d_key, _ = cluster.engine("decode", spec_name, d_tp)
    rng = np.random.default_rng(p_tp * 7 + d_tp)
    prefill_ids = rng.permutation(POOL)[:9].tolist()
    decode_ids = sorted(rng.permutation(POOL)[:9].tolist())  # runs of adjacent blocks, as an allocator gives
    data = fill_prefill(prefill, p_key, spec, p_tp, prefill_ids, seed=p_tp + 10 * d_tp)
    for actor in decode:
        actor.call("clear", d_key)
    req_id = f"{spec_name}-{p_tp}-{d_tp}"
    params = cluster.hold(p_key, req_id, prefill_ids)
    for actor in prefill:
        actor.submit("poll", p_key, TIMEOUT, (), (req_id,))
    outs = pull(decode, d_key, [recv_request(req_id, params, decode_ids)])
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
    cluster.finished(p_key, sends)
    assert not cluster.tables[p_key].is_held(req_id)


def test_notifications_before_the_hold_still_count(cluster):
    prefill, p_key, _ = cluster.engine("prefill", "gqa4", 2)
    decode, d_key, _ = cluster.engine("decode", "gqa4", 1)
    params = cluster.hold(p_key, "early", [3, 4], apply=False)  # the ranks hear of it at the next step
    outs = pull(decode, d_key, [recv_request("early", params, [1, 2])])
    assert "early" in outs[0]["finished_recving"]
    cluster.step(p_key)
    sends = poll_sends(prefill, p_key, ["early"], 5)
    for out in sends:
        assert "early" in out["finished_sending"] and not out["expired_sending"]
    cluster.finished(p_key, sends)


def test_full_local_hit_notifies_without_reading(cluster):
    prefill, p_key, _ = cluster.engine("prefill", "gqa2", 4)
    decode, d_key, _ = cluster.engine("decode", "gqa2", 2)
    params = cluster.hold(p_key, "hit", [5, 6])
    outs = pull(decode, d_key, [recv_request("hit", params, [])])
    for out in outs:
        assert "hit" in out["finished_recving"] and out["recv_stats"]["hit"]["bytes"] == 0
    sends = poll_sends(prefill, p_key, ["hit"], 5)
    for out in sends:
        assert "hit" in out["finished_sending"] and not out["expired_sending"]
    cluster.finished(p_key, sends)


def test_lease_expiry_is_decided_once_for_all_ranks(cluster):
    prefill, p_key, _ = cluster.engine("prefill", "mla", 2, lease=0.5)
    before = [actor.call("counters", p_key)["expired_leases"] for actor in prefill]
    cluster.hold(p_key, "abandoned", [1])
    wait_for(lambda: cluster.step(p_key).expire == ["abandoned"], "the lease to expire")
    sends = poll_sends(prefill, p_key, ["abandoned"], 5)
    for out in sends:
        assert out["expired_sending"] == {"abandoned"} and "abandoned" in out["finished_sending"]
    cluster.finished(p_key, sends)
    for actor, b in zip(prefill, before):
        assert actor.call("counters", p_key)["expired_leases"] == b + 1
        assert not actor.call("has_pending", p_key)


def test_forged_stale_or_made_up_holds_are_refused_before_anything_is_read(cluster):
    """Finding 3 and the victim's blocks: only the token issued for exactly these blocks reads."""
    spec = SPECS["gqa4"]
    prefill, p_key, _ = cluster.engine("prefill", "gqa4", 1)
    decode, d_key, _ = cluster.engine("decode", "gqa4", 2)
    fill_prefill(prefill, p_key, spec, 1, [7, 8], seed=5)
    victim = cluster.hold(p_key, "victim", [7, 8])
    before = cluster.tables[p_key].stats()["refused_checks"]
    attacks = {
        "guess": recv_request("guess", victim, [0, 1], transfer_token="0" * 32),
        "made-up": recv_request("made-up", victim, [0, 1], remote_request_id="made-up"),
        "other-blocks": recv_request("other-blocks", victim, [0, 1], held_block_ids=[7, 9], remote_block_ids=[[7, 9]]),
    }
    for actor in decode:
        actor.call("clear", d_key)
    for name, req in attacks.items():
        for out in pull(decode, d_key, [req]):
            assert out["failure_kinds"][name] == "params", out["failed_recving"]
    for actor in decode:
        assert not actor.call("dump", d_key).any()  # the victim's KV was never copied
    assert cluster.tables[p_key].stats()["refused_checks"] == before + 2 * len(attacks)
    # The victim's own pull still works, and once it finished its id is "not held" any more.
    outs = pull(decode, d_key, [recv_request("victim", victim, [0, 1])])
    assert all("victim" in o["finished_recving"] for o in outs)
    cluster.finished(p_key, poll_sends(prefill, p_key, ["victim"], 10))
    for out in pull(decode, d_key, [recv_request("again", victim, [2, 3])]):
        assert "'victim' is not held" in out["failed_recving"]["again"]


def test_a_read_done_with_a_wrong_token_is_refused_and_changes_nothing(cluster):
    prefill, p_key, p_cfg = cluster.engine("prefill", "gqa4", 1)
    decode, d_key, d_cfg = cluster.engine("decode", "gqa4", 1)
    params = cluster.hold(p_key, "real", [2, 3])
    pull(decode, d_key, [recv_request("warm", cluster.hold(p_key, "warm", [4]), [5])])  # handshake done
    before = prefill[0].call("counters", p_key)["refused_notifications"]
    forged = ReadDone("real", "f" * 32, d_cfg.engine_id, 0, 1)
    decode[0].call("notify", d_key, p_cfg.engine_id, 0, forged)
    polled = []

    def refused() -> bool:
        polled.append(prefill[0].call("poll", p_key, 0.05, (), ()))
        return prefill[0].call("counters", p_key)["refused_notifications"] == before + 1

    wait_for(refused, "the forged ReadDone")
    assert not any("real" in p["finished_sending"] for p in polled)  # the real holder keeps its blocks
    [out] = pull(decode, d_key, [recv_request("real", params, [0, 1])])
    assert "real" in out["finished_recving"]
    sends = poll_sends(prefill, p_key, ["real"], 10)
    assert "real" in sends[0]["finished_sending"] and not sends[0]["expired_sending"]
    cluster.finished(p_key, sends)


def test_remote_block_ids_beyond_the_peer_pool_fail_clearly(cluster):
    prefill, p_key, _ = cluster.engine("prefill", "gqa4", 1)
    decode, d_key, _ = cluster.engine("decode", "gqa4", 2)
    for actor in decode:
        actor.call("clear", d_key)
    params = cluster.hold(p_key, "oob", [2, 3])
    out = pull(decode, d_key, [recv_request("oob", params, [0, 1], held_block_ids=[2, POOL + 3],
                                            remote_block_ids=[[2, POOL + 3]])])
    for o in out:
        assert "out of range for the peer's pool of 24 blocks" in o["failed_recving"]["oob"]
    for actor in decode:
        assert not actor.call("dump", d_key).any()  # nothing was read
        assert not actor.call("has_pending", d_key)
    out = pull(decode, d_key, [recv_request("tp-lie", params, [0], remote_tp_size=2)])
    assert all("remote TP 2" in o["failed_recving"]["tp-lie"] for o in out)


def test_unknown_engine_dead_port_and_other_model_fail_by_handshake(cluster):
    prefill, p_key, _ = cluster.engine("prefill", "gqa4", 2)
    decode, d_key, _ = cluster.engine("decode", "gqa4", 1)
    params = cluster.hold(p_key, "probe", [1])
    [out] = pull(decode, d_key, [recv_request("ghost", params, [0], remote_engine_id="ghost-engine")])
    assert "unknown remote engine 'ghost-engine'" in out["failed_recving"]["ghost"]
    start = time.monotonic()
    dead = recv_request("dead", params, [0], remote_engine_id="gone", remote_port=free_port())
    [out] = pull(decode, d_key, [dead])
    assert "timed out after 2.0s" in out["failed_recving"]["dead"] and time.monotonic() - start < 30
    other, o_key, _ = cluster.engine("decode", "gqa4", 1, identity="another-model")
    [out] = pull(other, o_key, [recv_request("foreign", params, [0])])
    assert "model_identity" in out["failed_recving"]["foreign"]


def test_peers_are_known_by_engine_id_address_and_instance(cluster):
    """Finding 4: a known engine id at another address, two engines with one id, and a restart."""
    spec = SPECS["gqa4"]
    prefill, p_key, p_cfg = cluster.engine("prefill", "gqa4", 1)
    decode, d_key, _ = cluster.engine("decode", "gqa4", 1)
    fill_prefill(prefill, p_key, spec, 1, [1], seed=9)
    [out] = pull(decode, d_key, [recv_request("known", cluster.hold(p_key, "known", [1]), [0])])
    assert "known" in out["finished_recving"]
    # A second engine started with the same --engine-id elsewhere: its params never read the first one.
    twin_cfg = KVTransferConfig(role="prefill", engine_id=p_cfg.engine_id, side_channel_port=free_port(),
                                lease_seconds=TIMEOUT)
    _, t_key, _ = cluster.engine("prefill", "gqa4", 1, actors=[cluster.prefill[3]], config=twin_cfg, tag="twin")
    twin = cluster.hold(t_key, "twin", [1])
    [out] = pull(decode, d_key, [recv_request("twin", twin, [0])])
    assert "(two engines with one id?)" in out["failed_recving"]["twin"]
    assert out["failure_kinds"]["twin"] == "params"
    # Params naming the known address but another instance (a stale restart) are refused.
    [out] = pull(decode, d_key, [recv_request("stale", cluster.hold(p_key, "stale", [2]), [0],
                                              remote_instance_id=twin.remote_instance_id)])
    assert "instance" in out["failed_recving"]["stale"] and out["failure_kinds"]["stale"] == "params"


def test_a_transfer_timeout_that_does_not_fit_the_lease_fails_clearly(cluster):
    """Finding 9: the lease travels in the handshake; the decode's time-out must fit inside it."""
    prefill, p_key, _ = cluster.engine("prefill", "gqa2", 1, lease=5.0)
    decode, d_key, _ = cluster.engine("decode", "gqa2", 1)  # transfer_timeout_s 10
    params = cluster.hold(p_key, "tight", [1])
    [out] = pull(decode, d_key, [recv_request("tight", params, [0])])
    assert "transfer_timeout_s (10s) + 2s margin does not fit inside the prefill's lease_seconds (5s)" \
        in out["failed_recving"]["tight"]
    assert out["failure_kinds"]["tight"] == "params"


def test_configured_peers_handshake_at_start_and_a_lease_misfit_fails_the_start(cluster):
    prefill, p_key, p_cfg = cluster.engine("prefill", "gqa2", 1, lease=5.0)
    address = f"127.0.0.1:{p_cfg.side_channel_port}"
    decode = cluster.decode[3]
    tight = KVTransferConfig(role="decode", transfer_timeout_s=10.0, handshake_timeout_s=2.0, peers=(address,))
    with pytest.raises(RuntimeError, match=r"transfer_timeout_s \(10s\) \+ 2s margin does not fit inside the "
                                           r"prefill's lease_seconds \(5s\)"):
        decode.call("add_worker", "peers-tight", tight, SPECS["gqa2"], 0, 1, POOL)
    fits = KVTransferConfig(role="decode", transfer_timeout_s=2.0, handshake_timeout_s=2.0,
                            peers=(address, f"127.0.0.1:{free_port()}"))  # the second is not up: left for later
    decode.call("add_worker", "peers-ok", fits, SPECS["gqa2"], 0, 1, POOL)
    try:
        assert decode.call("peers", "peers-ok") == {p_cfg.engine_id: ("127.0.0.1", p_cfg.side_channel_port)}
        params = cluster.hold(p_key, "configured", [2])
        [out] = pull([decode], "peers-ok", [recv_request("configured", params, [0])])
        assert "configured" in out["finished_recving"], out["failed_recving"]
    finally:
        decode.call("drop", "peers-ok")
    with pytest.raises(ValueError, match="HOST:PORT"):
        KVTransferConfig(role="decode", peers=("no-port",))
    with pytest.raises(ValueError, match="for engines that load KV"):
        KVTransferConfig(role="prefill", side_channel_port=5600, peers=(address,))


def test_with_an_auth_key_only_keyed_instances_pull(cluster):
    spec, key = SPECS["gqa2"], b"0123456789abcdef0123456789abcdef"
    p_cfg = KVTransferConfig(role="prefill", side_channel_port=free_port(), lease_seconds=TIMEOUT, auth_key=key)
    prefill, p_key, _ = cluster.engine("prefill", "gqa2", 2, config=p_cfg, tag="auth")
    d_cfg = KVTransferConfig(role="decode", handshake_timeout_s=2.0, transfer_timeout_s=10.0, auth_key=key)
    keyed, k_key, _ = cluster.engine("decode", "gqa2", 1, config=d_cfg, tag="auth")
    plain, n_key, _ = cluster.engine("decode", "gqa2", 1)
    data = fill_prefill(prefill, p_key, spec, 2, [4, 5], seed=11)
    params = cluster.hold(p_key, "keyed", [4, 5])
    for actor in plain + keyed:
        actor.call("clear", n_key if actor in plain else k_key)
    [out] = pull(plain, n_key, [recv_request("keyless", params, [0, 1])])
    assert "unauthenticated" in out["failed_recving"]["keyless"] and out["failure_kinds"]["keyless"] == "params"
    assert not plain[0].call("dump", n_key).any()
    [out] = pull(keyed, k_key, [recv_request("keyed", params, [0, 1])])
    assert "keyed" in out["finished_recving"], out["failed_recving"]
    expected = np.zeros((POOL, spec.num_kv_heads, spec.bytes_per_head_block()), np.uint8)
    expected[[0, 1]] = data
    np.testing.assert_array_equal(keyed[0].call("dump", k_key), expected)
    cluster.finished(p_key, poll_sends(prefill, p_key, ["keyed"], 10))


def test_dead_prefill_peer_fails_the_load_promptly(cluster):
    spec = SPECS["gqa4"]
    victim = Actor("prefill-victim")
    config = KVTransferConfig(role="prefill", side_channel_port=free_port(), lease_seconds=TIMEOUT)
    table = NixlConnectorScheduler(config, spec, 1, "test-model")
    try:
        victim.call("add_worker", "victim", config, spec, 0, 1, POOL)
        wait_for(lambda: table.server.metadata() is not None, "the victim to register")
        decode, d_key, _ = cluster.engine("decode", "gqa4", 2)
        [out, _] = pull(decode, d_key, [recv_request("alive", table.hold("alive", [1, 2], 8, 0), [5, 6])])
        assert "alive" in out["finished_recving"]
        victim.kill()
        start = time.monotonic()
        outs = pull(decode, d_key, [recv_request("orphan", table.hold("orphan", [1, 2], 8, 0), [5, 6])])
        for o in outs:
            assert "orphan" in o["failed_recving"]
        assert time.monotonic() - start < 60  # bounded by the transfer time-out, not a hang (generous: busy hosts)
        for actor in decode:
            assert not actor.call("has_pending", d_key)
    finally:
        victim.close()
        table.shutdown()


@pytest.mark.cuda
def test_vram_pull_between_processes():
    """KV pools in GPU memory (registered as VRAM); the same exact-bytes check."""
    spec = SPECS["gqa4"]
    prefill, decode = [Actor("vram-prefill-0"), Actor("vram-prefill-1")], [Actor("vram-decode-0")]
    p_cfg = KVTransferConfig(role="prefill", side_channel_port=free_port(), lease_seconds=TIMEOUT)
    table = NixlConnectorScheduler(p_cfg, spec, 2, "test-model")
    try:
        d_cfg = KVTransferConfig(role="decode", handshake_timeout_s=5.0)
        for rank, actor in enumerate(prefill):
            actor.call("add_worker", "p", p_cfg, spec, rank, 2, POOL, "test-model", "cuda")
        decode[0].call("add_worker", "d", d_cfg, spec, 0, 1, POOL, "test-model", "cuda")
        wait_for(lambda: table.server.metadata() is not None, "the prefill ranks to register")
        prefill_ids, decode_ids = [3, 4, 5, 11], [0, 1, 7, 8]
        data = fill_prefill(prefill, "p", spec, 2, prefill_ids, seed=3)
        params = table.hold("vram", prefill_ids, 16, 0)
        [out] = pull(decode, "d", [recv_request("vram", params, decode_ids)])
        assert "vram" in out["finished_recving"], out["failed_recving"]
        expected = np.zeros((POOL, spec.num_kv_heads, spec.bytes_per_head_block()), np.uint8)
        expected[decode_ids] = data
        np.testing.assert_array_equal(decode[0].call("dump", "d"), expected)
    finally:
        for actor in prefill + decode:
            actor.close()
        table.shutdown()
