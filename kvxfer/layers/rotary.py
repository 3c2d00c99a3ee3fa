"""Rotary position embedding, for both HF conventions: rotate-half (Llama, Qwen3) and
interleaved pairs (DeepSeek). Frequencies and the attention factor of scaled variants
(linear, llama3, yarn) come from transformers' own rope initialisers."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config: PretrainedConfig, rotary_dim: int, interleaved: bool, device=None) -> None:
        super().__init__()
        params = hf_config.rope_parameters
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim
            inv_freq, scaling = 1.0 / (params["rope_theta"] ** exponents), 1.0
        elif rope_type in ("linear", "llama3", "yarn"):
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, device)
        else:
            raise NotImplementedError(f"rope type {rope_type!r} is not supported")
        if inv_freq.numel() * 2 != rotary_dim:
            raise ValueError(f"rope frequencies cover {inv_freq.numel() * 2} dims, expected {rotary_dim}")
        # cos/sin of every position up to max_position_embeddings, indexed by each layer.
        positions = torch.arange(hf_config.max_position_embeddings, dtype=torch.float)
        freqs = positions[:, None] * inv_freq.float()[None, :]
        self.register_buffer("cos_table", (freqs.cos() * scaling).to(device), persistent=False)
        self.register_buffer("sin_table", (freqs.sin() * scaling).to(device), persistent=False)
        self.interleaved = interleaved

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotate each `[T, heads, rotary_dim]` tensor by its token's position.

        The interleaved convention rotates pairs (x0, x1), (x2, x3)...; its output is written
        de-interleaved (all first members, then all second members). Queries and keys get the
        same permutation, so their dot products, and thus attention, equal the reference's.
        """
        cos = self.cos_table[positions][:, None, :]
        sin = self.sin_table[positions][:, None, :]
        return tuple(self._rotate(x, cos, sin) for x in xs)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if self.interleaved:
            x1, x2 = x32[..., 0::2], x32[..., 1::2]
        else:
            x1, x2 = x32.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
