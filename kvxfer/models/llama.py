"""Llama / Mistral / Qwen2 / Qwen3 decoder: GQA attention (Qwen3 adds per-head q/k RMSNorm, Qwen2
biases q/k/v but not o), each layer with its own sliding window or none, and a SwiGLU MLP."""

from __future__ import annotations

import torch
from torch import nn

from kvxfer.layers.attention import AttentionMetadata, paged_attention, store_kv
from kvxfer.layers.linear import QKVParallelLinear, RowParallelLinear
from kvxfer.layers.mlp import GatedMLP
from kvxfer.layers.norm import RMSNorm
from kvxfer.layers.parallel import TPInfo
from kvxfer.layers.rotary import RotaryEmbedding
from kvxfer.models.base import CausalLM, DecoderLayer
from kvxfer.models.config import ModelConfig


class LlamaAttention(nn.Module):
    """GQA attention with rotary positions; `qk_norm` (a norm class, or None) normalises each head
    of q and k before the rotation, `scale` defaults to 1/sqrt(head size). Gemma 3 uses it too."""

    def __init__(
        self, config: ModelConfig, rotary: RotaryEmbedding, tp: TPInfo, dtype, device, sliding_window: int | None,
        qk_norm: type[nn.Module] | None = None, scale: float | None = None,
    ) -> None:
        super().__init__()
        hf = config.hf_config
        self.head_size = config.head_size
        qkv_bias = o_bias = bool(getattr(hf, "attention_bias", False))
        if config.architecture == "Qwen2ForCausalLM":  # hard-coded in HF's Qwen2Attention
            qkv_bias, o_bias = True, False
        self.qkv_proj = QKVParallelLinear(
            hf.hidden_size, self.head_size, hf.num_attention_heads, config.num_kv_heads, tp, qkv_bias, dtype, device
        )
        self.o_proj = RowParallelLinear(
            hf.num_attention_heads * self.head_size, hf.hidden_size, tp, o_bias, dtype=dtype, device=device
        )
        if qk_norm is None and config.architecture == "Qwen3ForCausalLM":
            qk_norm = RMSNorm
        self.qk_norm = qk_norm is not None
        if qk_norm is not None:
            self.q_norm = qk_norm(self.head_size, hf.rms_norm_eps, dtype, device)
            self.k_norm = qk_norm(self.head_size, hf.rms_norm_eps, dtype, device)
        self.rotary = rotary
        self.scale = self.head_size**-0.5 if scale is None else scale
        self.sliding_window = sliding_window

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, kv_layer: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split(self.qkv_proj.split_sizes, dim=-1)
        q = q.view(num_tokens, -1, self.head_size)
        k = k.view(num_tokens, -1, self.head_size)
        v = v.view(num_tokens, -1, self.head_size)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        store_kv(kv_layer, k, v, attn.slot_mapping)
        out = paged_attention(q, kv_layer, attn, self.scale, sliding_window=self.sliding_window, new_kv=(k, v))
        return self.o_proj(out.reshape(num_tokens, -1))

    def load(self, ckpt, prefix: str) -> None:
        self.qkv_proj.load(ckpt, f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj")
        self.o_proj.load(ckpt, f"{prefix}.o_proj")
        if self.qk_norm:
            self.q_norm.load(ckpt, f"{prefix}.q_norm")
            self.k_norm.load(ckpt, f"{prefix}.k_norm")


class LlamaDecoderLayer(DecoderLayer):
    def __init__(
        self, config: ModelConfig, rotary: RotaryEmbedding, tp: TPInfo, dtype, device, sliding_window: int | None
    ) -> None:
        super().__init__()
        hf = config.hf_config
        self.input_layernorm = RMSNorm(hf.hidden_size, hf.rms_norm_eps, dtype, device)
        self.self_attn = LlamaAttention(config, rotary, tp, dtype, device, sliding_window)
        self.post_attention_layernorm = RMSNorm(hf.hidden_size, hf.rms_norm_eps, dtype, device)
        bias = bool(getattr(hf, "mlp_bias", False))
        self.mlp = GatedMLP(hf.hidden_size, hf.intermediate_size, tp, bias, dtype=dtype, device=device)


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig, tp: TPInfo, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(config, tp, dtype, device)
        self.rotary = RotaryEmbedding(config.hf_config, config.head_size, interleaved=False, device=device, dtype=dtype)
        self.layers.extend(
            LlamaDecoderLayer(config, self.rotary, tp, dtype, device, window) for window in config.sliding_windows
        )
