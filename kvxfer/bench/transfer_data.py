"""`kvxfer bench transfer`'s inputs: the KV shapes it moves (from presets, with sliding-window
patterns), their specs and cache groups, one request's block layout on both sides, and the known
data the prefill pools hold, computed independently of the connector so the decode side's bytes
can be checked against it."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Shape:
    num_kv_heads: int
    head_size: int
    num_layers: int
    dtype: str
    mla: bool = False
    # Per layer: its sliding window, or None for full attention; () when every layer attends fully.
    sliding_windows: tuple[int | None, ...] = ()


def preset_shape(name: str) -> Shape:
    """KV shape of a `kvxfer make-model` preset, as the engine reads the preset's HF config."""
    import tempfile

    from transformers import AutoConfig

    from kvxfer.models.config import load_model_config
    from kvxfer.models.presets import MODEL_TYPES, PRESETS

    if name not in PRESETS:
        raise SystemExit(f"unknown --shape {name!r}; known: {sorted(PRESETS)}")
    preset = PRESETS[name]
    with tempfile.TemporaryDirectory() as tmp:  # config.json only: no weights are written
        hf = AutoConfig.for_model(MODEL_TYPES[preset.architecture], architectures=[preset.architecture],
                                  **preset.config)
        hf.save_pretrained(tmp)
        mc = load_model_config(tmp)
    windows = mc.sliding_windows if any(mc.sliding_windows) else ()
    return Shape(mc.num_kv_heads, mc.head_size, mc.num_layers, str(preset.dtype).removeprefix("torch."), mc.is_mla,
                 windows)


def with_layer_pattern(shape: Shape, window: int, pattern: str) -> Shape:
    """`shape` with its layers sliding (window `window`) or full as `pattern` ("s"/"f" per layer,
    repeated over the layers; e.g. "sssssf" is Gemma 3's five local layers per global one)."""
    if shape.mla:
        raise SystemExit("--sliding-window: an MLA shape has no sliding layers")
    if window < 1 or not pattern or set(pattern) - {"s", "f"}:
        raise SystemExit(f"--sliding-window {window} --layer-pattern {pattern!r}: need a positive window and a "
                         "pattern of 's' (sliding) and 'f' (full)")
    windows = tuple(window if pattern[i % len(pattern)] == "s" else None for i in range(shape.num_layers))
    return replace(shape, sliding_windows=windows)


def make_spec(shape: Shape, block_size: int):
    """The whole model's spec (heads, dtype, block size: what the handshake compares)."""
    from kvxfer.specs import FullAttentionSpec, MLAAttentionSpec

    cls = MLAAttentionSpec if shape.mla else FullAttentionSpec
    return cls(num_kv_heads=shape.num_kv_heads, head_size=shape.head_size, num_layers=shape.num_layers,
               block_size=block_size, dtype=shape.dtype)


def make_groups(shape: Shape, block_size: int):
    """The KV cache groups the engine would cache `shape` in (`ModelConfig.kv_cache_groups`)."""
    from kvxfer.connectors.metadata import one_group
    from kvxfer.specs import group_layers

    if not shape.sliding_windows:
        return one_group(make_spec(shape, block_size))
    return group_layers(shape.sliding_windows, shape.num_kv_heads, shape.head_size, block_size, shape.dtype)


# --- known data, computed independently of the connector ----------------------------------------


def global_heads(num_heads: int, rank: int, tp: int) -> range:
    """Global KV heads in rank `rank`'s tensor: a split of H, or one replicated head when tp > H."""
    if tp <= num_heads:
        per = num_heads // tp
        return range(rank * per, (rank + 1) * per)
    head = rank // (tp // num_heads)
    return range(head, head + 1)


def request_data(seed: int, num_blocks: int, num_heads: int, head_bytes: int):
    """(base[block, head], pattern[words]): head h of request block i holds base[i, h] + pattern."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(-(2**62), 2**62, (num_blocks, num_heads), generator=gen, dtype=torch.int64)
    pattern = torch.randint(-(2**62), 2**62, (head_bytes // 8,), generator=gen, dtype=torch.int64)
    return base, pattern


def expected_blocks(seed: int, n_blocks: int, num_heads: int, head_bytes: int, heads: range, device="cpu"):
    """Drawn on the host (deterministic), expanded on `device` (GBs at 32k tokens)."""
    base, pattern = request_data(seed, n_blocks, num_heads, head_bytes)
    return base[:, heads.start : heads.stop, None].to(device) + pattern.to(device)


def fragmented_ids(n: int, pool: int, seed: int) -> list[int]:
    """`n` distinct block ids out of `pool`, in shuffled runs of 1..32 as a busy allocator leaves them."""
    rng = np.random.default_rng(seed)
    runs, start = [], 0
    while start < pool:
        length = int(rng.integers(1, 33))
        runs.append(range(start, min(start + length, pool)))
        start += length
    rng.shuffle(runs)
    return [b for run in runs for b in run][:n]


@dataclass(frozen=True)
class Layout:
    """One request's blocks in every group on both sides: the prefill holds `held[g]` (the
    entries `held_entries` names), the decode side's table is `tables[g]` (null block 0 before a
    sliding group's window); each group's pool has `pools[g]` blocks."""

    held: list[list[int]]
    tables: list[list[int]]
    pools: tuple[int, ...]


def layout(groups, tokens: int, seed: int) -> Layout:
    from kvxfer.connectors.metadata import held_entries
    from kvxfer.specs import SlidingWindowSpec

    entries = held_entries(groups, tokens)
    held, tables, pools = [], [], []
    for g, (group, entry) in enumerate(zip(groups, entries)):
        k = len(entry)
        sliding = isinstance(group.spec, SlidingWindowSpec)
        pool = k + k // 4 + 1 + sliding  # room to fragment; block 0 of a sliding pool is its null block
        ids = [[sliding + b for b in fragmented_ids(k, pool - sliding, seed + 10 * g + side)] for side in (1, 2)]
        held.append(ids[0])
        tables.append([0] * entry.start + ids[1])
        pools.append(pool)
    return Layout(held, tables, tuple(pools))
