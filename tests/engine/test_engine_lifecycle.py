"""Engine-side P/D lifecycle with the real NIXL connector (TP 1, loopback): params parsed once
and checked when the request is accepted, request ids that cannot collide, releases that
name the transfer token, and a recompute that says so in its output and the stats."""

from __future__ import annotations

import time

import pytest
from engine_helpers import prompts_of

from kvxfer import LLM, KVTransferConfig, SamplingParams
from kvxfer.connectors.base import KVParamsError
from kvxfer.engine.request import RequestIdInUse
from kvxfer.ports import free_port

PRESET = "tiny-qwen3"
BLOCK_SIZE = 8
NUM_BLOCKS = 32
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
HANDOFF = {"do_remote_decode": True}


def _prefill(model: str) -> LLM:
    for attempt in range(3):  # a probed free port may be taken by another process before we bind it
        config = KVTransferConfig(role="prefill", side_channel_port=free_port(), lease_seconds=60.0)
        try:
            return LLM(model, block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS, kv_transfer_config=config)
        except Exception as e:
            if "cannot bind the KV side channel" not in str(e) or attempt == 2:
                raise


@pytest.fixture(scope="module")
def engines(model_dir):
    prefill = _prefill(model_dir(PRESET))
    try:
        config = KVTransferConfig(role="decode", failure_policy="recompute", handshake_timeout_s=5.0)
        with LLM(model_dir(PRESET), block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS, kv_transfer_config=config) as d:
            yield prefill.engine, d.engine
    finally:
        prefill.shutdown()


def run(engine, request_id, prompt, params=None, timeout=60.0, sampling=GREEDY):
    engine.add_request(request_id, prompt, sampling, params)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for out in engine.step():
            if out.finished and out.request_id == request_id:
                return out
    raise AssertionError(f"{request_id} not finished after {timeout}s")


def drain(engine, timeout=30.0):
    deadline = time.monotonic() + timeout
    while engine.stats()["num_pending_free"] or engine.has_unfinished_requests():
        assert time.monotonic() < deadline, engine.stats()
        engine.step()
        time.sleep(0.005)


def assert_all_free(*engines):
    for engine in engines:
        stats = engine.stats()
        assert stats["num_free_blocks"] == stats["num_blocks"] and not stats["num_pending_free"], stats
        assert stats["connector"]["held_requests"] == 0 and not engine.has_unfinished_requests()


def test_an_id_in_use_is_refused_and_only_its_token_releases_a_hold(engines):
    prefill, _ = engines
    (prompt,) = prompts_of((19,), offset=31)
    prefill.add_request("busy", prompt, GREEDY)
    with pytest.raises(RequestIdInUse, match="'busy'"):
        prefill.add_request("busy", prompt, GREEDY)  # still unfinished
    drain(prefill)

    params = run(prefill, "held", prompt, HANDOFF).kv_transfer_params
    prefill.step()  # the ranks now hold it under its lease
    before = prefill.stats()
    assert before["num_pending_free"] == 1 and before["connector"]["held_requests"] == 1
    with pytest.raises(RequestIdInUse, match="'held'"):
        prefill.add_request("held", prompt, GREEDY)  # finished, but held for its reader
    assert prefill.abort_request("held") == "unknown"
    assert prefill.abort_request("held", "0" * 32) == "unknown"
    prefill.step()
    after = prefill.stats()
    assert after["num_pending_free"] == 1 and after["connector"]["held_requests"] == 1
    assert after["connector"]["refused_releases"] == before["connector"]["refused_releases"] + 2
    assert prefill.abort_request("held", params["transfer_token"]) == "released"
    drain(prefill)
    assert prefill.stats()["connector"]["released"] == before["connector"]["released"] + 1
    assert run(prefill, "held", prompt).error is None  # the id is free again
    assert_all_free(prefill)


def test_params_are_checked_when_the_request_is_accepted_and_nothing_is_queued(engines):
    prefill, decode = engines
    (prompt,) = prompts_of((21,), offset=32)
    params = run(prefill, "p-check", prompt, HANDOFF).kv_transfer_params
    with pytest.raises(KVParamsError, match="prompt of 21 tokens"):
        decode.add_request("short", prompt[:-1], GREEDY, params)
    with pytest.raises(KVParamsError, match="remote_block_ids"):
        decode.add_request("few", prompt, GREEDY, {**params, "remote_block_ids": params["remote_block_ids"][:1]})
    with pytest.raises(KVParamsError, match="remote_port"):
        decode.add_request("port", prompt, GREEDY, {**params, "remote_port": "5600"})
    with pytest.raises(KVParamsError, match="role is 'decode'"):
        decode.add_request("role", prompt, GREEDY, HANDOFF)
    with pytest.raises(KVParamsError, match="role is 'prefill'"):
        prefill.add_request("role", prompt, GREEDY, params)
    assert not decode.has_unfinished_requests() and not prefill.has_unfinished_requests()
    assert prefill.abort_request("p-check", params["transfer_token"]) == "released"
    drain(prefill)
    assert_all_free(prefill, decode)


def test_a_recompute_says_so_in_its_output_and_is_counted(engines):
    prefill, decode = engines
    (prompt,) = prompts_of((23,), offset=33)
    params = run(prefill, "p-rec", prompt, HANDOFF).kv_transfer_params
    before = decode.stats()["connector"]["recomputed"]
    out = run(decode, "d-rec", prompt, {**params, "remote_engine_id": "not-that-engine"})
    assert out.error is None and out.output_token_ids == run(decode, "d-local", prompt).output_token_ids
    stats = out.kv_transfer_stats
    assert stats["recomputed"] is True and stats["error_kind"] == "params" and "not-that-engine" in stats["reason"]
    assert stats["bytes"] == 0 and stats["descriptors"] == 0
    assert decode.stats()["connector"]["recomputed"] == before + 1
    # A pull that worked says nothing about recompute.
    params = run(prefill, "p-ok", prompt, HANDOFF).kv_transfer_params
    ok = run(decode, "d-ok", prompt, params)
    assert ok.error is None and "recomputed" not in ok.kv_transfer_stats and ok.kv_transfer_stats["bytes"] > 0
    assert decode.stats()["connector"]["recomputed"] == before + 1
    token = prefill.scheduler.pending_free["p-rec"].output_kv_transfer_params["transfer_token"]
    assert prefill.abort_request("p-rec", token) == "released"  # never read: released by its token
    drain(prefill)
    assert_all_free(prefill, decode)


def _during_next_step(engine, action):
    """Run `action` inside the next step, after its queue was applied (as a call from another
    thread while the step runs would): deterministic, no timing."""
    scheduler = engine.scheduler
    original = scheduler.update_from_output

    def hooked(*args, **kwargs):
        scheduler.update_from_output = original
        action()
        return original(*args, **kwargs)

    scheduler.update_from_output = hooked


def test_an_abort_made_while_unfinished_releases_the_hold_it_finished_into(engines):
    # The abort arrives while the step that finishes the request runs: the caller asked for an
    # unfinished request to end, so its hold (whose params it never saw) is released at once:
    # not kept to the lease, and not counted as a refused (token-less) release.
    prefill, _ = engines
    (prompt,) = prompts_of((23,), offset=33)
    before = prefill.stats()["connector"]
    prefill.add_request("racing", prompt, SamplingParams(max_tokens=1, temperature=0.0), HANDOFF)
    answers = []
    _during_next_step(prefill, lambda: answers.append(prefill.abort_request("racing")))
    (out,) = prefill.step()
    assert answers == ["aborted"] and out.finish_reason == "length" and out.kv_transfer_params
    drain(prefill)  # the next step applies the abort: the hold is released, every rank frees
    after = prefill.stats()["connector"]
    assert after["released"] == before["released"] + 1
    assert after["refused_releases"] == before["refused_releases"]
    assert after["expired_leases"] == before["expired_leases"]
    assert_all_free(prefill)


def test_an_abort_names_one_request_never_a_later_one_of_its_id(engines):
    # "first" finishes inside the step during which the abort is made; "first"'s id is then
    # reused before the next step applies the abort: the new request must run to the end.
    prefill, _ = engines
    (prompt,) = prompts_of((9,), offset=34)
    prefill.add_request("reused", prompt, SamplingParams(max_tokens=1, temperature=0.0))
    _during_next_step(prefill, lambda: prefill.abort_request("reused"))
    (first,) = prefill.step()
    assert first.finish_reason == "length"
    second = run(prefill, "reused", prompt)
    assert second.finish_reason == "length" and len(second.output_token_ids) == GREEDY.max_tokens
    assert_all_free(prefill)


def test_the_decode_side_continues_from_the_prefill_token_seeded_and_with_logprobs(engines):
    """The decode side starts its output with the prefill's token (and its log-prob entry) and
    samples the rest: a seeded request (temperature > 0) gives the colocated tokens, and the
    log-probs equal the colocated ones, t1's included."""
    prefill, decode = engines
    (prompt,) = prompts_of((21,), offset=35)
    sp = SamplingParams(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True, logprobs=2)
    colocated = run(decode, "seeded-local", prompt, sampling=sp)
    handoff = run(prefill, "seeded-p", prompt, HANDOFF, sampling=sp)
    params = handoff.kv_transfer_params
    assert params["first_token_id"] == colocated.output_token_ids[0] == handoff.output_token_ids[0]
    out = run(decode, "seeded-d", prompt, params, sampling=sp)
    assert out.error is None and out.kv_transfer_stats["bytes"] > 0
    assert out.output_token_ids == colocated.output_token_ids and len(set(out.output_token_ids)) > 1
    assert len(out.logprobs) == 8
    for got, want in zip(out.logprobs, colocated.logprobs):
        assert got.keys() == want.keys() and all(abs(got[t] - want[t]) < 1e-4 for t in want)
    drain(prefill)
    assert_all_free(prefill, decode)


def test_a_first_token_that_completes_the_request_pulls_nothing(engines):
    """max_tokens 1 counts the prefill's token: the decode side answers it at once, says the
    prefill's blocks were not read, and the hold stays for the router to release by its token."""
    prefill, decode = engines
    (prompt,) = prompts_of((19,), offset=36)
    one = SamplingParams(max_tokens=1, temperature=0.0)
    params = run(prefill, "one-p", prompt, HANDOFF, sampling=one).kv_transfer_params
    transfers = decode.stats()["connector"]["transfers"]
    out = run(decode, "one-d", prompt, params, sampling=one)
    assert out.error is None and out.finish_reason == "length" and out.output_token_ids == [params["first_token_id"]]
    assert out.kv_transfer_stats["unread"] is True and out.kv_transfer_stats["bytes"] == 0
    assert decode.stats()["connector"]["transfers"] == transfers
    prefill.step()
    assert prefill.stats()["connector"]["held_requests"] == 1
    assert prefill.abort_request("one-p", params["transfer_token"]) == "released"
    drain(prefill)
    assert_all_free(prefill, decode)


def test_first_token_fields_are_checked_when_the_request_is_accepted(engines):
    prefill, decode = engines
    (prompt,) = prompts_of((17,), offset=37)
    params = run(prefill, "ft-p", prompt, HANDOFF).kv_transfer_params  # asked no logprobs: none carried
    assert params["first_token_logprobs"] is None
    with_logprobs = SamplingParams(max_tokens=4, logprobs=1)
    with pytest.raises(KVParamsError, match="first_token_logprobs"):
        decode.add_request("ft-lp", prompt, with_logprobs, params)
    with pytest.raises(KVParamsError, match="first_token_id"):
        decode.add_request("ft-vocab", prompt, GREEDY, {**params, "first_token_id": decode.model_config.vocab_size})
    missing = {k: v for k, v in params.items() if k != "first_token_id"}
    with pytest.raises(KVParamsError, match="first_token_id"):
        decode.add_request("ft-missing", prompt, GREEDY, missing)
    assert not decode.has_unfinished_requests()
    assert prefill.abort_request("ft-p", params["transfer_token"]) == "released"
    drain(prefill)
    assert_all_free(prefill, decode)
