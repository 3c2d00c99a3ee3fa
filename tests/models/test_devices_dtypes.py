"""The same scenario in other dtypes and on CUDA (Triton ops) against CPU float32."""

import pytest
import torch

from .conftest import TINY_PRESETS
from .harness import scenario_logits


def compare(got, expected):
    assert [(s, p) for s, p, _ in got] == [(s, p) for s, p, _ in expected]
    worst = max((a.float() - b).abs().max().item() for (_, _, a), (_, _, b) in zip(got, expected))
    agree = sum(int(a.argmax() == b.argmax()) for (_, _, a), (_, _, b) in zip(got, expected))
    return worst, agree / len(got)


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-deepseek-mla"])
def test_bfloat16_on_cpu_tracks_float32(preset_dir, name):
    worst, agree = compare(scenario_logits(preset_dir(name), dtype=torch.bfloat16), scenario_logits(preset_dir(name)))
    assert worst < 1.0 and agree >= 0.8, (worst, agree)


@pytest.mark.cuda
@pytest.mark.parametrize("name", TINY_PRESETS)
def test_cuda_float32_matches_cpu(preset_dir, name):
    torch.backends.cuda.matmul.allow_tf32 = False
    worst, agree = compare(scenario_logits(preset_dir(name), device="cuda"), scenario_logits(preset_dir(name)))
    assert worst < 1e-3 and agree == 1.0, (worst, agree)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-deepseek-v3"])
def test_cuda_bfloat16_tracks_cpu_float32(preset_dir, name):
    worst, agree = compare(
        scenario_logits(preset_dir(name), device="cuda", dtype=torch.bfloat16), scenario_logits(preset_dir(name))
    )
    assert worst < 1.0 and agree >= 0.8, (worst, agree)
