"""Scheduler: pure logic with a stand-in for the model step (sampled tokens are made up)."""

import itertools

import pytest

from kvxfer.connectors.base import ConnectorMetadata, KVConnectorOutput, KVOutputAggregator, RecvRequest
from kvxfer.connectors.metadata import RemotePrefillParams
from kvxfer.engine.block_manager import BlockManager
from kvxfer.engine.request import Request, RequestStatus
from kvxfer.engine.sampling_params import SamplingParams
from kvxfer.engine.scheduler import Scheduler

BS = 4


def make(rid, n_prompt, max_tokens=3):
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens))


def remote_request(rid, prompt, max_tokens=2):
    """A decode-side request whose prompt KV comes from a (made-up) prefill engine."""
    params = RemotePrefillParams(True, "prefill", "inst", "127.0.0.1", 5600, list(range(len(prompt) // BS + 1)), rid, 1,
                                 len(prompt), "0" * 32, 0)
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens), params)


def run_step(sched, token=7):
    out = sched.schedule()
    sampled = [(token, None) if s.samples else None for s in out.scheduled]
    return out, sched.update_from_output(out, sampled)


def run_all(sched, limit=200):
    finished = {}
    for _ in range(limit):
        if not sched.has_unfinished():
            break
        _, touched = run_step(sched)
        finished.update({r.request_id: r for r in touched if r.is_finished})
    return finished


def test_chunked_prefill_respects_the_token_budget():
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=8)
    sched.add(make("a", 20))
    out, touched = run_step(sched)
    assert [s.num_new_tokens for s in out.scheduled] == [8] and touched == []
    out, _ = run_step(sched)
    assert out.num_scheduled_tokens == 8
    out, touched = run_step(sched)
    assert out.num_scheduled_tokens == 4 and touched[0].output_token_ids == [7]


def test_continuous_batching_mixes_decode_and_prefill():
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16)
    sched.add(make("a", 5))
    run_step(sched)
    sched.add(Request("b", list(range(100, 106)), SamplingParams()))
    out, _ = run_step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 6)]


def test_prefix_hit_skips_cached_tokens():
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16)
    sched.add(make("a", 5))
    run_step(sched)
    sched.add(make("b", 6))  # shares the first full block with "a"
    out, _ = run_step(sched)
    assert out.scheduled[1].num_new_tokens == 2 and out.scheduled[1].request.num_cached_tokens == 4


def test_max_num_seqs_limits_the_batch():
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(make(f"r{i}", 3))
    out, _ = run_step(sched)
    assert len(out.scheduled) == 2


def test_preemption_when_blocks_run_out_and_everything_is_freed():
    bm = BlockManager(4, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(make("a", 4, max_tokens=6))
    sched.add(make("b", 4, max_tokens=6))
    finished = run_all(sched)
    assert sched.num_preemptions > 0
    assert {r: len(x.output_token_ids) for r, x in finished.items()} == {"a": 6, "b": 6}
    assert bm.num_free_blocks == 4


def test_sequence_larger_than_the_pool_ends_with_an_error():
    bm = BlockManager(2, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(make("a", 7, max_tokens=10))
    assert run_all(sched) == {}
    assert not sched.has_unfinished()
    errors = sched.pop_finished()
    assert errors[0].finish_reason == "error" and "does not fit" in errors[0].error
    assert bm.num_free_blocks == 2


def test_abort_frees_blocks():
    bm = BlockManager(8, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(make("a", 6, max_tokens=10))
    run_step(sched)
    assert sched.abort("a")
    assert [r.finish_reason for r in sched.pop_finished()] == ["abort"]
    assert bm.num_free_blocks == 8 and not sched.has_unfinished()


class FakeConnector:
    """Scheduler-side stand-in: every prompt but its last block arrives remotely."""

    def __init__(self, delay_free=False):
        self.delay_free = delay_free
        self.calls = []

    def get_num_new_matched_tokens(self, request, num_local):
        self.calls.append(("match", request.request_id, num_local))
        return request.num_prompt_tokens - num_local if request.kv_transfer_params else 0

    def update_state_after_alloc(self, request, block_tables, num_local, num_external):
        (block_ids,) = block_tables  # one KV cache group
        self.calls.append(("alloc", request.request_id, len(block_ids), num_local, num_external))

    def build_connector_meta(self, out):
        return None

    def request_finished(self, request, block_tables):
        self.calls.append(("finished", request.request_id))
        return self.delay_free, {"done": request.request_id}

    def release_request(self, request_id, transfer_token):
        self.calls.append(("release", request_id, transfer_token))
        return transfer_token == "token"

    def update_connector_output(self, output):
        self.calls.append(("output",))


class Out:
    def __init__(self, recv=(), sent=(), failed=None, kinds=None):
        self.finished_recving = set(recv)
        self.finished_sending = set(sent)
        self.failed_recving = dict(failed or {})
        self.failure_kinds = dict(kinds or {})
        self.recv_stats = {}


def test_remote_kv_wait_does_not_block_others_and_resumes():
    bm = BlockManager(16, BS)
    conn = FakeConnector()
    sched = Scheduler(bm, 8, 64, conn)
    remote = remote_request("remote", list(range(1, 10)))
    sched.add(remote)
    sched.add(make("local", 3))
    out, _ = run_step(sched)
    assert remote.status == RequestStatus.WAITING_FOR_REMOTE_KV
    assert len(remote.block_ids) == 3
    assert [s.request.request_id for s in out.scheduled] == ["local"]
    assert ("alloc", "remote", 3, 0, 9) in conn.calls
    run_step(sched)
    sched.update_connector_output(Out(recv=["remote"]))
    out, _ = run_step(sched)
    # Only the prefill's first token (position 9) is computed locally.
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("local", 1), ("remote", 1)]


def test_remote_failure_fails_or_recomputes_by_policy():
    for policy in ("fail", "recompute"):
        bm = BlockManager(16, BS)
        sched = Scheduler(bm, 8, 64, FakeConnector(), failure_policy=policy)
        sched.add(remote_request("r", list(range(1, 10))))
        run_step(sched)
        sched.update_connector_output(Out(failed={"r": "peer died"}, kinds={"r": "peer"}))
        out, _ = run_step(sched)
        if policy == "fail":
            (err,) = sched.pop_finished()
            assert err.finish_reason == "error" and "peer died" in err.error and err.error_kind == "peer"
            assert bm.num_free_blocks == 16
        else:
            # The prompt and the prefill's first token are recomputed; the next token is sampled.
            assert out.scheduled[0].num_new_tokens == 10 and sched.num_recomputed == 1
            r = out.scheduled[0].request
            assert r.output_token_ids == [0, 7] and r.finish_reason == "length"  # t1, then the sampled t2
            assert r.kv_transfer_stats == {
                "recomputed": True, "error_kind": "peer", "reason": "peer died",
                "bytes": 0, "descriptors": 0, "seconds": 0.0, "gbps": 0.0,
            }
            run_all(sched)
            assert bm.num_free_blocks == 16


def test_a_first_token_that_ends_the_request_finishes_it_without_a_load():
    """max_tokens 1 (the prefill's token counts) or an EOS first token: finished at once, no blocks
    taken, no load, and the answer says the prefill's blocks were not read."""
    for rid, max_tokens, eos in (("one", 1, ()), ("eos", 5, (0,))):
        bm = BlockManager(16, BS)
        conn = FakeConnector()
        sched = Scheduler(bm, 8, 64, conn)
        r = remote_request(rid, list(range(1, 10)), max_tokens=max_tokens)
        r = Request(rid, r.prompt_token_ids, r.sampling_params, r.kv_transfer_params, eos)
        sched.add(r)
        (done,) = sched.pop_finished()
        assert done is r and r.finish_reason == ("length" if max_tokens == 1 else "stop")
        assert r.output_token_ids == [0] and r.kv_transfer_stats["unread"] is True
        out, _ = run_step(sched)
        assert not out.scheduled and not sched.has_unfinished() and bm.num_free_blocks == 16
        assert not [c for c in conn.calls if c[0] in ("match", "alloc")]


def test_a_preempted_loaded_request_recomputes_prompt_and_outputs_without_asking_again():
    """A P/D request that started from the prefill's token and loaded its prompt, preempted while
    decoding: it recomputes prompt and outputs (the first token included) locally, never loads
    again, and ends with exactly max_tokens outputs, the prefill's token first."""
    bm = BlockManager(8, BS)
    conn = FakeConnector()
    sched = Scheduler(bm, 8, 64, conn)
    local = make("l", 8, max_tokens=20)  # 7 blocks at its end
    sched.add(local)
    run_step(sched)
    remote = remote_request("r", list(range(50, 56)), max_tokens=12)  # 5 blocks at its end
    sched.add(remote)
    run_step(sched)
    assert remote.status == RequestStatus.WAITING_FOR_REMOTE_KV and remote.output_token_ids == [0]
    sched.update_connector_output(Out(recv=["r"]))
    out, _ = run_step(sched)
    assert ("r", 1) in [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]  # t1's position
    finished = run_all(sched)
    assert remote.num_preemptions >= 1 and set(finished) == {"l", "r"}
    assert remote.output_token_ids[0] == 0 and len(remote.output_token_ids) == 12
    assert [c for c in conn.calls if c[:2] == ("match", "r")] == [("match", "r", 0)]
    assert bm.num_free_blocks == 8


def test_delayed_free_until_the_connector_reports_sending_done():
    bm = BlockManager(16, BS)
    conn = FakeConnector(delay_free=True)
    sched = Scheduler(bm, 8, 64, conn)
    sched.add(make("p", 6, max_tokens=1))
    _, touched = run_step(sched)
    assert touched[0].is_finished and touched[0].output_kv_transfer_params == {"done": "p"}
    assert bm.num_free_blocks == 14 and "p" in sched.pending_free
    sched.update_connector_output(Out(sent=["p"]))
    assert bm.num_free_blocks == 16


def test_abort_of_a_held_request_asks_the_connector_to_release_it():
    bm = BlockManager(16, BS)
    conn = FakeConnector(delay_free=True)
    sched = Scheduler(bm, 8, 64, conn)
    sched.add(make("p", 6, max_tokens=1))
    run_step(sched)
    assert "p" in sched.pending_free and not sched.release("unknown-id", "token")
    assert not sched.abort("p")  # finished: nothing to abort, the hold is released by its token
    assert not sched.release("p", "not-the-token") and "p" in sched.pending_free
    assert sched.release("p", "token") and ("release", "p", "token") in conn.calls
    assert bm.num_free_blocks == 14 and not sched.pop_finished()  # freed when the ranks report it
    sched.update_connector_output(Out(sent=["p"]))
    assert bm.num_free_blocks == 16 and "p" not in sched.pending_free


def test_abort_while_loading_frees_blocks_only_after_the_ranks_report():
    bm = BlockManager(16, BS)
    sched = Scheduler(bm, 8, 64, FakeConnector())
    sched.add(remote_request("r", list(range(1, 10))))
    run_step(sched)
    assert sched.abort("r")
    assert [r.finish_reason for r in sched.pop_finished()] == ["abort"]
    assert bm.num_free_blocks == 13 and not sched.has_unfinished()
    sched.update_connector_output(Out(failed={"r": "cancelled"}))
    assert bm.num_free_blocks == 16


def test_loaded_request_runs_before_a_preempted_one_that_needs_its_blocks():
    bm = BlockManager(6, BS)
    sched = Scheduler(bm, 8, 64, FakeConnector())
    local = make("local", 8, max_tokens=16)  # needs all 6 blocks at its end
    sched.add(local)
    run_step(sched)
    remote = remote_request("remote", list(range(50, 54)))
    sched.add(remote)
    while local.num_computed_tokens < 5 * BS:
        run_step(sched)
    assert remote.status == RequestStatus.WAITING_FOR_REMOTE_KV and len(remote.block_ids) == 1
    # The load completes in the very step where `local` runs out of blocks and is preempted.
    sched.update_connector_output(Out(recv=["remote"]))
    out, _ = run_step(sched)
    assert out.preempted_ids == ["local"]
    assert [r.request_id for r in sched.waiting] == ["remote", "local"]
    finished = run_all(sched)
    assert set(finished) == {"local", "remote"} and len(finished["local"].output_token_ids) == 16
    assert bm.num_free_blocks == 6


def _load_events_cases():
    for order in itertools.permutations(("abort", 0, 1)):
        for outcome in ("finished", "failed"):
            for policy in ("fail", "recompute"):
                yield pytest.param(order, outcome, policy, id="-".join(map(str, order)) + f"-{outcome}-{policy}")


@pytest.mark.parametrize("order,outcome,policy", list(_load_events_cases()))
def test_blocks_of_a_load_are_freed_exactly_once_whatever_order_abort_and_reports_come_in(order, outcome, policy):
    """Two ranks report a load through the real aggregator; the abort lands before, between
    or after their reports (also after the scheduler got the agreed report but before the
    request ran). The blocks stay put while a READ may still land, and end up all free."""
    bm = BlockManager(16, BS)
    sched = Scheduler(bm, 8, 64, FakeConnector(), failure_policy=policy)
    agg = KVOutputAggregator(2)
    load = RecvRequest("r", "r", "prefill", "inst", "127.0.0.1", 5600, 1, "t" * 32, [], [], [])
    agg.expect(ConnectorMetadata(recv=[load]))
    r = remote_request("r", list(range(1, 10)))
    sched.add(r)
    run_step(sched)
    assert r.status == RequestStatus.WAITING_FOR_REMOTE_KV and bm.num_free_blocks == 13
    reported = set()
    for event in order:
        if event == "abort":
            ended_already = r.is_finished  # failed by policy "fail" once both ranks reported
            assert sched.abort("r") != ended_already
        else:
            rank_out = KVConnectorOutput(
                finished_recving={"r"} if outcome == "finished" else set(),
                failed_recving={"r": "READ failed"} if outcome == "failed" else {},
            )
            outputs = [KVConnectorOutput(), KVConnectorOutput()]
            outputs[event] = rank_out
            sched.update_connector_output(agg.aggregate(outputs))
            reported.add(event)
        if reported != {0, 1}:  # a READ may still land: the blocks must not be reused yet
            assert bm.num_free_blocks == 13
            assert sched.holds("r") == r.is_finished  # aborted: its id may not be reused yet
    run_all(sched)
    failed_first = (outcome, policy) == ("failed", "fail") and order[-1] == "abort"
    assert [x.finish_reason for x in sched.pop_finished()] == ["error" if failed_first else "abort"]
    assert bm.num_free_blocks == 16
    assert not sched.has_unfinished() and not sched.remote and not sched.aborted_loads and not sched.waiting
    assert not sched.holds("r")
