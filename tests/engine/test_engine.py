"""Engine behaviour on one rank: prefix caching, preemption, block accounting, sampling,
aborts and bad input. Real model, real engine; HF transformers is the reference."""

from __future__ import annotations

import pytest
from engine_helpers import BLOCK_SIZE, prompts_of

from kvxfer import LLM, SamplingParams
from kvxfer.engine import EngineConfig, LLMEngine

PRESET = "tiny-qwen3"


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(model_dir(PRESET), block_size=BLOCK_SIZE, num_kv_blocks=64) as llm:
        yield llm


@pytest.fixture(scope="module")
def ref(hf_reference):
    return hf_reference(PRESET)


def assert_all_blocks_free(llm):
    stats = llm.engine.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"], stats
    assert not llm.engine.has_unfinished_requests()


def test_prefix_cache_reuses_blocks_with_identical_outputs(llm, ref):
    (base,) = prompts_of((50,), offset=7)
    first = base[:40] + [5, 6, 7]
    second = base[:40] + [9, 10, 11, 12]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    before = llm.engine.stats()
    (out1,) = llm.generate([first], params)
    (out2,) = llm.generate([second], params)
    after = llm.engine.stats()
    assert out1.num_cached_tokens == 0
    assert out2.num_cached_tokens == 32  # two full shared blocks
    assert after["prefix_hit_blocks"] - before["prefix_hit_blocks"] == 2
    assert after["prefix_hit_tokens"] - before["prefix_hit_tokens"] == 32
    assert out1.output_token_ids == ref.greedy(first, 6)[0]
    assert out2.output_token_ids == ref.greedy(second, 6)[0]
    # The same prompt again: served from the cache up to its last block boundary.
    (out3,) = llm.generate([second], params)
    assert out3.num_cached_tokens == 32 and out3.output_token_ids == out2.output_token_ids
    assert_all_blocks_free(llm)


def test_small_pool_preempts_and_still_matches(model_dir, ref):
    prompts = prompts_of((20, 24, 28, 18), offset=3)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    # 8 blocks (128 tokens) for four sequences of ~45 tokens: they cannot all stay resident.
    with LLM(model_dir(PRESET), block_size=BLOCK_SIZE, num_kv_blocks=8) as small:
        outs = small.generate(prompts, params)
        stats = small.engine.stats()
        assert stats["num_preemptions"] > 0
        for prompt, out in zip(prompts, outs):
            assert out.output_token_ids == ref.greedy(prompt, 24)[0]
        assert_all_blocks_free(small)


def test_blocks_free_after_mixed_batch_and_stop_on_eos(llm, ref):
    prompts = prompts_of((5, 16, 33, 47, 64), offset=11)
    outs = llm.generate(prompts, SamplingParams(max_tokens=5))
    eos = set(llm.engine.model_config.eos_token_ids)
    for prompt, out in zip(prompts, outs):
        expected = ref.greedy(prompt, 5)[0]
        cut = next((i + 1 for i, t in enumerate(expected) if t in eos), len(expected))
        assert out.output_token_ids == expected[:cut]
        assert out.finish_reason == ("stop" if cut < len(expected) or expected[-1] in eos else "length")
    assert_all_blocks_free(llm)


def test_string_prompts_and_text(llm, ref):
    (out,) = llm.generate(["hello world"], SamplingParams(max_tokens=4, ignore_eos=True))
    tokenizer = llm.tokenizer
    prompt_ids = tokenizer("hello world")["input_ids"]
    assert out.prompt_token_ids == prompt_ids
    assert out.output_token_ids == ref.greedy(prompt_ids, 4)[0]
    assert out.text == tokenizer.decode(out.output_token_ids, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible_across_batches(llm):
    prompts = prompts_of((12, 30), offset=5)
    seeded = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    alone = llm.generate([prompts[0]], seeded)[0].output_token_ids
    batched = llm.generate(prompts, [seeded, SamplingParams(max_tokens=3, temperature=0.7)])[0].output_token_ids
    assert alone == batched
    other_seed = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    draws = {tuple(llm.generate([prompts[0]], other_seed)[0].output_token_ids) for _ in range(2)}
    assert len(draws) == 1


def test_tiny_top_p_equals_greedy(llm, ref):
    (prompt,) = prompts_of((21,), offset=9)
    params = SamplingParams(max_tokens=6, temperature=1.5, top_p=1e-6, ignore_eos=True)
    assert llm.generate([prompt], params)[0].output_token_ids == ref.greedy(prompt, 6)[0]


def test_sampled_tokens_carry_their_logprob_and_the_top_k(llm, ref):
    """Sampled tokens need not be among the top k: the map then holds k + 1 entries."""
    import torch

    (prompt,) = prompts_of((11,), offset=21)
    params = SamplingParams(max_tokens=6, temperature=5.0, seed=11, ignore_eos=True, logprobs=3)
    (out,) = llm.generate([prompt], params)
    with torch.inference_mode():
        logits = ref.model(torch.tensor([prompt + out.output_token_ids])).logits[0, len(prompt) - 1 : -1]
    for token, entry, lp in zip(out.output_token_ids, out.logprobs, torch.log_softmax(logits.float(), -1)):
        values, ids = lp.topk(3)
        assert entry[token] == pytest.approx(float(lp[token]), abs=1e-4)
        top = sorted(entry.values(), reverse=True)[:3]
        assert top == pytest.approx(values.tolist(), abs=1e-4)
        assert len(entry) == (3 if token in ids.tolist() else 4)
    assert [set(e) for e in llm.generate([prompt], SamplingParams(max_tokens=2, logprobs=True))[0].logprobs] == [
        {t} for t in ref.greedy(prompt, 2)[0]
    ]


def test_abort_reports_and_frees(llm):
    engine = llm.engine
    (prompt,) = prompts_of((40,), offset=13)
    engine.add_request("to-abort", prompt, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    engine.abort_request("to-abort")
    outs = engine.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [("to-abort", True, "abort")]
    assert_all_blocks_free(llm)


def test_bad_requests_raise_and_engine_stays_usable(llm, ref):
    engine = llm.engine
    too_long = [7] * (64 * BLOCK_SIZE)
    with pytest.raises(ValueError, match="too long"):
        llm.generate([[5, 6, 7], too_long])
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [])
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("bad-token", [1, 10**6])
    engine.add_request("dup", [1, 2, 3])
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", [1, 2, 3])
    engine.abort_request("dup")
    engine.step()
    with pytest.raises(ValueError, match="no kv_transfer_config"):
        engine.add_request("kv", [1, 2], kv_transfer_params={"do_remote_decode": True})
    # Nothing was queued by the failures, and the engine still serves.
    (prompt,) = prompts_of((9,), offset=17)
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=3, ignore_eos=True))
    assert out.output_token_ids == ref.greedy(prompt, 3)[0]
    assert_all_blocks_free(llm)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": "x"}, "seed"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 1.5}, "logprobs"),
    ],
)
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_unknown_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "no-such-model"))


def test_tp_the_heads_do_not_allow_is_rejected_before_spawning(model_dir):
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        LLMEngine(EngineConfig(model_dir(PRESET), tensor_parallel_size=3))
