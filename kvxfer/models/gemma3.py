"""Gemma 3 text decoder (`Gemma3ForCausalLM`): local (sliding-window) and global layers, each kind
with its own RoPE base, embeddings scaled by sqrt(hidden), (1 + w) RMSNorms around attention and
MLP and on per-head q/k, attention scaled by `query_pre_attn_scalar`, a gated tanh-GELU MLP and
optional final logit soft-capping."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from kvxfer.layers.attention import AttentionMetadata
from kvxfer.layers.mlp import GatedMLP
from kvxfer.layers.parallel import TPInfo
from kvxfer.layers.rotary import RotaryEmbedding
from kvxfer.models.base import CausalLM, DecoderLayer
from kvxfer.models.config import ModelConfig
from kvxfer.models.llama import LlamaAttention


class GemmaRMSNorm(nn.Module):
    """RMSNorm scaled by `1 + weight`, multiplied in float32 before the cast (HF's Gemma3RMSNorm)."""

    def __init__(self, size: int, eps: float, dtype=None, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)

    def load(self, ckpt, name: str) -> None:
        self.weight.copy_(ckpt.read(f"{name}.weight", tuple(self.weight.shape)))


class GeluTanhMLP(GatedMLP):
    """Gemma's gated MLP: `down(gelu_tanh(gate(x)) * up(x))`, same weights and sharding as SwiGLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3DecoderLayer(DecoderLayer):
    """Sandwich norms: each sub-block's output is normalised again before the residual add."""

    def __init__(
        self, config: ModelConfig, rotary: RotaryEmbedding, tp: TPInfo, dtype, device, sliding_window: int | None
    ) -> None:
        super().__init__()
        hf = config.hf_config
        norm = lambda: GemmaRMSNorm(hf.hidden_size, hf.rms_norm_eps, dtype, device)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.self_attn = LlamaAttention(
            config, rotary, tp, dtype, device, sliding_window, GemmaRMSNorm, scale=hf.query_pre_attn_scalar**-0.5
        )
        self.mlp = GeluTanhMLP(hf.hidden_size, hf.intermediate_size, tp, dtype=dtype, device=device)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, kv_layer: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:
        attn_out = self.self_attn(positions, self.input_layernorm(hidden), kv_layer, attn)
        hidden = hidden + self.post_attention_layernorm(attn_out)
        return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))

    def load(self, ckpt, prefix: str) -> None:
        super().load(ckpt, prefix)
        self.pre_feedforward_layernorm.load(ckpt, f"{prefix}.pre_feedforward_layernorm")
        self.post_feedforward_layernorm.load(ckpt, f"{prefix}.post_feedforward_layernorm")


class Gemma3ForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig, tp: TPInfo, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(config, tp, dtype, device)
        hf = config.hf_config
        self.norm = GemmaRMSNorm(hf.hidden_size, hf.rms_norm_eps, dtype, device)
        # HF multiplies by sqrt(hidden) rounded to the weights' dtype.
        self.embed_scale = torch.tensor(hf.hidden_size**0.5).to(dtype).item()
        self.softcap = hf.final_logit_softcapping
        # One rotary table per layer kind: local and global layers use different RoPE bases.
        kinds = ("full_attention", "sliding_attention")
        rotaries = {kind: _rotary(hf, kind, config.head_size, device, dtype) for kind in kinds}
        self.rotaries = nn.ModuleDict(rotaries)
        self.layers.extend(
            Gemma3DecoderLayer(
                config, rotaries["full_attention" if window is None else "sliding_attention"], tp, dtype, device, window
            )
            for window in config.sliding_windows
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embed_scale

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = super().compute_logits(hidden)
        if logits is None or self.softcap is None:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap


def _rotary(hf, kind: str, head_size: int, device, dtype) -> RotaryEmbedding:
    """A rotary table from the `kind` entry of Gemma's per-layer-kind `rope_parameters`: a shallow
    config copy carrying that entry alone reads like any single-rope config."""
    single = copy.copy(hf)
    single.rope_parameters = dict(hf.rope_parameters[kind])
    return RotaryEmbedding(single, head_size, interleaved=False, device=device, dtype=dtype)
