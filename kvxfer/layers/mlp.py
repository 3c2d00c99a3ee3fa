"""SwiGLU MLP with gate/up column-parallel and down row-parallel on the intermediate dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvxfer.layers.linear import ColumnParallelLinear, RowParallelLinear
from kvxfer.layers.parallel import TPInfo


class GatedMLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        tp: TPInfo,
        bias: bool = False,
        reduce: bool = True,
        dtype=None,
        device=None,
    ) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], tp, bias, dtype, device
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp, bias, reduce, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))

    def load(self, ckpt, prefix: str) -> None:
        self.gate_up_proj.load(ckpt, f"{prefix}.gate_proj", f"{prefix}.up_proj")
        self.down_proj.load(ckpt, f"{prefix}.down_proj")
