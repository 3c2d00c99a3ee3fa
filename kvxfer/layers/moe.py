"""DeepSeek-style mixture of experts: a replicated router (softmax or sigmoid scoring, optional
group-limited choice), routed experts whose weights every rank holds sharded on the
intermediate dim, and shared experts. The partial sums of routed and shared experts go
through one all-reduce."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvxfer.layers.mlp import GatedMLP
from kvxfer.layers.parallel import TPInfo, all_reduce


class Router(nn.Module):
    """Top-k expert choice per token. `scoring="softmax"` follows DeepSeek-V2 (greedy or
    group-limited greedy on the scores); `"sigmoid"` follows DeepSeek-V3 (a learnt score bias
    steers the choice, groups ranked by their two best experts, weights renormalised)."""

    def __init__(self, hf_config, scoring: str, dtype=None, device=None) -> None:
        super().__init__()
        c = hf_config
        self.num_experts, self.top_k = c.n_routed_experts, c.num_experts_per_tok
        self.scoring = scoring
        self.method = getattr(c, "topk_method", None) or "greedy"
        if scoring == "softmax" and self.method not in ("greedy", "group_limited_greedy"):
            raise NotImplementedError(f"DeepSeek-V2 topk_method {self.method!r} is not supported")
        self.num_groups = getattr(c, "n_group", None) or 1
        self.topk_groups = getattr(c, "topk_group", None) or 1
        self.norm_topk = bool(getattr(c, "norm_topk_prob", False)) and scoring == "sigmoid"
        self.scaling = c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, c.hidden_size, dtype=dtype, device=device), False)
        bias = torch.zeros(self.num_experts, dtype=dtype, device=device) if scoring == "sigmoid" else None
        self.e_score_correction_bias = nn.Parameter(bias, False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] float32, expert ids [T, k])."""
        logits = F.linear(x.float(), self.weight.float())
        if self.scoring == "softmax":
            scores = logits.softmax(dim=-1)
            if self.method == "group_limited_greedy":
                group_best = scores.view(-1, self.num_groups, self.num_experts // self.num_groups).amax(-1)
                scores = scores.masked_fill(~self._expert_mask(group_best), 0.0)
            weights, ids = scores.topk(self.top_k, dim=-1, sorted=False)
        else:
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias.float()
            grouped = choice.view(-1, self.num_groups, self.num_experts // self.num_groups)
            choice = choice.masked_fill(~self._expert_mask(grouped.topk(2, dim=-1).values.sum(-1)), float("-inf"))
            ids = choice.topk(self.top_k, dim=-1, sorted=False).indices
            weights = scores.gather(1, ids)
            if self.norm_topk:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids

    def _expert_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """Experts inside each token's `topk_groups` best groups."""
        best = group_scores.topk(self.topk_groups, dim=-1, sorted=False).indices
        groups = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return groups.repeat_interleave(self.num_experts // self.num_groups, dim=-1)

    def load(self, ckpt, prefix: str) -> None:
        self.weight.copy_(ckpt.read(f"{prefix}.weight", tuple(self.weight.shape)))
        if self.e_score_correction_bias is not None:
            bias = self.e_score_correction_bias
            bias.copy_(ckpt.read(f"{prefix}.e_score_correction_bias", tuple(bias.shape)))


class MoE(nn.Module):
    def __init__(self, hf_config, scoring: str, tp: TPInfo, dtype=None, device=None) -> None:
        super().__init__()
        c = hf_config
        self.tp = tp
        self.hidden_size = c.hidden_size
        self.intermediate_size = c.moe_intermediate_size
        self.inter_start, inter = tp.split(c.moe_intermediate_size, "moe_intermediate_size")
        experts = c.n_routed_experts
        self.gate = Router(c, scoring, dtype, device)
        self.w13 = nn.Parameter(torch.empty(experts, 2 * inter, c.hidden_size, dtype=dtype, device=device), False)
        self.w2 = nn.Parameter(torch.empty(experts, c.hidden_size, inter, dtype=dtype, device=device), False)
        self.shared_experts = None
        if c.n_shared_experts:
            self.shared_experts = GatedMLP(
                c.hidden_size, c.moe_intermediate_size * c.n_shared_experts, tp, reduce=False, dtype=dtype, device=device
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        # The (token, choice) pairs grouped by expert (stable: tokens ascending within each).
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)
        tokens = order // ids.shape[1]
        counts = self._expert_counts(flat_ids)
        routed = x.index_select(0, tokens)
        ys = torch.empty_like(routed)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                gate, up = F.linear(routed[rows], self.w13[expert]).chunk(2, dim=-1)
                ys[rows] = F.linear(F.silu(gate).mul_(up), self.w2[expert])
                start += count
        # One scatter in expert order: each token sums its experts in the order the per-expert
        # reference loop does.
        out = torch.zeros_like(x).index_add_(0, tokens, (ys * weights.flatten()[order, None]).to(x.dtype))
        if self.shared_experts is not None:
            out += self.shared_experts(x)
        return all_reduce(out, self.tp)

    def _expert_counts(self, flat_ids: torch.Tensor) -> list[int]:
        """Pairs per expert: the layer's one host transfer (the experts' row ranges)."""
        return torch.bincount(flat_ids, minlength=self.w13.shape[0]).tolist()

    def load(self, ckpt, prefix: str) -> None:
        self.gate.load(ckpt, f"{prefix}.gate")
        inter = self.w2.shape[2]
        full_in = (self.intermediate_size, self.hidden_size)
        full_out = (self.hidden_size, self.intermediate_size)
        for e in range(self.w13.shape[0]):
            p = f"{prefix}.experts.{e}"
            self.w13[e, :inter].copy_(ckpt.read(f"{p}.gate_proj.weight", full_in, 0, self.inter_start, inter))
            self.w13[e, inter:].copy_(ckpt.read(f"{p}.up_proj.weight", full_in, 0, self.inter_start, inter))
            self.w2[e].copy_(ckpt.read(f"{p}.down_proj.weight", full_out, 1, self.inter_start, inter))
        if self.shared_experts is not None:
            self.shared_experts.load(ckpt, f"{prefix}.shared_experts")
