"""RMSNorm (with the fused residual add), rotary and SiLU-and-mul against HF transformers' own
modules, in float32 and bfloat16: the hand-fused paths must give the reference's bits."""

import pytest
import torch
from transformers import Qwen3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb as deepseek_rotary
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding, apply_rotary_pos_emb

from kvxfer.layers.mlp import GatedMLP
from kvxfer.layers.norm import RMSNorm
from kvxfer.layers.parallel import TPInfo
from kvxfer.layers.rotary import RotaryEmbedding

DTYPES = [torch.float32, torch.bfloat16]


def qwen3_config(**extra) -> Qwen3Config:
    return Qwen3Config(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **extra
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_fused_residual_add_equal_hf(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 64, generator=gen).to(dtype)
    residual = torch.randn(7, 3, 64, generator=gen).to(dtype)
    weight = (1 + 0.2 * torch.randn(64, generator=gen)).to(dtype)
    ref = Qwen3RMSNorm(64, eps=1e-6).to(dtype)
    ref.weight.data.copy_(weight)
    ours = RMSNorm(64, 1e-6, dtype)
    ours.weight.data.copy_(weight)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
        summed = residual + x
        out, new_residual = ours(x, residual.clone())
        assert torch.equal(new_residual, summed) and torch.equal(out, ref(summed))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotate_half_rotary_equals_hf(dtype):
    config = qwen3_config()
    positions = torch.tensor([0, 1, 2, 300, 511, 7])
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(6, 4, 32, generator=gen).to(dtype)
    k = torch.randn(6, 2, 32, generator=gen).to(dtype)
    cos, sin = Qwen3RotaryEmbedding(config)(q, positions[None])
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    ours_q, ours_k = RotaryEmbedding(config, 32, interleaved=False, dtype=dtype)(positions, q, k)
    assert torch.equal(ours_q, ref_q[0].transpose(0, 1)) and torch.equal(ours_k, ref_k[0].transpose(0, 1))


def test_interleaved_rotary_equals_hf_up_to_the_deinterleaving_permutation():
    config = qwen3_config()
    positions = torch.tensor([3, 0, 100])
    x = torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(2))
    ours = RotaryEmbedding(config, 32, interleaved=True)(positions, x)[0]
    # DeepSeek-V2's reference rotates pairs (x0, x1), (x2, x3)... as complex numbers.
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 32, 2, dtype=torch.float) / 32))
    freqs_cis = torch.polar(torch.ones(3, 16), positions[:, None].float() * inv_freq[None])
    heads_first = x[None].transpose(1, 2)
    ref = deepseek_rotary(heads_first, heads_first, freqs_cis[None])[0][0].transpose(0, 1)
    deinterleaved = torch.cat([ref[..., 0::2], ref[..., 1::2]], dim=-1)
    torch.testing.assert_close(ours, deinterleaved, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_mlp_equals_hf(dtype):
    config = qwen3_config()
    ref = Qwen3MLP(config).to(dtype)
    ours = GatedMLP(64, 96, TPInfo(), dtype=dtype)
    with torch.no_grad():
        ours.gate_up_proj.weight.copy_(torch.cat([ref.gate_proj.weight, ref.up_proj.weight]))
        ours.down_proj.weight.copy_(ref.down_proj.weight)
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
        assert torch.equal(ours(x), ref(x))
