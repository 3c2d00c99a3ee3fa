"""DeepSeek-V2/V3 decoder: multi-head latent attention (MLA) and dense or MoE feed-forward.

The cache holds, per token, the normalised KV latent and the rotated shared rope key
(`kv_lora_rank + qk_rope_head_dim` features, one slot, replicated on every rank). Attention
runs in the absorbed form: queries are mapped into the latent space through `kv_b_proj`'s key
half, attend over the latent cache as MQA, and the result leaves through its value half.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kvxfer.layers.attention import AttentionMetadata, paged_attention, store_kv
from kvxfer.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from kvxfer.layers.mlp import GatedMLP
from kvxfer.layers.moe import MoE
from kvxfer.layers.norm import RMSNorm
from kvxfer.layers.parallel import TPInfo
from kvxfer.layers.rotary import RotaryEmbedding
from kvxfer.models.base import CausalLM, DecoderLayer
from kvxfer.models.config import ModelConfig

# DeepSeek's low-rank norms use their own epsilon, not rms_norm_eps.
LORA_NORM_EPS = 1e-6


def softmax_scale(hf_config) -> float:
    """qk_head_dim^-0.5, times yarn's mscale(mscale_all_dim) squared when the rope is scaled."""
    scale = (hf_config.qk_nope_head_dim + hf_config.qk_rope_head_dim) ** -0.5
    params = hf_config.rope_parameters
    mscale_all_dim = params.get("mscale_all_dim") if params.get("rope_type", "default") != "default" else None
    if mscale_all_dim and params.get("factor", 1.0) > 1:
        mscale = 0.1 * mscale_all_dim * math.log(params["factor"]) + 1.0
        scale *= mscale * mscale
    return scale


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, tp: TPInfo, dtype, device) -> None:
        super().__init__()
        c = config.hf_config
        self.nope, self.rope, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        qk = self.nope + self.rope
        bias = bool(getattr(c, "attention_bias", False))
        self.q_lora = c.q_lora_rank is not None
        if self.q_lora:
            self.q_a_proj = ReplicatedLinear(c.hidden_size, c.q_lora_rank, bias, dtype, device)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, LORA_NORM_EPS, dtype, device)
            self.q_b_proj = ColumnParallelLinear(c.q_lora_rank, [c.num_attention_heads * qk], tp, False, dtype, device)
        else:
            self.q_proj = ColumnParallelLinear(c.hidden_size, [c.num_attention_heads * qk], tp, False, dtype, device)
        self.kv_a_proj_with_mqa = ReplicatedLinear(c.hidden_size, self.kv_lora_rank + self.rope, bias, dtype, device)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LORA_NORM_EPS, dtype, device)
        self.kv_b_proj = ColumnParallelLinear(
            self.kv_lora_rank, [c.num_attention_heads * (self.nope + self.v_dim)], tp, False, dtype, device
        )
        self.o_proj = RowParallelLinear(c.num_attention_heads * self.v_dim, c.hidden_size, tp, bias, dtype=dtype, device=device)
        self.rotary = rotary
        self.scale = softmax_scale(c)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, kv_layer: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden))) if self.q_lora else self.q_proj(hidden)
        q_nope, q_rope = q.view(num_tokens, -1, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora_rank, self.rope], dim=-1)
        q_rope, k_rope = self.rotary(positions, q_rope, k_rope.unsqueeze(1))
        store_kv(kv_layer, torch.cat([self.kv_a_layernorm(latent).unsqueeze(1), k_rope], dim=-1), None, attn.slot_mapping)

        # kv_b_proj rows are, per local head, `nope` key features then `v_dim` value features.
        w_kv = self.kv_b_proj.weight.view(-1, self.nope + self.v_dim, self.kv_lora_rank)
        w_k, w_v = w_kv[:, : self.nope], w_kv[:, self.nope :]
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_k).transpose(0, 1)  # [T, heads, kv_lora_rank]
        query = torch.cat([q_latent, q_rope], dim=-1)
        out_latent = paged_attention(query, kv_layer, attn, self.scale, v_dim=self.kv_lora_rank)
        out = torch.bmm(out_latent.transpose(0, 1), w_v.transpose(1, 2)).transpose(0, 1)  # [T, heads, v_dim]
        return self.o_proj(out.reshape(num_tokens, -1))

    def load(self, ckpt, prefix: str) -> None:
        if self.q_lora:
            self.q_a_proj.load(ckpt, f"{prefix}.q_a_proj")
            self.q_a_layernorm.load(ckpt, f"{prefix}.q_a_layernorm")
            self.q_b_proj.load(ckpt, f"{prefix}.q_b_proj")
        else:
            self.q_proj.load(ckpt, f"{prefix}.q_proj")
        self.kv_a_proj_with_mqa.load(ckpt, f"{prefix}.kv_a_proj_with_mqa")
        self.kv_a_layernorm.load(ckpt, f"{prefix}.kv_a_layernorm")
        self.kv_b_proj.load(ckpt, f"{prefix}.kv_b_proj")
        self.o_proj.load(ckpt, f"{prefix}.o_proj")


class DeepseekDecoderLayer(DecoderLayer):
    def __init__(self, config: ModelConfig, index: int, rotary: RotaryEmbedding, tp: TPInfo, dtype, device) -> None:
        super().__init__()
        c = config.hf_config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        self.self_attn = MLAttention(config, rotary, tp, dtype, device)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        if index >= c.first_k_dense_replace:
            scoring = "sigmoid" if config.architecture == "DeepseekV3ForCausalLM" else "softmax"
            self.mlp = MoE(c, scoring, tp, dtype, device)
        else:
            self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, tp, dtype=dtype, device=device)


class DeepseekForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig, tp: TPInfo, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(config, tp, dtype, device)
        c = config.hf_config
        # V2 always rotates interleaved pairs; V3 says so in its config.
        interleaved = bool(getattr(c, "rope_interleave", True))
        self.rotary = RotaryEmbedding(c, c.qk_rope_head_dim, interleaved, device, dtype)
        self.layers.extend(
            DeepseekDecoderLayer(config, i, self.rotary, tp, dtype, device) for i in range(config.num_layers)
        )
