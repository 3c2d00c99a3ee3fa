"""Prefix caching on the decode side, leases, a dead prefill engine, and bad params, with
real prefill and decode `LLM`s; after every case no engine holds a block."""

import math
import os
import time

import pytest
import torch
from disagg import (
    BLOCK_SIZE,
    NUM_BLOCKS,
    ChildPrefill,
    assert_all_blocks_free,
    decode_llm,
    drain,
    expected_read_bytes,
    prefill_llm,
)

from kvxfer import SamplingParams
from kvxfer.connectors.base import KVParamsError
from kvxfer.ports import free_port

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
HANDOFF = {"do_remote_decode": True}


class Engines:
    def __init__(self, checkpoint) -> None:
        self.all = []
        qwen = checkpoint("tiny-qwen3")
        self.prefill = self._add(prefill_llm(qwen, 1))
        self.prefill_short = self._add(prefill_llm(qwen, 1, lease=1.5))
        self.prefill_llama = self._add(prefill_llm(checkpoint("tiny-llama-gqa2"), 1, lease=1.5))
        self.decode_fail = self._add(decode_llm(qwen, 2, policy="fail"))
        self.decode_recompute = self._add(decode_llm(qwen, 1, policy="recompute"))

    def _add(self, llm):
        self.all.append(llm)
        return llm

    def close(self) -> None:
        for llm in self.all:
            llm.shutdown()


@pytest.fixture(scope="module")
def engines(checkpoint):
    e = Engines(checkpoint)
    yield e
    e.close()


def prompts(seed: int, *lengths: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=gen).tolist() for n in lengths]


def local_tokens(llm, prompt_list) -> list[list[int]]:
    llm.engine.block_manager.reset_prefix_cache()
    return [o.output_token_ids for o in llm.generate(prompt_list, GREEDY)]


def test_cached_prefix_is_not_read_and_shared_blocks_stay_untouched(engines):
    decode, engine = engines.decode_fail, engines.decode_fail.engine
    engine.block_manager.reset_prefix_cache()
    [prefix] = prompts(1, 3 * BLOCK_SIZE)
    a = prefix + prompts(2, 5)[0]
    b = prefix + prompts(3, 12)[0]  # 36 tokens to load, 3 blocks of them cached locally
    [params] = [o.kv_transfer_params for o in engines.prefill.generate([b], GREEDY, kv_transfer_params=HANDOFF)]

    engine.add_request("a", a, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    while not (engine.scheduler.requests.get("a") and engine.scheduler.requests["a"].output_token_ids):
        engine.step()
    shared = engine.scheduler.requests["a"].block_ids[:3]
    before = engine.collective_rpc("read_kv_blocks", shared)

    engine.add_request("b", b, GREEDY, params)
    outputs, a_running_when_b_loaded = {}, None
    deadline = time.monotonic() + 60
    while len(outputs) < 2 and time.monotonic() < deadline:
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        request_b = engine.scheduler.requests.get("b")
        if a_running_when_b_loaded is None and request_b is not None and request_b.kv_transfer_stats:
            a_running_when_b_loaded = "a" in engine.scheduler.requests
            for x, y in zip(before, engine.collective_rpc("read_kv_blocks", shared)):
                assert torch.equal(x, y)
    assert a_running_when_b_loaded, "request a was not decoding on the shared blocks during b's load"
    for x, y in zip(before, engine.collective_rpc("read_kv_blocks", shared)):
        assert torch.equal(x, y)

    out_b = outputs["b"]
    assert out_b.error is None and out_b.num_cached_tokens == 3 * BLOCK_SIZE
    suffix_blocks = math.ceil(len(b) / BLOCK_SIZE) - 3
    assert out_b.kv_transfer_stats["bytes"] == expected_read_bytes(engine.spec, 2, suffix_blocks)
    assert out_b.output_token_ids == local_tokens(decode, [b])[0]
    drain(engines.prefill)
    assert_all_blocks_free(engines.prefill, decode)


def test_full_local_hit_reads_nothing_but_frees_the_prefill_blocks(engines):
    decode = engines.decode_fail
    decode.engine.block_manager.reset_prefix_cache()
    [p] = prompts(4, 2 * BLOCK_SIZE)  # the whole prompt in two full blocks; the first token is computed
    decode.generate([p], GREEDY)  # caches both blocks locally
    [params] = [o.kv_transfer_params for o in engines.prefill.generate([p], GREEDY, kv_transfer_params=HANDOFF)]
    [out] = decode.generate([p], GREEDY, kv_transfer_params=params)
    assert out.error is None and out.num_cached_tokens == 2 * BLOCK_SIZE
    assert out.output_token_ids == local_tokens(decode, [p])[0]
    drain(engines.prefill)  # freed by the notify-only load, not by the lease
    assert engines.prefill.engine.stats()["connector"]["expired_leases"] == 0
    assert_all_blocks_free(engines.prefill, decode)


def test_lease_expiry_frees_an_unclaimed_request(engines):
    prefill = engines.prefill_short
    before = prefill.engine.stats()["connector"]["expired_leases"]
    prefill.generate(prompts(5, 20), GREEDY, kv_transfer_params=HANDOFF)
    assert prefill.engine.stats()["num_pending_free"] == 1
    start = time.monotonic()
    drain(prefill, timeout=60)  # a generous deadline: a busy host only delays the expiry
    assert time.monotonic() - start > 1.0  # freed by the lease, not before it ends
    assert prefill.engine.stats()["connector"]["expired_leases"] == before + 1
    assert_all_blocks_free(prefill)


def test_release_frees_held_blocks_early_and_a_late_read_fails(engines):
    prefill, decode = engines.prefill, engines.decode_fail
    [p] = prompts(15, 3 * BLOCK_SIZE + 2)
    engine = prefill.engine
    before = dict(engine.stats()["connector"])
    assert engine.abort_request("never-seen") == "unknown"
    engine.add_request("held", p, GREEDY, HANDOFF)
    while "held" not in engine.scheduler.pending_free:
        engine.step()
    params = engine.scheduler.pending_free["held"].output_kv_transfer_params
    engine.step()  # the ranks now hold it under its lease
    assert engine.stats()["connector"]["held_requests"] == 1
    # Release names the token: without it, or with another, nothing changes for the holder.
    assert engine.abort_request("held") == "unknown"
    assert engine.abort_request("held", "0" * 32) == "unknown"
    assert engine.stats()["connector"]["refused_releases"] == before["refused_releases"] + 2
    assert engine.abort_request("held", params["transfer_token"]) == "released"
    for _ in range(3):  # the next step tells the ranks; they report it at once
        engine.step()
        if not engine.stats()["num_pending_free"]:
            break
    stats = engine.stats()
    assert stats["num_pending_free"] == 0 and stats["connector"]["held_requests"] == 0
    assert_all_blocks_free(prefill)
    assert stats["connector"]["released"] == before["released"] + 1
    assert stats["connector"]["expired_leases"] == before["expired_leases"]
    assert stats["connector"]["sends_completed"] == before["sends_completed"]
    assert engine.abort_request("held", params["transfer_token"]) == "unknown"  # nothing left to release

    [out] = decode.generate([p], GREEDY, kv_transfer_params=params)  # refused before any READ
    assert out.finish_reason == "error" and out.error_kind == "params"
    assert "'held' is not held" in out.error
    assert_all_blocks_free(prefill, decode)


@pytest.mark.parametrize("tp", [2])
def test_prefill_engine_killed_midway_ends_by_policy(engines, checkpoint, tp):
    child = ChildPrefill(checkpoint("tiny-qwen3"), tp)
    try:
        first = prompts(6, 17, 30)
        second = prompts(7, 21, 9)
        params_first = child.generate_params(first)
        params_second = child.generate_params(second)
        for decode in (engines.decode_fail, engines.decode_recompute):  # handshake and first reads succeed
            outs = decode.generate(first, GREEDY, kv_transfer_params=params_first)
            assert all(o.error is None for o in outs)
            params_first = child.generate_params(first)
        child.kill()
        deadline = time.monotonic() + 60  # its rank processes notice the engine is gone and exit
        while any(_alive(pid) for pid in child.worker_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in child.worker_pids)

        start = time.monotonic()
        outs = engines.decode_fail.generate(second, GREEDY, kv_transfer_params=params_second)
        assert time.monotonic() - start < 60  # bounded by the time-outs, not a hang (generous: busy hosts)
        for o in outs:
            assert o.finish_reason == "error" and "KV transfer failed" in o.error and o.error_kind == "peer"
        start = time.monotonic()
        outs = engines.decode_recompute.generate(second, GREEDY, kv_transfer_params=params_second)
        assert time.monotonic() - start < 60
        assert [o.output_token_ids for o in outs] == local_tokens(engines.decode_recompute, second)
        assert engines.decode_recompute.engine.stats()["connector"]["failures"] >= 2
        assert_all_blocks_free(engines.decode_fail, engines.decode_recompute)
    finally:
        child.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_handshake_timeout_ends_by_policy(engines):
    [p] = prompts(8, 20)
    params = {**engines.prefill.generate([p], GREEDY, kv_transfer_params=HANDOFF)[0].kv_transfer_params}
    genuine = dict(params)
    params.update(remote_engine_id="vanished", remote_port=free_port())
    start = time.monotonic()
    [out] = engines.decode_fail.generate([p], GREEDY, kv_transfer_params=params)
    assert "timed out after 2.0s" in out.error and out.error_kind == "peer" and time.monotonic() - start < 30
    [out] = engines.decode_recompute.generate([p], GREEDY, kv_transfer_params=params)
    assert out.error is None and out.output_token_ids == local_tokens(engines.decode_recompute, [p])[0]
    engines.decode_fail.generate([p], GREEDY, kv_transfer_params=genuine)
    drain(engines.prefill)
    assert_all_blocks_free(engines.prefill, engines.decode_fail, engines.decode_recompute)


def test_bad_params_are_clear_errors_and_leak_nothing(engines):
    decode = engines.decode_fail
    [p] = prompts(9, 26)
    genuine = engines.prefill.generate([p], GREEDY, kv_transfer_params=HANDOFF)[0].kv_transfer_params

    beyond = {**genuine, "remote_block_ids": [NUM_BLOCKS + 5 + i for i in range(len(genuine["remote_block_ids"]))]}
    [out] = decode.generate([p], GREEDY, kv_transfer_params=beyond)
    assert f"out of range for the peer's pool of {NUM_BLOCKS} blocks" in out.error and out.error_kind == "params"

    [out] = decode.generate([p], GREEDY, kv_transfer_params={**genuine, "remote_engine_id": "nope"})
    assert "unknown remote engine 'nope'" in out.error and out.error_kind == "params"

    # What the engine can tell at once is refused by add_request, before anything is queued.
    with pytest.raises(KVParamsError, match="remote_num_tokens says a prompt of 26 tokens, this request has 25"):
        decode.generate([p[:-1]], GREEDY, kv_transfer_params=genuine)
    short = {**genuine, "remote_block_ids": genuine["remote_block_ids"][:-1]}
    with pytest.raises(KVParamsError, match="remote_block_ids for 26 tokens"):
        decode.generate([p], GREEDY, kv_transfer_params=short)
    with pytest.raises(KVParamsError, match="remote_port"):
        decode.generate([p], GREEDY, kv_transfer_params={**genuine, "remote_port": "5600"})
    with pytest.raises(KVParamsError, match="role is 'decode'"):
        decode.generate([p], GREEDY, kv_transfer_params=HANDOFF)
    assert not decode.engine.has_unfinished_requests()

    llama = engines.prefill_llama.generate([p], GREEDY, kv_transfer_params=HANDOFF)[0].kv_transfer_params
    [out] = decode.generate([p], GREEDY, kv_transfer_params=llama)
    assert "incompatible KV transfer peer" in out.error and "model_identity" in out.error
    assert out.error_kind == "params"

    [out] = decode.generate([p], GREEDY, kv_transfer_params=genuine)  # the genuine params still work
    assert out.error is None and out.error_kind is None
    drain(engines.prefill)
    drain(engines.prefill_llama)  # never read: freed by its lease
    assert engines.prefill_llama.engine.stats()["connector"]["expired_leases"] >= 1
    assert_all_blocks_free(engines.prefill, engines.prefill_llama, decode)
    assert decode.engine.stats()["connector"]["failures"] >= 3  # beyond the pool, unknown engine, other model


def test_params_are_bound_to_their_blocks_and_never_read_a_victims_kv(engines):
    """The issue's attack: valid params of one's own with the victim's block ids (or request id)."""
    prefill, decode = engines.prefill, engines.decode_fail
    v, a = prompts(21, 20, 20)
    victim, attacker = [o.kv_transfer_params for o in prefill.generate([v, a], GREEDY, kv_transfer_params=HANDOFF)]
    before = prefill.engine.stats()["connector"]["refused_checks"]
    theirs = {"remote_block_ids": victim["remote_block_ids"]}
    [out] = decode.generate([a], GREEDY, kv_transfer_params={**attacker, **theirs})
    # Nothing is computed: the output holds only the token the attacker's own params carry.
    own_first = [attacker["first_token_id"]]
    assert out.error_kind == "params" and "held with other blocks" in out.error and out.output_token_ids == own_first
    stolen = {**attacker, **theirs, "remote_request_id": victim["remote_request_id"]}
    [out] = decode.generate([a], GREEDY, kv_transfer_params=stolen)
    assert out.error_kind == "params" and "not held" in out.error and out.output_token_ids == own_first
    assert prefill.engine.stats()["connector"]["refused_checks"] >= before + 2  # every decode rank asked
    # Nothing changed for the real holders: both genuine pulls still work.
    outs = decode.generate([v, a], GREEDY, kv_transfer_params=[victim, attacker])
    assert [o.output_token_ids for o in outs] == local_tokens(decode, [v, a])
    drain(prefill)
    assert_all_blocks_free(prefill, decode)


def test_a_decode_request_aborted_before_its_pull_releases_the_prefill_hold_now(engines):
    """Issue 18 gap: a decode request aborted before its pull left the prefill's hold to its
    lease (30 s here). The decode side tells the prefill side at once (a Release under the
    token), so the prefill's pool drains long before the lease, counted as released."""
    prefill, decode = engines.prefill, engines.decode_fail
    [p] = prompts(31, 3 * BLOCK_SIZE + 1)
    before = dict(prefill.engine.stats()["connector"])
    [params] = [o.kv_transfer_params for o in prefill.generate([p], GREEDY, kv_transfer_params=HANDOFF)]
    engine = decode.engine
    engine.add_request("early-abort", p, GREEDY, params)
    assert engine.abort_request("early-abort") == "aborted"  # before any step: never scheduled
    [out] = engine.step()  # the abort applies before anything is scheduled
    assert out.finished and out.finish_reason == "abort" and not out.kv_transfer_stats
    drain(prefill, timeout=15)  # well inside the 30 s lease
    stats = prefill.engine.stats()["connector"]
    assert stats["released"] == before["released"] + 1
    assert stats["expired_leases"] == before["expired_leases"]
    assert_all_blocks_free(prefill, decode)


def test_an_abort_after_a_refused_load_under_the_token_does_not_release_the_hold(engines):
    """vLLM's serving layer re-submits a failed request's params as a request aborted before
    scheduling, so that the connector frees the prefill's blocks. After a load refused for
    naming other blocks (nothing read), that abort released the hold under the genuine token, and
    the genuine params then failed "not held". A load already sent under a token leaves the
    hold's end to the prefill side (ReadDone, or the lease)."""
    prefill, decode = engines.prefill, engines.decode_fail
    [p] = prompts(41, 2 * BLOCK_SIZE + 5)
    [genuine] = [o.kv_transfer_params for o in prefill.generate([p], GREEDY, kv_transfer_params=HANDOFF)]
    other = {**genuine, "remote_block_ids": [b + 1 for b in genuine["remote_block_ids"]]}
    [out] = decode.generate([p], GREEDY, kv_transfer_params=other)
    assert out.error_kind == "params" and "held with other blocks" in out.error
    released = prefill.engine.stats()["connector"]["released"]
    decode.engine.add_request("after-refusal", p, GREEDY, other)  # what vLLM's serving layer sends
    assert decode.engine.abort_request("after-refusal") == "aborted"
    [out] = decode.engine.step()
    assert out.finished and out.finish_reason == "abort"
    [out] = decode.generate([p], GREEDY, kv_transfer_params=genuine)  # the hold is still there
    assert out.error is None and out.output_token_ids == local_tokens(decode, [p])[0]
    drain(prefill)
    assert prefill.engine.stats()["connector"]["released"] == released
    assert_all_blocks_free(prefill, decode)
