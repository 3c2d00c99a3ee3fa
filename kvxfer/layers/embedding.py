"""Vocab-parallel token embedding and LM head: each rank holds a contiguous vocab slice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvxfer.layers.parallel import TPInfo, all_reduce, gather_last_dim


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPInfo, dtype=None, device=None) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.start, local = tp.split(vocab_size, "vocab_size")
        self.weight = nn.Parameter(torch.empty(local, hidden_size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        # Rows of other ranks' tokens are zero here and filled in by the all-reduce.
        local_ids = input_ids - self.start
        outside = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        out = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0)
        return all_reduce(out, self.tp)

    def load(self, ckpt, name: str) -> None:
        shape = (self.vocab_size, self.hidden_size)
        self.weight.copy_(ckpt.read(f"{name}.weight", shape, 0, self.start, self.weight.shape[0]))


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection over the vocab slice; `tie_to` shares the embedding's weight."""

    def __init__(
        self, vocab_size: int, hidden_size: int, tp: TPInfo, tie_to: VocabParallelEmbedding | None = None,
        dtype=None, device=None,
    ) -> None:
        super().__init__(vocab_size, hidden_size, tp, dtype, device)
        if tie_to is not None:
            self.weight = tie_to.weight
        self.tied = tie_to is not None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Full-vocab float32 logits `[S, vocab]` on rank 0 (None on the other ranks)."""
        return gather_last_dim(F.linear(hidden, self.weight).float(), self.tp)
