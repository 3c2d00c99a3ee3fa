"""The engine on CUDA (Triton attention ops where importable): greedy equals the CPU HF reference."""

from __future__ import annotations

import pytest
from engine_helpers import BLOCK_SIZE, prompts_of

from kvxfer import LLM, SamplingParams

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-deepseek-mla"])
@pytest.mark.parametrize("tp", [1, 2])
def test_cuda_greedy_matches_hf(model_dir, hf_reference, preset, tp):
    import torch

    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs")
    prompts = prompts_of()
    # float32 on the GPU: comparable with the CPU float32 reference token for token.
    with LLM(model_dir(preset), tensor_parallel_size=tp, device="cuda", dtype="float32",
             block_size=BLOCK_SIZE, num_kv_blocks=256, max_num_batched_tokens=40) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True, logprobs=True))
        seeded = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True)
        draws = {tuple(llm.generate([prompts[0]], seeded)[0].output_token_ids) for _ in range(2)}
        stats = llm.engine.stats()
    ref = hf_reference(preset)
    for prompt, out in zip(prompts, outs):
        tokens, logprobs = ref.greedy(prompt, 8)
        assert out.output_token_ids == tokens
        assert abs(out.logprobs[0][tokens[0]] - logprobs[0]) < 1e-3
    assert len(draws) == 1
    assert stats["num_free_blocks"] == stats["num_blocks"]
