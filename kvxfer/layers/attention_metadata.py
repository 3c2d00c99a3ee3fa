"""`AttentionMetadata`: one step's flattened batch as every attention backend sees it, and
`layers_of`, the per-layer views of a cache tensor. Its own module so that the dispatch
(`attention`) and the backends (`torch_ops`, `triton_ops`) all import it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """A flattened batch of `B` sequences; sequence `b`'s new tokens are its last `q_len` positions.

    Device tensors: `query_start_loc` [B+1] int32 (cumulative new-token counts), `seq_lens` [B]
    int32 (context length after this step: cached + new), `block_tables` [B, max_blocks] int32
    (padded with 0), `slot_mapping` [T] int64 (`block_id * block_size + offset` of each new token).
    The `*_host` lists hold the same on the host, for the torch backend's per-sequence loop.
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
    block_tables_host: list[list[int]]
    max_query_len: int
    max_seq_len: int
    # Backend work derived from the above that every layer of the step shares (the torch ops'
    # decode gather plans), built on first use and dropped with the metadata.
    plan_cache: dict[tuple, list] = field(default_factory=dict, repr=False, compare=False)

    @property
    def single_token_seqs(self) -> list[int]:
        """Sequences adding exactly one token (decodes), batched together by the torch ops."""
        starts = self.query_start_loc_host
        return [b for b in range(self.num_seqs) if starts[b + 1] - starts[b] == 1]

    @property
    def multi_token_seqs(self) -> list[int]:
        """Sequences adding more than one token (prefills), attended one by one."""
        starts = self.query_start_loc_host
        return [b for b in range(self.num_seqs) if starts[b + 1] - starts[b] > 1]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_host[-1]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata for sequences that each add `query_lens[b]` tokens, reaching `seq_lens[b]` tokens."""
        if not (len(query_lens) == len(seq_lens) == len(block_tables)):
            raise ValueError("query_lens, seq_lens and block_tables must have one entry per sequence")
        starts = [0]
        slots: list[int] = []
        for q_len, seq_len, table in zip(query_lens, seq_lens, block_tables):
            if not 0 <= q_len <= seq_len:
                raise ValueError(f"query length {q_len} must be between 0 and the sequence length {seq_len}")
            if len(table) * block_size < seq_len:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {seq_len} tokens")
            starts.append(starts[-1] + q_len)
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(seq_len - q_len, seq_len))
        width = max((len(t) for t in block_tables), default=0)
        padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
        return cls(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(len(padded), width),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc_host=starts,
            seq_lens_host=list(seq_lens),
            block_tables_host=[list(t) for t in block_tables],
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
        )


def layers_of(kv_cache: torch.Tensor) -> list[torch.Tensor]:
    """Per-layer views `[num_blocks, heads, kv, block_size, head_size]` of a cache tensor holding
    several layers (`[num_blocks, heads, layers, kv, block_size, head_size]`), as models take them."""
    return [kv_cache[:, :, i] for i in range(kv_cache.shape[2])]
