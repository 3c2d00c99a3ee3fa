"""`kvxfer bench transfer` end to end: real rank processes, bytes verified, one JSON object."""

import json
import subprocess
import sys

import pytest


def bench(*args: str) -> dict:
    return bench_shape("tiny-qwen3", "--tokens", "200", *args)


def bench_shape(shape: str, *args: str) -> dict:
    cmd = [sys.executable, "-m", "kvxfer.entrypoints.cli", "bench", "transfer", "--shape", shape,
           "--iterations", "1", "--json", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)  # stdout is exactly one JSON object


@pytest.mark.slow  # a six-layer model through the whole bench: about 1 min on 2 cores
def test_bench_verifies_bytes_and_descriptors_do_not_depend_on_layers():
    one = bench("--prefill-tp", "2", "--decode-tp", "1", "--num-layers", "1")
    six = bench("--prefill-tp", "2", "--decode-tp", "1", "--num-layers", "6")
    for result in (one, six):
        assert result["verified"] and result["connector_gbps"] > 0 and result["raw_gbps"] > 0
        assert {"bytes", "descriptors", "connector_gbps", "raw_gbps", "ratio"} <= result.keys()
    assert six["bytes"] == 6 * one["bytes"]
    assert six["descriptors"] == one["descriptors"] == 2 * 13  # 13 blocks, half a block from each prefill rank


@pytest.mark.cuda
def test_bench_on_vram():
    result = bench("--prefill-tp", "1", "--decode-tp", "1", "--device", "cuda")
    assert result["verified"] and result["device"] == "cuda"


def window_blocks(tokens: int, window: int, block_size: int) -> int:
    """Blocks holding what position `tokens` (the prefill's first token, computed on the decode
    side) sees of the received positions 0 .. tokens - 1 through a window: positions
    max(0, tokens - window + 1) .. tokens - 1."""
    first, last = max(0, tokens - window + 1), tokens - 1
    return last // block_size - first // block_size + 1


@pytest.mark.parametrize(
    ("preset", "p_tp", "d_tp", "full_layers", "sliding_layers", "heads_read"),
    [
        ("tiny-gemma3", 2, 4, 1, 3, 4),  # 2 KV heads at decode TP 4: every head read twice
        ("tiny-mistral-swa", 2, 1, 0, 2, 4),  # every layer slides: no full group
    ],
)
def test_bench_hybrid_moves_full_group_bytes_plus_window_bytes(preset, p_tp, d_tp, full_layers, sliding_layers,
                                                                heads_read):
    tokens, bs, window, head_dim = 60, 8, 6, {"tiny-mistral-swa": 16}.get(preset, 32)  # ten windows of 6
    result = bench_shape(preset, "--tokens", str(tokens), "--block-size", str(bs), "--prefill-tp", str(p_tp),
                         "--decode-tp", str(d_tp))
    block = 2 * bs * head_dim * 4 * heads_read  # K and V of one layer's block, float32, every head the ranks read
    full = -(-tokens // bs) * full_layers * block  # the whole received prompt
    sliding = window_blocks(tokens, window, bs) * sliding_layers * block  # 2 blocks: positions 55..59
    assert result["verified"]
    assert result["bytes"] == result["predicted_bytes"] == full + sliding
    assert [g["bytes"] for g in result["groups"]] == [b for b in (full, sliding) if b]
    assert result["one_tensor_bytes"] == -(-tokens // bs) * (full_layers + sliding_layers) * block
