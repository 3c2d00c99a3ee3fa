"""Event-driven transfers: between two engine steps, with no step in between, a decode engine's
ranks check the hold, READ, notify the prefill side and wake their engine (`executor.events`),
and the prefill engine's rank counts the ReadDone and wakes its engine; the steps that follow
only collect and apply. Decode TP 2 (rank 1 is a process writing through the inherited
descriptor) from a TP 1 prefill."""

import time

from disagg import assert_all_blocks_free, decode_llm, prefill_llm

from kvxfer.engine.sampling_params import SamplingParams

DEADLINE_S = 60.0


def wait_events(events, count: int) -> int:
    """Wake-ups consumed until `count` came (no engine step meanwhile); fails at the deadline."""
    got, deadline = 0, time.monotonic() + DEADLINE_S
    while got < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{got} of {count} rank events after {DEADLINE_S}s"
        got += events.wait(remaining)
    return got


def test_ranks_finish_a_pull_between_steps_and_wake_both_engines(checkpoint):
    model = checkpoint("tiny-qwen3")
    prefill, decode = prefill_llm(model, 1), decode_llm(model, 2)
    try:
        prompt = [3 + (i * 7) % 400 for i in range(41)]  # 6 blocks of 8: 5 read, the last token computed
        [first] = prefill.generate([prompt], SamplingParams(max_tokens=1), {"do_remote_decode": True})
        prefill.engine.step()  # its rank learns of the hold
        prefill.engine.executor.events.drain()

        engine = decode.engine
        engine.add_request("r", prompt, SamplingParams(max_tokens=3, ignore_eos=True), first.kv_transfer_params)
        assert not engine.step()  # admitted: the ranks start the load
        assert engine.stats()["num_waiting_for_remote_kv"] == 1
        wait_events(engine.executor.events, 2)  # one per decode rank, each when its READs are done
        wait_events(prefill.engine.executor.events, 1)  # the prefill rank got both ReadDones

        engine.step()  # collects both ranks' reports: the request resumes
        assert engine.stats()["num_waiting_for_remote_kv"] == 0
        outputs = []
        for _ in range(100):
            outputs += engine.step()
            if outputs and outputs[-1].finished:
                break
        out = outputs[-1]
        assert out.kv_transfer_stats["bytes"] > 0 and not out.kv_transfer_stats.get("recomputed")
        # The decode side computed the last prompt token over the pulled KV: same greedy token.
        assert out.output_token_ids[0] == first.output_token_ids[0]

        prefill.engine.step()  # collects the finished send: the hold's blocks are freed
        assert prefill.engine.stats()["num_pending_free"] == 0
        assert_all_blocks_free(prefill, decode)
    finally:
        decode.shutdown()
        prefill.shutdown()
