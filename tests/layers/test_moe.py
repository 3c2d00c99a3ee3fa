"""MoE's grouped expert loop against a per-expert reference loop written from the HF
definition: the same bits in float32, with one host transfer per layer."""

import torch
import torch.nn.functional as F
from transformers import DeepseekV2Config

from kvxfer.layers.moe import MoE
from kvxfer.layers.parallel import TPInfo


def reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    weights, ids = moe.gate(x)
    out = torch.zeros_like(x)
    for expert in range(moe.w13.shape[0]):
        tokens, slot = torch.where(ids == expert)
        gate, up = F.linear(x[tokens], moe.w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, moe.w2[expert])
        out.index_add_(0, tokens, (y * weights[tokens, slot, None]).to(out.dtype))
    return out + moe.shared_experts(x)


def test_grouped_experts_equal_the_per_expert_loop_with_one_host_transfer(monkeypatch):
    config = DeepseekV2Config(
        hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
        routed_scaling_factor=1.0, topk_method="greedy",
    )
    gen = torch.Generator().manual_seed(0)
    moe = MoE(config, "softmax", TPInfo())
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        x = torch.randn(37, 32, generator=gen)
        calls = []
        counts = MoE._expert_counts
        monkeypatch.setattr(MoE, "_expert_counts", lambda self, ids: calls.append(1) or counts(self, ids))
        got = moe(x)
        assert torch.equal(got, reference(moe, x))
        assert len(calls) == 1
