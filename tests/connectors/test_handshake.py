"""Handshake side channel over real zmq sockets on loopback."""

import time

import pytest
import zmq

from kvxfer.connectors.base import KVParamsError, KVPeerError
from kvxfer.connectors.handshake import HandshakeError, HandshakeServer, check_held, fetch_engine_metadata, register_rank
from kvxfer.connectors.metadata import PROTOCOL_VERSION, RankMetadata, Register, compat_of
from kvxfer.specs import FullAttentionSpec

SPEC = FullAttentionSpec(num_kv_heads=4, head_size=8, num_layers=2, block_size=16, dtype="float32")
COMPAT = compat_of(SPEC, "llama:0123")


def rank(r: int, num_blocks: int) -> RankMetadata:
    heads = SPEC.heads_per_rank(2)
    region = num_blocks * heads * SPEC.bytes_per_head_block()
    return RankMetadata(r, f"agent-{r}", b"meta-%d" % r, 4096 * (r + 1), region, 0, "DRAM", num_blocks, heads)


@pytest.fixture
def server(port):
    srv = HandshakeServer("127.0.0.1", port, "eng-a", 2, COMPAT)
    yield srv
    srv.close()


def test_serves_all_ranks_once_registered(server, port):
    server.add_rank(rank(0, 30))
    with pytest.raises(HandshakeError, match="not ready: 1 of 2"):
        fetch_engine_metadata("127.0.0.1", port, "eng-a", COMPAT, timeout_s=0.3)
    register_rank("127.0.0.1", port, Register("eng-a", COMPAT.hash(), 2, rank(1, 24)), timeout_s=2)
    meta = fetch_engine_metadata("127.0.0.1", port, "eng-a", COMPAT, timeout_s=2)
    assert meta.version == PROTOCOL_VERSION and meta.engine_id == "eng-a" and meta.tp_size == 2
    assert [r.tp_rank for r in meta.ranks] == [0, 1] and meta.ranks[1].agent_metadata == b"meta-1"
    assert meta.num_blocks == 24  # the MIN over ranks


def test_dead_port_times_out_promptly(port):
    start = time.monotonic()
    with pytest.raises(KVPeerError, match="timed out after 0.8s"):
        fetch_engine_metadata("127.0.0.1", port, "eng-a", COMPAT, timeout_s=0.8)
    assert time.monotonic() - start < 2.0


def test_mismatch_names_the_field(server, port):
    server.add_rank(rank(0, 8))
    server.add_rank(rank(1, 8))
    other = compat_of(FullAttentionSpec(4, 8, 3, 16, "float32"), "llama:0123")
    with pytest.raises(KVParamsError, match="num_layers: local 3 != remote 2"):
        fetch_engine_metadata("127.0.0.1", port, "eng-a", other, timeout_s=2)
    other_model = compat_of(SPEC, "qwen3:4567")
    with pytest.raises(ValueError, match="model_identity"):
        fetch_engine_metadata("127.0.0.1", port, "eng-a", other_model, timeout_s=2)


def test_unknown_engine_and_foreign_ranks_are_refused(server, port):
    server.add_rank(rank(0, 8))
    with pytest.raises(KVParamsError, match="unknown remote engine 'eng-b'"):
        fetch_engine_metadata("127.0.0.1", port, "eng-b", COMPAT, timeout_s=2)
    wrong_model = Register("eng-a", compat_of(SPEC, "other").hash(), 2, rank(1, 8))
    with pytest.raises(HandshakeError, match="does not match"):
        register_rank("127.0.0.1", port, wrong_model, timeout_s=2)


def test_held_check_answers_from_the_given_up_set(port):
    given_up = {"gone-1"}
    srv = HandshakeServer("127.0.0.1", port, "eng-a", 1, COMPAT, given_up.__contains__)
    try:
        check_held("127.0.0.1", port, "eng-a", "still-held", timeout_s=2)
        with pytest.raises(KVPeerError, match="'gone-1' is no longer held by engine 'eng-a'"):
            check_held("127.0.0.1", port, "eng-a", "gone-1", timeout_s=2)
        with pytest.raises(KVPeerError, match="unknown remote engine"):
            check_held("127.0.0.1", port, "eng-b", "still-held", timeout_s=2)
    finally:
        srv.close()


def test_malformed_request_gets_an_error_and_the_server_keeps_serving(server, port):
    server.add_rank(rank(0, 8))
    server.add_rank(rank(1, 8))
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    sock.send(b"\xc1garbage")
    assert sock.poll(2000)
    assert b"malformed" in sock.recv()
    sock.close()
    assert fetch_engine_metadata("127.0.0.1", port, "eng-a", COMPAT, timeout_s=2).tp_size == 2


def test_port_in_use_is_a_clear_error(server, port):
    with pytest.raises(HandshakeError, match=f"cannot bind the KV side channel at 127.0.0.1:{port}"):
        HandshakeServer("127.0.0.1", port, "eng-c", 1, COMPAT)
