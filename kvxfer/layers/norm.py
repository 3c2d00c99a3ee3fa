"""RMSNorm, computed in float32 like the HF reference and cast back, optionally fused with
the residual add that precedes it in a pre-norm block."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`norm(x)`; with `residual`, adds `x` into it IN PLACE and returns
        `(norm(residual + x), residual + x)` (one pass less, no new residual tensor)."""
        if residual is not None:
            x = residual.add_(x)
        # In float32 `.float()` is the tensor itself: work on a copy only where one is made.
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True).add_(self.eps)
        normed = (x32 * variance.rsqrt_()).to(x.dtype)
        out = normed.mul_(self.weight) if normed.dtype == self.weight.dtype else self.weight * normed
        return out if residual is None else (out, x)

    def load(self, ckpt, name: str) -> None:
        self.weight.copy_(ckpt.read(f"{name}.weight", tuple(self.weight.shape)))
