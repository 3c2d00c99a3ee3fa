"""Greedy outputs, their log-probs and top-2 log-probs against HF transformers, per preset and TP size."""

from __future__ import annotations

import pytest

from kvxfer import LLM, SamplingParams
from engine_helpers import BLOCK_SIZE, prompts_of

MAX_TOKENS = 8
CASES = [
    (preset, tp)
    for preset in ("tiny-qwen3", "tiny-llama-gqa2", "tiny-deepseek-mla")
    for tp in (1, 2, 4)
]


@pytest.fixture(scope="module", params=CASES, ids=[f"{p}-tp{t}" for p, t in CASES])
def engine_case(request, model_dir):
    preset, tp = request.param
    # A small token budget makes the longer prompts run as chunked prefill next to decodes.
    llm = LLM(model_dir(preset), tensor_parallel_size=tp, block_size=BLOCK_SIZE, num_kv_blocks=64,
              max_num_batched_tokens=40)
    yield preset, llm
    llm.shutdown()


def test_greedy_matches_hf(engine_case, hf_reference):
    preset, llm = engine_case
    prompts = prompts_of()
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2))
    ref = hf_reference(preset)
    for prompt, out in zip(prompts, outs):
        tokens, logprobs = ref.greedy(prompt, MAX_TOKENS)
        assert out.output_token_ids == tokens, f"prompt of {len(prompt)} tokens"
        assert out.finish_reason == "length"
        assert abs(out.logprobs[0][tokens[0]] - logprobs[0]) < 1e-4
        for pos, (ours, top3) in enumerate(zip(out.logprobs, ref.top3(prompt, MAX_TOKENS))):
            # Greedy: the chosen token is the top-1, so the map holds exactly the top 2.
            (id1, lp1), (id2, lp2), (_, lp3) = top3.items()
            assert len(ours) == 2 and list(ours)[0] == tokens[pos] == id1
            assert sorted(ours.values(), reverse=True) == pytest.approx([lp1, lp2], abs=1e-4)
            if lp2 - lp3 > 1e-3:  # otherwise the runner-up is a rounding tie
                assert ours[id2] == pytest.approx(lp2, abs=1e-4), f"position {pos}"
    stats = llm.engine.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]
