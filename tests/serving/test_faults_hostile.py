"""Hostile input: property-based `kv_transfer_params` (hypothesis) to a decode server, an
attacker's own valid params aimed at a victim's held blocks, and random, truncated or forged
frames to a prefill's side channel. The servers stay healthy, nothing leaks, and no foreign KV
is ever returned: a completion computed from another request's blocks must be an error.

`test_victims_blocks_are_never_returned` needs the prefill side's transfer tokens and
`test_side_channel_survives_hostile_frames` its hardened side channel (H1). Issue 20's holes 2-4
(block ids past 2^64, concurrent replays of one token, pins past the lease) and issue 18's
expired-lease gap each have a test here; hole 1 is in test_faults_peers.py.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_helpers import BLOCK_SIZE, Cluster, metrics, wait_all_blocks_free

LEASE_S = 8
REPLAYS, ROUNDS = 8, 10  # concurrent replays of one params set, and how many times
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


# Integers past 2^64 too: every integer field is bounded at parse time (issue 20, hole 2).
_big = st.one_of(st.just(2**64), st.integers(2**63, 2**70))
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2, 1 << 40), _big, st.text(max_size=12),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.lists(st.one_of(st.integers(-3, 1 << 20), _big), max_size=6))


def _too_big(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 2**63
    if isinstance(value, (list, tuple)):
        return any(map(_too_big, value))
    if isinstance(value, dict):
        return any(map(_too_big, value.values()))
    return False


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
        assert r.status_code in (200, 400, 404, 409, 422, 502, 504), (params, r.status_code, r.text)
        if isinstance(params, dict) and params.get("do_remote_prefill") is True and _too_big(params):
            assert r.status_code == 400, (params, r.status_code, r.text)  # refused at parse, never a 502
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


def test_block_ids_past_2_64_are_a_400(pd):
    """Hole 2 of issue 20: a block id of 2^64 passed the parse and failed to encode in the hold
    check (502); it is a 400 naming the field, and the genuine params still pull."""
    prefill, decode = pd
    genuine = _prefill_leg(prefill, PROMPT)
    for big in (2**64, 2**63):
        params = genuine | {"remote_block_ids": [big] + genuine["remote_block_ids"][1:]}
        r = httpx.post(f"{decode.url}/v1/completions", timeout=120, json={
            "prompt": PROMPT, "max_tokens": 2, "kv_transfer_params": params})
        assert r.status_code == 400 and "remote_block_ids" in r.text, (big, r.status_code, r.text[:300])
    r = httpx.post(f"{decode.url}/v1/completions", timeout=120, json={
        "prompt": PROMPT, "max_tokens": 2, "kv_transfer_params": genuine})
    assert r.status_code == 200 and r.json()["kv_transfer_stats"]["bytes"] > 0, r.text
    wait_all_blocks_free(decode.url)


def _side_channel(prefill) -> str:
    return f"tcp://127.0.0.1:{prefill.argv[prefill.argv.index('--side-channel-port') + 1]}"


def _exchange(address: str, frame: bytes, timeout_s: float = 3.0) -> bytes | None:
    """One REQ/REP round trip; None when no reply comes (a dead serving thread says nothing)."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send(frame)
        return sock.recv() if sock.poll(int(timeout_s * 1000), zmq.POLLIN) else None
    finally:
        sock.close()


def test_side_channel_survives_hostile_frames(pd):
    """Runs last in this module: before the side channel is hardened, a forged registration
    replaces a rank's metadata."""
    from kvxfer.connectors.metadata import GroupRegion, Held, Query, RankMetadata, Register, decode_reply

    prefill, decode = pd
    address = _side_channel(prefill)
    engine_id = _prefill_leg(prefill, PROMPT)["remote_engine_id"]
    meta = decode_reply(_exchange(address, msgspec.msgpack.encode(Query(engine_id=engine_id)))).metadata
    assert meta is not None
    real = msgspec.msgpack.encode(Query(engine_id=engine_id))
    region = st.builds(GroupRegion, base_addr=st.integers(0, 1 << 48), region_bytes=st.integers(0, 1 << 30),
                       num_blocks=st.integers(0, 1 << 20))
    forged_rank = st.builds(RankMetadata, tp_rank=st.integers(-5, 64), agent_name=st.text(max_size=8),
                            agent_metadata=st.binary(max_size=16), regions=st.lists(region, max_size=3),
                            device_id=st.integers(-1, 8), mem_type=st.sampled_from(["DRAM", "VRAM", "?"]),
                            kv_heads=st.integers(0, 64))
    register = forged_rank.map(lambda rank: msgspec.msgpack.encode(
        Register(engine_id=engine_id, secret=b"guessed-secret-0", compat_hash=meta.compat_hash, tp_size=meta.tp_size,
                 rank=rank)))
    frames = st.one_of(
        st.binary(max_size=64),  # noise
        st.integers(1, len(real) - 1).map(lambda n: real[:n]),  # truncated
        st.text(max_size=12).map(lambda rid: msgspec.msgpack.encode(Held(
            engine_id=engine_id, instance_id=meta.instance_id, request_id=rid, transfer_token="0" * 32,
            block_ids=[0], reader="attacker", reader_rank=0, transfer_timeout_s=1.0, claim="a" * 24))),
        register,  # a registration from someone who is not one of its ranks
    )

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(frame=frames)
    def one(frame):
        reply = _exchange(address, frame)
        assert reply is not None, f"the side channel stopped answering after {frame!r}"
        # Noise, a cut frame, a check for a made-up request, a registration from outside the
        # instance: each gets an error reply, none is accepted.
        assert not decode_reply(reply).ok, f"accepted {frame!r}"

    refused = metrics(prefill.url)["kvxfer_kv_refused_checks_total"]
    made_up = msgspec.msgpack.encode(Held(
        engine_id=engine_id, instance_id=meta.instance_id, request_id="made-up", transfer_token="0" * 32,
        block_ids=[0], reader="attacker", reader_rank=0, transfer_timeout_s=1.0, claim="a" * 24))
    assert not decode_reply(_exchange(address, made_up)).ok
    assert metrics(prefill.url)["kvxfer_kv_refused_checks_total"] == refused + 1  # counted, exported
    one()
    # Still serving the genuine metadata, unchanged, and transfers still work.
    after = decode_reply(_exchange(address, real)).metadata
    assert after == meta
    assert httpx.get(f"{prefill.url}/health", timeout=30).status_code == 200
    params = _prefill_leg(prefill, PROMPT)
    r = httpx.post(f"{decode.url}/v1/completions", timeout=120, json={
        "prompt": PROMPT, "max_tokens": 2, "kv_transfer_params": params})
    assert r.status_code == 200 and r.json()["kv_transfer_stats"]["bytes"] > 0, r.text
    wait_all_blocks_free(decode.url)
    wait_all_blocks_free(prefill.url, timeout_s=LEASE_S + 60)


def _wait_until(what: str, condition, timeout_s: float) -> None:
    """Poll an observable state (generous deadline; a busy host only makes it slower)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout_s}s")
        time.sleep(0.2)


def _decode_leg(decode, params: dict, prompt: list[int] = PROMPT) -> httpx.Response:
    return httpx.post(f"{decode.url}/v1/completions", timeout=120, json={
        "prompt": prompt, "max_tokens": 2, "kv_transfer_params": params})


def test_concurrent_replays_of_one_token_admit_exactly_one_pull(pd):
    """Hole 3 of issue 20: 8 concurrent replays of one params set got up to 7 extra 200s, each
    with its own pull. The first hold check claims the token: exactly one pull reads, the others
    get 409 (claimed) or 400 (read and gone) and read nothing. Repeated to catch the race."""
    prefill, decode = pd
    with ThreadPoolExecutor(REPLAYS) as pool:
        for round_ in range(ROUNDS):
            params = _prefill_leg(prefill, PROMPT)
            answers = list(pool.map(lambda _: _decode_leg(decode, params), range(REPLAYS)))
            codes = sorted(r.status_code for r in answers)
            assert codes.count(200) == 1 and set(codes) <= {200, 400, 409}, (round_, codes)
            [ok] = [r for r in answers if r.status_code == 200]
            assert ok.json()["kv_transfer_stats"]["bytes"] > 0, ok.text
            for r in answers:  # each refusal says why
                assert r.status_code != 409 or "already claimed" in r.text, r.text
                assert r.status_code != 400 or "not held" in r.text, r.text
    wait_all_blocks_free(decode.url)
    wait_all_blocks_free(prefill.url, timeout_s=LEASE_S + 60)


def _held(params: dict, **override):
    from kvxfer.connectors.metadata import Held

    fields = dict(engine_id=params["remote_engine_id"], instance_id=params["remote_instance_id"],
                  request_id=params["remote_request_id"], transfer_token=params["transfer_token"],
                  block_ids=params["remote_block_ids"], reader="holder", reader_rank=0, transfer_timeout_s=1.0,
                  claim="h" * 24)
    return msgspec.msgpack.encode(Held(**(fields | override)))


def test_a_token_holder_cannot_pin_a_hold_past_its_lease(pd):
    """Hole 4 of issue 20: a negative transfer_timeout_s was accepted (pins of about -1e9 s), and
    a holder re-checking kept its hold pinned as long as it liked. Refused, and the pins end with
    the lease: the re-checks are refused as expired and the blocks are freed."""
    from kvxfer.connectors.metadata import decode_reply

    prefill, _ = pd
    address = _side_channel(prefill)
    params = _prefill_leg(prefill, PROMPT)
    for bad in (-1e9, -1.0, 0.0):
        reply = decode_reply(_exchange(address, _held(params, transfer_timeout_s=bad)))
        assert not reply.ok and "transfer_timeout_s" in reply.error, (bad, reply)
    expired_before = metrics(prefill.url).get("kvxfer_kv_expired_leases_total", 0)
    deadline = time.monotonic() + LEASE_S + 60
    while True:  # the holder re-checks as fast as it gets answers
        reply = decode_reply(_exchange(address, _held(params)))
        if not reply.ok:
            break
        assert time.monotonic() < deadline, "re-checking kept the hold pinned past its lease"
    assert reply.kind == "expired", reply
    wait_all_blocks_free(prefill.url, timeout_s=LEASE_S + 60)
    assert metrics(prefill.url)["kvxfer_kv_expired_leases_total"] == expired_before + 1


def test_an_expired_lease_is_a_504_not_a_forged_400(pd):
    """Issue 18 gap: a pull after the prefill's lease ran out got 400 (as if the params were
    forged). It is a timing fault of the decode path: 504 with the reason; a wrong token is
    still a 400."""
    prefill, decode = pd
    wait_all_blocks_free(prefill.url, timeout_s=LEASE_S + 60)  # nothing else held: ours is the one
    expired_before = metrics(prefill.url).get("kvxfer_kv_expired_leases_total", 0)
    params = _prefill_leg(prefill, PROMPT)
    _wait_until("the lease's expiry", lambda: (m := metrics(prefill.url)).get("kvxfer_kv_held_requests", 1) == 0
                and m.get("kvxfer_kv_expired_leases_total", 0) == expired_before + 1, LEASE_S + 60)
    r = _decode_leg(decode, params)
    assert r.status_code == 504 and "ran out before the read" in r.text, (r.status_code, r.text[:300])
    r = _decode_leg(decode, params | {"transfer_token": "0" * 32})
    assert r.status_code == 400 and "not held" in r.text, (r.status_code, r.text[:300])
    wait_all_blocks_free(decode.url)
