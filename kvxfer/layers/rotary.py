"""Rotary position embedding, for both HF conventions: rotate-half (Llama, Qwen3) and
interleaved pairs (DeepSeek). Frequencies and the attention factor of scaled variants
(linear, llama3, yarn) come from transformers' own rope initialisers.

Like HF, the rotation runs in the model's dtype with cos/sin cast to it; it writes into one
output tensor (no float32 upcast, no concatenation) and gathers cos and sin in one index.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

_HOST = torch.device("cpu")


class RotaryEmbedding(nn.Module):
    def __init__(
        self, hf_config: PretrainedConfig, rotary_dim: int, interleaved: bool, device=None, dtype=None
    ) -> None:
        super().__init__()
        params = hf_config.rope_parameters
        rope_type = params.get("rope_type", "default")
        # The tables are computed on the host, then moved: the position grid below is a host
        # tensor, and transformers' initialisers would otherwise place inv_freq on `device`.
        if rope_type == "default":
            exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim
            inv_freq, scaling = 1.0 / (params["rope_theta"] ** exponents), 1.0
        elif rope_type in ("linear", "llama3", "yarn"):
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, _HOST)
        else:
            raise NotImplementedError(f"rope type {rope_type!r} is not supported")
        if inv_freq.numel() * 2 != rotary_dim:
            raise ValueError(f"rope frequencies cover {inv_freq.numel() * 2} dims, expected {rotary_dim}")
        # cos/sin of every position up to max_position_embeddings, side by side: one gather per step.
        positions = torch.arange(hf_config.max_position_embeddings, dtype=torch.float)
        freqs = positions[:, None] * inv_freq.to(_HOST, torch.float)[None, :]
        table = torch.cat((freqs.cos(), freqs.sin()), dim=-1) * scaling
        self.register_buffer("cos_sin_table", table.to(device, dtype), persistent=False)
        self.interleaved = interleaved

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotate each `[T, heads, rotary_dim]` tensor by its token's position.

        The interleaved convention rotates pairs (x0, x1), (x2, x3)...; its output is written
        de-interleaved (all first members, then all second members). Queries and keys get the
        same permutation, so their dot products, and thus attention, equal the reference's.
        """
        cos, sin = self.cos_sin_table.index_select(0, positions)[:, None, :].chunk(2, dim=-1)
        return tuple(self._rotate(x, cos, sin) for x in xs)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        first, second = out.chunk(2, dim=-1)
        torch.mul(x1, cos, out=first)
        first.sub_(x2 * sin)
        torch.mul(x2, cos, out=second)
        second.add_(x1 * sin)
        return out
