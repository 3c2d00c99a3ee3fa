"""The device dispatch of the attention ops.

The torch ops (`kvxfer.layers.torch_ops`) run everywhere; on CUDA the Triton ops
(`kvxfer.layers.triton_ops`) are used when they import. Both share one signature and take the
step's `AttentionMetadata` (`kvxfer.layers.attention_metadata`, which both backends import).
"""

from __future__ import annotations

import torch

from kvxfer.layers import torch_ops
from kvxfer.layers.attention_metadata import AttentionMetadata, layers_of  # noqa: F401 (the models' import)

try:
    from kvxfer.layers import triton_ops
except ImportError:  # no triton on this machine, or the module is not built yet
    triton_ops = None


def _ops(tensor: torch.Tensor):
    return triton_ops if tensor.is_cuda and triton_ops is not None else torch_ops


def store_kv(
    kv_layer: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None, slot_mapping: torch.Tensor
) -> None:
    """Write new tokens' K (and V) into one layer's paged cache view (see `torch_ops.store_kv`)."""
    _ops(kv_layer).store_kv(kv_layer, key, value, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    v_dim: int | None = None,
    sliding_window: int | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context (see `torch_ops`);
    with `sliding_window` `W`, a token at position `p` sees keys at `p - W + 1 .. p` only.
    `new_kv`: the step's K and V as just stored, which the torch ops attend to in place for a
    prefill with no cached prefix (the Triton kernels read the cache)."""
    if sliding_window is not None and (type(sliding_window) is not int or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or a positive integer, got {sliding_window!r}")
    ops = _ops(query)
    if ops is torch_ops:
        return torch_ops.paged_attention(query, kv_layer, attn, scale, v_dim, sliding_window, new_kv)
    return ops.paged_attention(query, kv_layer, attn, scale, v_dim, sliding_window)
