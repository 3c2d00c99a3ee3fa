"""Tensor-parallel rank info and the two collectives the layers need, on the default group."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPInfo:
    rank: int = 0
    size: int = 1

    def split(self, total: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's equal share of `total` items."""
        if total % self.size:
            raise ValueError(f"{what}={total} is not divisible by tensor_parallel_size={self.size}")
        length = total // self.size
        return self.rank * length, length


def all_reduce(x: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    """Sum partial results over the ranks, in place."""
    if tp.size > 1:
        dist.all_reduce(x)
    return x


def gather_last_dim(x: torch.Tensor, tp: TPInfo) -> torch.Tensor | None:
    """Concatenate the ranks' shards along the last dim on rank 0; other ranks get None."""
    if tp.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.size)] if tp.rank == 0 else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=-1) if tp.rank == 0 else None
