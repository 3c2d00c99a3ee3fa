"""TP ranks as real processes over gloo produce the same logits as one process."""

import pytest
import torch

from .harness import run_ranks, scenario_logits, tp_logits

JOBS = {
    2: ["tiny-qwen3", "tiny-llama-gqa2", "tiny-deepseek-mla", "tiny-deepseek-v3"],
    # tiny-llama-gqa2 has 2 KV heads: at TP 4 each is replicated on two ranks.
    4: ["tiny-llama-gqa2", "tiny-deepseek-mla"],
}


@pytest.mark.parametrize("tp_size", sorted(JOBS))
def test_tp_ranks_match_single_process(tp_size, preset_dir, tmp_path):
    names = JOBS[tp_size]
    run_ranks(tp_logits, tp_size, [(name, preset_dir(name)) for name in names], str(tmp_path))
    for name in names:
        expected = scenario_logits(preset_dir(name))
        got = torch.load(tmp_path / f"{name}.pt")
        assert [(s, p) for s, p, _ in got] == [(s, p) for s, p, _ in expected]
        worst = max((a - b).abs().max().item() for (_, _, a), (_, _, b) in zip(got, expected))
        assert worst < 1e-4, f"{name} at TP {tp_size}: max |logit diff| {worst}"
