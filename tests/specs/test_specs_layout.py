"""Spec construction, cache layout sizes, block-count math, and the torch-free import."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from kvxfer.specs import (
    FullAttentionSpec,
    KVCacheSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
    TPTransferSlice,
    num_blocks_for,
)

MiB = 1 << 20


def test_gqa_sizes_by_hand():
    # Llama-3-8B-like: 8 KV heads, head 128, 32 layers, block 16, bf16, tp=2 -> 4 heads per rank.
    # Block: 4 heads * 32 layers * 2 (K,V) * 16 tokens * 128 * 2 bytes = 1 MiB.
    spec = FullAttentionSpec(8, 128, 32, 16, "bfloat16")
    assert spec.heads_per_rank(2) == 4
    assert spec.block_shape(2) == (4, 32, 2, 16, 128)
    assert spec.bytes_per_block(2) == MiB
    assert spec.bytes_per_head_block() == MiB // 4
    assert spec.page_size_bytes(2) == MiB // 32
    assert spec.bytes_per_block(1) == 2 * MiB
    assert spec.bytes_per_block(16) == MiB // 4  # replicated: one head per rank
    assert num_blocks_for(spec, 10 * MiB + 5, 2) == 10
    assert num_blocks_for(spec, 10 * MiB + 5, 1) == 5
    assert num_blocks_for(spec, MiB - 1, 2) == 0
    assert num_blocks_for(spec, 0, 2) == 0


def test_mla_sizes_by_hand():
    # DeepSeek-V2-Lite-like: latent 512 + rope 64 = 576, 27 layers, block 64, bf16; every rank
    # holds the whole latent: 27 * 64 * 576 * 2 = 1990656 bytes per block at any tp.
    spec = MLAAttentionSpec(num_kv_heads=1, head_size=512 + 64, num_layers=27, block_size=64, dtype="bfloat16")
    for tp in (1, 2, 3, 8, 16):
        assert spec.heads_per_rank(tp) == 1
        assert spec.head_range(tp - 1, tp) == range(0, 1)
        assert spec.block_shape(tp) == (1, 27, 1, 64, 576)
        assert spec.bytes_per_block(tp) == 1990656
    assert spec.bytes_per_head_block() == 1990656
    assert spec.page_size_bytes(4) == 64 * 576 * 2
    assert num_blocks_for(spec, 1990656 * 7 + 1990655, 4) == 7


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64", "float8_e4m3fn"])
@pytest.mark.parametrize("make", [
    lambda d: FullAttentionSpec(4, 32, 3, 8, d),
    lambda d: SlidingWindowSpec(4, 32, 3, 8, d, 128),
    lambda d: MLAAttentionSpec(1, 40, 3, 8, d),
])
def test_sizes_match_torch_tensor(make, dtype):
    # Independent reference: the bytes torch allocates for the cache tensor of the design.
    spec = make(dtype)
    for tp in (1, 2, 4, 8):
        blocks = 5
        t = torch.empty((blocks, *spec.block_shape(tp)), dtype=getattr(torch, dtype), device="meta")
        nbytes = t.numel() * t.element_size()
        assert spec.bytes_per_block(tp) * blocks == nbytes
        assert spec.page_size_bytes(tp) * blocks == t[:, :, 0].numel() * t.element_size()
        assert spec.bytes_per_head_block() == t[0, 0].numel() * t.element_size()
        assert num_blocks_for(spec, nbytes + spec.bytes_per_block(tp) - 1, tp) == blocks


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="unknown KV cache dtype 'int4'"):
        FullAttentionSpec(8, 64, 2, 16, "int4")
    with pytest.raises(ValueError, match="dtype"):
        FullAttentionSpec(8, 64, 2, 16, None)
    with pytest.raises(ValueError, match="num_kv_heads"):
        FullAttentionSpec(0, 64, 2, 16, "float32")
    with pytest.raises(ValueError, match="block_size"):
        FullAttentionSpec(8, 64, 2, 16.0, "float32")
    with pytest.raises(ValueError, match="sliding_window"):
        SlidingWindowSpec(8, 64, 2, 16, "float32", 0)
    with pytest.raises(ValueError, match="num_kv_heads must be 1"):
        MLAAttentionSpec(2, 576, 2, 16, "bfloat16")
    spec = FullAttentionSpec(8, 64, 2, 16, "float32")
    with pytest.raises(ValueError, match="available_bytes"):
        num_blocks_for(spec, -1, 1)
    with pytest.raises(ValueError, match=r"tp=3 .*H=8"):
        num_blocks_for(spec, MiB, 3)
    with pytest.raises(ValueError, match="differ in length"):
        TPTransferSlice(0, range(0, 2), range(0, 2), range(0, 1))


def test_specs_are_frozen_and_hashable():
    spec = SlidingWindowSpec(8, 64, 2, 16, "torch.float16", sliding_window=4096)
    assert spec.dtype == "float16"  # torch's str(dtype) is accepted
    assert isinstance(spec, KVCacheSpec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_kv_heads = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        TPTransferSlice(0, range(1), range(1), range(1)).remote_rank = 1
    assert hash(spec) == hash(SlidingWindowSpec(8, 64, 2, 16, "float16", 4096))
    assert FullAttentionSpec(8, 64, 2, 16, "float32") != SlidingWindowSpec(8, 64, 2, 16, "float32", 16)


def test_import_does_not_pull_torch():
    code = (
        "import sys, kvxfer.specs as s\n"
        "spec = s.FullAttentionSpec(8, 64, 2, 16, 'bfloat16')\n"
        "spec.get_tp_transfer_slices(1, 4, 2); s.num_blocks_for(spec, 1 << 20, 4)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
