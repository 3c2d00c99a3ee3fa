"""KV cache groups in the engine (engine/block_manager.py, worker.py, model_runner.py): hybrid
presets (window 6) get one pool, tensor and block table per attention kind; their sliding
groups hold about one window of blocks however long the sequence grows; chunked prefill,
preemption and TP ranks work per group; greedy outputs equal HF transformers throughout."""

from __future__ import annotations


import pytest
from engine_helpers import prompts_of

from kvxfer import LLM, KVTransferConfig, SamplingParams
from kvxfer.engine import EngineConfig, LLMEngine
from kvxfer.engine.block_manager import NULL_BLOCK
from kvxfer.ports import free_port
from kvxfer.specs import FullAttentionSpec, SlidingWindowSpec

BLOCK = 4
HYBRID = ["tiny-gemma3", "tiny-qwen3-hybrid", "tiny-mistral-swa"]


def hf_windows(ref) -> list[int | None]:
    """Each layer's window as transformers' config says (the reference for the grouping)."""
    hf = ref.model.config
    kinds = getattr(hf, "layer_types", None) or ["sliding_attention"] * hf.num_hidden_layers
    return [hf.sliding_window if kind == "sliding_attention" else None for kind in kinds]


def window_span(window: int) -> int:
    """Most blocks of BLOCK tokens that `window` consecutive positions touch."""
    return max(len({p // BLOCK for p in range(start, start + window)}) for start in range(BLOCK))


@pytest.mark.parametrize("preset", HYBRID)
def test_long_generation_holds_one_window_of_sliding_blocks_and_matches_hf(model_dir, hf_reference, preset):
    ref = hf_reference(preset)
    windows = hf_windows(ref)
    (prompt,) = prompts_of((30,), vocab=ref.model.config.vocab_size, offset=5)
    max_tokens = 40  # 70 tokens: more than eleven windows
    engine = LLMEngine(EngineConfig(model_dir(preset), block_size=BLOCK, num_kv_blocks=40))
    try:
        groups = engine.kv_cache_groups
        # One group per attention kind, with exactly the layers transformers gives that kind.
        assert sorted(i for g in groups for i in g.layer_ids) == list(range(len(windows)))
        for g in groups:
            assert {windows[i] for i in g.layer_ids} == {getattr(g.spec, "sliding_window", None)}
            assert isinstance(g.spec, FullAttentionSpec if windows[g.layer_ids[0]] is None else SlidingWindowSpec)
        request = engine.add_request("long", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        held_max = [0] * len(groups)
        while engine.has_unfinished_requests():
            engine.step()
            if len(request.output_token_ids) < 2 or request.is_finished:
                continue  # the prompt's own step holds all of its blocks until the next one
            computed = request.num_computed_tokens
            for g, (group, table) in enumerate(zip(groups, request.block_tables)):
                if isinstance(group.spec, SlidingWindowSpec):
                    real = [b for b in table if b != NULL_BLOCK]
                    held_max[g] = max(held_max[g], len(real))
                    assert len(real) <= window_span(group.spec.sliding_window), (g, table)
                else:
                    assert len(table) == -(-computed // BLOCK)
        for g, group in enumerate(groups):
            if isinstance(group.spec, SlidingWindowSpec):
                assert held_max[g] >= 2  # the bound was met, not undershot by an empty table
        assert request.output_token_ids == ref.greedy(prompt, max_tokens)[0]
        stats = engine.stats()
        assert stats["num_free_blocks"] == stats["num_blocks"]
    finally:
        engine.shutdown()


def test_chunked_prefill_and_preemption_per_group_match_hf(model_dir, hf_reference):
    """Three requests of 52 tokens in full pools of 16 blocks (64 tokens): they preempt each
    other; prompts arrive in chunks of 8 tokens, most of them past the window."""
    preset = "tiny-gemma3"
    ref = hf_reference(preset)
    prompts = prompts_of((20, 22, 24), vocab=ref.model.config.vocab_size, offset=9)
    params = SamplingParams(max_tokens=28, ignore_eos=True)
    with LLM(model_dir(preset), block_size=BLOCK, num_kv_blocks=16, max_num_batched_tokens=8) as llm:
        outs = llm.generate(prompts, params)
        stats = llm.engine.stats()
    assert stats["num_preemptions"] > 0
    assert stats["num_free_blocks"] == stats["num_blocks"]
    for prompt, out in zip(prompts, outs):
        assert out.output_token_ids == ref.greedy(prompt, 28)[0]


@pytest.mark.parametrize("preset", ["tiny-qwen3-hybrid", "tiny-mistral-swa"])
def test_prefix_caching_reuses_every_group_and_matches_hf(model_dir, hf_reference, preset):
    """A prompt sharing 24 tokens (four windows) with an earlier one starts from its cached
    blocks in every group: the full group's 6, the sliding group's last window (2 blocks); a
    prompt whose window was never cached starts from nothing."""
    ref = hf_reference(preset)
    windows = hf_windows(ref)
    (base,) = prompts_of((26,), vocab=ref.model.config.vocab_size, offset=2)
    prompts = [base, base[:24] + [7, 9, 11], base[:24], base[:24]]  # the last ones: hit up to 20 tokens
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    with LLM(model_dir(preset), block_size=BLOCK, num_kv_blocks=32) as llm:
        outs = [llm.generate([p], params)[0] for p in prompts]
        stats = llm.engine.stats()
        assert llm.engine.block_manager.enable_prefix_caching
    for prompt, out in zip(prompts, outs):
        assert out.output_token_ids == ref.greedy(prompt, 5)[0]
    full_layers = any(w is None for w in windows)
    # Position 24 sees 19..23 (window 6): entries 4 and 5 of each sliding group.
    assert outs[1].num_cached_tokens == 24
    assert outs[2].num_cached_tokens == outs[3].num_cached_tokens == 20  # the last token is computed
    sliding_groups = len({w for w in windows if w is not None})
    per_hit = [6 * full_layers + 2 * sliding_groups, 5 * full_layers + 2 * sliding_groups]
    assert stats["prefix_hit_blocks"] == per_hit[0] + 2 * per_hit[1]


def test_decode_side_prefix_hit_reads_only_what_every_group_lacks(model_dir, hf_reference):
    """P/D over the real connector (NIXL over UCX) with a 24-token prefix cached on both sides: the
    decode side receives the whole prompt and reads, per group, the entries past its cached prefix
    that position P's window (the prefill's first token, computed on the decode side) still needs;
    greedy outputs equal HF."""
    preset = "tiny-qwen3-hybrid"  # a full group of 1 layer, a sliding group (window 6) of 3
    ref = hf_reference(preset)
    (base,) = prompts_of((40,), vocab=ref.model.config.vocab_size, offset=6)
    first, long_tail, short_tail = base[:27], base[:24] + base[26:40], base[:24] + [7, 9, 11]
    block = 2 * BLOCK * 32 * 4 * 4  # K and V of one layer's block: head_dim 32, float32, 4 KV heads
    # (prompt, cached tokens, full-group entries read, sliding entries read), with cached
    # entries 0..5 (24 tokens, whose window 19..23 is entries 4, 5):
    # 38 tokens: received 0..37; entries 6..9 of the full group, 8..9 (positions 33..37) sliding.
    # 27 tokens: received 0..26; entry 6 of the full group; sliding 22..26 is entries 5, 6: only 6.
    cases = [(long_tail, 24, 4, 2), (short_tail, 24, 1, 1)]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    kw = dict(block_size=BLOCK, num_kv_blocks=48)
    with LLM(model_dir(preset), kv_transfer_config=KVTransferConfig(role="prefill", side_channel_port=free_port()),
             **kw) as prefill, LLM(model_dir(preset), kv_transfer_config=KVTransferConfig(role="decode"), **kw) as dec:
        prefill.generate([first], params)
        dec.generate([first], params)  # the decode side's local prefix cache
        for prompt, cached, full_reads, sliding_reads in cases:
            (handoff,) = prefill.generate([prompt], params, kv_transfer_params={"do_remote_decode": True})
            (out,) = dec.generate([prompt], params, kv_transfer_params=handoff.kv_transfer_params)
            assert out.error is None and out.num_cached_tokens == cached
            assert out.kv_transfer_stats["bytes"] == (full_reads * 1 + sliding_reads * 3) * block
            assert out.output_token_ids == ref.greedy(prompt, 4)[0]
        assert dec.engine.stats()["prefix_hit_blocks"] == 2 * (6 + 2)


def test_full_attention_models_keep_one_group(model_dir):
    engine = LLMEngine(EngineConfig(model_dir("tiny-qwen3"), block_size=BLOCK, num_kv_blocks=24))
    try:
        (group,) = engine.kv_cache_groups
        assert group.spec == engine.spec and group.layer_ids == tuple(range(engine.model_config.num_layers))
        assert engine.collective_rpc("kv_pool_info")[0]["group_num_blocks"] == [24]
        assert engine.block_manager.enable_prefix_caching
    finally:
        engine.shutdown()


def test_tp_ranks_agree_per_group_on_the_min_and_match_hf(model_dir, hf_reference):
    """Two ranks with different KV budgets: each group's pool is the smaller rank's; the memory
    split fits the budget and gives the sliding group a window for each of max_num_seqs
    sequences, the full group the rest."""
    preset = "tiny-gemma3"
    ref = hf_reference(preset)
    budgets, max_seqs = [400_000, 250_000], 4
    prompts = prompts_of((9, 31), vocab=ref.model.config.vocab_size, offset=4)
    with LLM(model_dir(preset), tensor_parallel_size=2, block_size=BLOCK, kv_cache_memory_bytes=budgets,
             max_num_seqs=max_seqs) as llm:
        info = llm.engine.collective_rpc("kv_pool_info")
        groups = llm.engine.kv_cache_groups
        outs = llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
    agreed = info[0]["group_num_blocks"]
    assert info[1]["group_num_blocks"] == agreed
    # Rank 1's smaller budget gives the smaller proposal in every group: the MIN is its own.
    assert info[0]["proposed_num_blocks"] > info[1]["proposed_num_blocks"] == sum(agreed)
    # Bytes of one block of each group on a rank at TP 2, from the layout: heads, layers, K/V.
    hf = ref.model.config
    per_block = [max(hf.num_key_value_heads // 2, 1) * len(g.layer_ids) * 2 * BLOCK * hf.head_dim * 4 for g in groups]
    assert sum(n * b for n, b in zip(agreed, per_block)) <= min(budgets)
    full = next(n for n, g in zip(agreed, groups) if not isinstance(g.spec, SlidingWindowSpec))
    sliding = next(n for n, g in zip(agreed, groups) if isinstance(g.spec, SlidingWindowSpec))
    assert sliding >= max_seqs * window_span(hf.sliding_window) and full > sliding
    for prompt, out in zip(prompts, outs):
        assert out.output_token_ids == ref.greedy(prompt, 16)[0]
