"""Prefill and decode `LLM`s with different TP sizes: received KV equals what the decode
engine computes itself, and greedy continuations equal the colocated ones.

Each model's six engines (prefill and decode at TP 1, 2, 4) are shared by its cases. Hybrid
(sliding-window) models run a few layouts with their own engines: per KV cache group, a
sliding group receives only the blocks inside the window of the position after the prompt (the
prefill's first token, computed on the decode side), and the
bytes moved are each group's blocks read times its bytes per block.
"""

import math

import pytest
import torch
from disagg import (
    BLOCK_SIZE,
    assert_all_blocks_free,
    decode_llm,
    drain,
    expected_read_bytes,
    prefill_llm,
    run_and_capture,
    tokens_kv,
)

from kvxfer import SamplingParams
from kvxfer.connectors.metadata import held_entries
from kvxfer.ports import free_port

PRESETS = ["tiny-qwen3", "tiny-llama-gqa2", "tiny-deepseek-mla"]
PAIRS = [(1, 1), (1, 2), (2, 1), (2, 2), (2, 4), (4, 2), (1, 4), (4, 1)]
PROMPT_LENGTHS = [29, 16, 9, 1]  # several blocks, an exact multiple, one block and a bit, one token
# Sliding-window presets (window 6) at P2->D1, P1->D2 and P2->D4 (tiny-gemma3's 2 KV heads are
# replicated at D4): prompts of ten windows, about five, one window, less than one, and
# generations that carry the short prompt across its window.
HYBRID_CASES = [("tiny-mistral-swa", 2, 1), ("tiny-qwen3-hybrid", 1, 2), ("tiny-gemma3", 2, 4)]
HYBRID_PROMPT_LENGTHS = [60, 29, 6, 3]


class Engines:
    def __init__(self, model: str) -> None:
        self.prefill, self.decode = {}, {}
        try:
            for tp in (1, 2, 4):
                self.prefill[tp] = prefill_llm(model, tp)
                self.decode[tp] = decode_llm(model, tp)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for llm in [*self.prefill.values(), *self.decode.values()]:
            llm.shutdown()


@pytest.fixture(scope="module", params=PRESETS)
def engines(request, checkpoint):
    e = Engines(checkpoint(request.param))
    yield e
    e.close()


@pytest.mark.parametrize("p_tp,d_tp", PAIRS, ids=[f"P{p}-D{d}" for p, d in PAIRS])
def test_received_kv_and_greedy_tokens_equal_local(engines, p_tp, d_tp):
    check_transfer(engines.prefill[p_tp], engines.decode[d_tp], p_tp, d_tp, PROMPT_LENGTHS, max_tokens=5)


@pytest.mark.parametrize("name,p_tp,d_tp", HYBRID_CASES, ids=[f"{n}-P{p}-D{d}" for n, p, d in HYBRID_CASES])
def test_hybrid_models_received_kv_and_greedy_tokens_equal_local(checkpoint, name, p_tp, d_tp):
    prefill = decode = None
    try:
        prefill, decode = prefill_llm(checkpoint(name), p_tp), decode_llm(checkpoint(name), d_tp)
        assert any(decode.engine.model_config.sliding_windows)
        check_transfer(prefill, decode, p_tp, d_tp, HYBRID_PROMPT_LENGTHS, max_tokens=8)
    finally:
        for llm in (prefill, decode):
            if llm is not None:
                llm.shutdown()


def check_transfer(prefill, decode, p_tp: int, d_tp: int, prompt_lengths: list[int], max_tokens: int) -> None:
    gen = torch.Generator().manual_seed(p_tp * 10 + d_tp)
    vocab = decode.engine.model_config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in prompt_lengths]
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    decode.engine.block_manager.reset_prefix_cache()  # compute everything here...
    local, local_kv = run_and_capture(decode.engine, prompts, sp, [None] * len(prompts))
    decode.engine.block_manager.reset_prefix_cache()  # ...and read everything remotely below
    handed = prefill.generate(prompts, sp, kv_transfer_params={"do_remote_decode": True})
    params = [o.kv_transfer_params for o in handed]
    assert all(p and p["remote_tp_size"] == p_tp for p in params)
    remote, remote_kv = run_and_capture(decode.engine, prompts, sp, params)

    groups = decode.engine.kv_cache_groups
    for prompt, lo, re, lkv, rkv in zip(prompts, local, remote, local_kv, remote_kv):
        assert re.finish_reason == "length" and re.error is None, re.error
        assert re.output_token_ids == lo.output_token_ids
        received = len(prompt)  # the whole prompt; the prefill's first token is computed on the decode side
        expected_bytes = 0
        for g, group in enumerate(groups):
            # Position `received` sees keys in (received - W, received]: the blocks holding the
            # received ones of those (all of them for full attention) are read, nothing before.
            window = getattr(group.spec, "sliding_window", None)
            first_pos = max(0, received - window + 1) if window is not None else 0
            first_block = first_pos // BLOCK_SIZE if first_pos < received else math.ceil(received / BLOCK_SIZE)
            expected_bytes += expected_read_bytes(group.spec, d_tp, math.ceil(received / BLOCK_SIZE) - first_block)
            start = first_block * BLOCK_SIZE
            for rank in range(d_tp):
                torch.testing.assert_close(tokens_kv(rkv[g][rank], received)[:, :, :, start:],
                                           tokens_kv(lkv[g][rank], received)[:, :, :, start:], rtol=1e-4, atol=1e-4)
        assert re.kv_transfer_stats["bytes"] == expected_bytes
    drain(prefill)
    assert_all_blocks_free(prefill, decode)
    for llm in (prefill, decode):
        stats = llm.engine.stats()["connector"]
        assert stats["failures"] == 0 and stats["expired_leases"] == 0


def test_hybrid_failed_load_recomputes_every_group(checkpoint):
    """A load that fails (its prefill engine is gone) is recomputed locally: the sliding group's
    entries before the window, never allocated for the load, get blocks again."""
    decode = decode_llm(checkpoint("tiny-gemma3"), 1, policy="recompute")
    try:
        prompt = list(range(3, 63))  # ten windows
        sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        (local,) = decode.generate([prompt], sp)
        held = held_entries(decode.engine.kv_cache_groups, len(prompt))
        params = {
            "do_remote_prefill": True, "remote_engine_id": "gone", "remote_instance_id": "gone-0",
            "remote_host": "127.0.0.1", "remote_port": free_port(), "remote_request_id": "r",
            "remote_block_ids": [b for entries in held for b in range(len(entries))], "remote_tp_size": 1,
            "remote_num_tokens": len(prompt), "transfer_token": "0" * 32,
            "first_token_id": local.output_token_ids[0],
        }
        (out,) = decode.generate([prompt], sp, kv_transfer_params=params)
        assert out.error is None and out.kv_transfer_stats["recomputed"] is True
        assert out.output_token_ids == local.output_token_ids
        assert_all_blocks_free(decode)
    finally:
        decode.shutdown()
