"""CUDA graphs for decode steps (opt-in: `--cuda-graphs`; not yet run on a GPU).

A decode step (one new token per sequence) of `b` sequences whose longest context is `L`
runs as the graph of the smallest batch-size bucket >= b and the smallest context bucket
>= L, captured at start over static input buffers: token ids, positions, context lengths,
query starts, and per KV cache group slots and block tables padded to a fixed width (the
longest sequence the pools or the model allow). Rows past `b` are padding: one token each, slot -1 (the KV store
skips it), context 1 in block-table entries that are always valid block ids, so they read a
real block and write nothing. The Triton decode kernel plans its context splits on the host
from `max_seq_len`; a graph bakes that plan in, so each context bucket has its own graphs
(planned for the bucket's length: a short context does not run a plan made for the longest).
Logits and sampling stay outside the graph.

`capture=False` runs the same static-buffer path eagerly: on CPU, the tests check it against
the plain eager path; on CUDA it is what the graphs replay.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvxfer.engine.step import StepInput, layer_views
from kvxfer.layers.attention_metadata import AttentionMetadata
from kvxfer.specs import KVCacheGroup


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 (and max_num_seqs itself), up to max_num_seqs."""
    sizes = [n for n in (1, 2, 4) if n < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sizes + [max_num_seqs]


def context_buckets(max_seq_len: int) -> list[int]:
    """1024, then x4 steps, up to max_seq_len (the last bucket)."""
    sizes, n = [], 1024
    while n < max_seq_len:
        sizes.append(n)
        n *= 4
    return sizes + [max_seq_len]


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        groups: Sequence[KVCacheGroup],
        kv_caches: Sequence[torch.Tensor],
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        capture: bool,
    ) -> None:
        self.model = model
        self.kv_layers, self.layer_group = layer_views(groups, kv_caches)
        self.num_groups = g = len(kv_caches)
        self.block_size = block_size
        self.device = kv_caches[0].device
        self.buckets = batch_buckets(max_num_seqs)
        self.max_blocks = -(-max_model_len // block_size)
        self.max_seq_len = self.max_blocks * block_size
        self.contexts = context_buckets(self.max_seq_len)
        n, dev = self.buckets[-1], self.device
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.slot_mapping = torch.full((g, n), -1, dtype=torch.int64, device=dev)  # per group
        self.block_tables = torch.zeros((g, n, self.max_blocks), dtype=torch.int32, device=dev)
        # One host-to-device copy per step: the inputs packed in a pinned buffer, unpacked on the
        # device; an event keeps the next step from overwriting it before the copy has run.
        cuda = dev.type == "cuda"
        self._host = torch.zeros((3 + g) * n + g * n * self.max_blocks, dtype=torch.int64, pin_memory=cuda)
        self._staged = torch.zeros_like(self._host, device=dev)
        self._copied = torch.cuda.Event() if cuda else None
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (batch, context) bucket
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        if capture:
            self._capture_all()

    def can_run(self, step: StepInput) -> bool:
        """A decode-only step that fits the largest bucket and the padded block-table width."""
        return (
            0 < len(step.query_lens) <= self.buckets[-1]
            and all(q == 1 for q in step.query_lens)
            and max(len(t) for t in step.block_tables[0]) <= self.max_blocks
        )

    @torch.inference_mode()
    def run(self, step: StepInput) -> torch.Tensor:
        """Hidden states `[b, hidden]` of the step's `b` tokens (row r: sequence r's new token)."""
        b = len(step.query_lens)
        bucket = next(n for n in self.buckets if n >= b)
        context = next(n for n in self.contexts if n >= max(step.seq_lens))
        self._fill(step, b, bucket)
        if self.graphs:
            self.graphs[(bucket, context)].replay()
            return self.outputs[(bucket, context)][:b]
        return self._forward(bucket, context, step.seq_lens, step.block_tables)[:b]

    @torch.inference_mode()
    def largest_forward(self) -> torch.Tensor:
        """The largest graph's forward (most sequences, longest context), run eagerly: what a
        memory probe measures the graphs' pool by."""
        return self._forward(self.buckets[-1], self.contexts[-1], [], [])

    def _fill(self, step: StepInput, b: int, bucket: int) -> None:
        n, bs, g = self.buckets[-1], self.block_size, self.num_groups
        width = max(len(t) for t in step.block_tables[0])  # every group's tables are alike long
        slots = [
            [t[(m - 1) // bs] * bs + (m - 1) % bs for m, t in zip(step.seq_lens, tables)]
            for tables in step.block_tables
        ]
        tables = [x for group in step.block_tables for t in group for x in (*t, *[0] * (width - len(t)))]
        if self._copied is not None:
            self._copied.synchronize()
        host = self._host
        # Padding rows: token 0 at position 0, context 1, no slot (-1: nothing stored).
        rows = [(step.input_ids, 0), (step.positions, 0), (step.seq_lens, 1)] + [(s, -1) for s in slots]
        for k, (values, pad) in enumerate(rows):
            host[k * n : k * n + b] = torch.tensor(values, dtype=torch.int64)
            host[k * n + b : k * n + bucket] = pad
        end = (3 + g) * n + g * b * width
        host[(3 + g) * n : end] = torch.tensor(tables, dtype=torch.int64)
        staged = self._staged[:end]
        staged.copy_(host[:end], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        for k, buf in enumerate((self.input_ids, self.positions, self.seq_lens)):
            buf[:bucket].copy_(staged[k * n : k * n + bucket])
        self.slot_mapping[:, :bucket].copy_(staged[3 * n : (3 + g) * n].view(g, n)[:, :bucket])
        # Entries past a row's own blocks keep earlier rows' block ids: valid ids the kernels
        # never read (they stop at the row's context length).
        self.block_tables[:, :b, :width].copy_(staged[(3 + g) * n :].view(g, b, width))

    def _metadata(
        self, group: int, bucket: int, context: int, seq_lens: list[int], block_tables: list[list[int]]
    ) -> AttentionMetadata:
        pad = bucket - len(seq_lens)
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: bucket + 1],
            seq_lens=self.seq_lens[:bucket],
            block_tables=self.block_tables[group, :bucket],
            slot_mapping=self.slot_mapping[group, :bucket],
            query_start_loc_host=list(range(bucket + 1)),
            seq_lens_host=list(seq_lens) + [1] * pad,
            # Padding rows' host tables (the torch backend's) name block 0; their outputs are dropped.
            block_tables_host=[list(t) for t in block_tables] + [[0]] * pad,
            max_query_len=1,
            max_seq_len=context,
        )

    def _forward(
        self, bucket: int, context: int, seq_lens: list[int], block_tables: list[list[list[int]]]
    ) -> torch.Tensor:
        """`block_tables[group][row]`; none (padding rows only) for a capture."""
        attns = [
            self._metadata(g, bucket, context, seq_lens, block_tables[g] if block_tables else [])
            for g in range(self.num_groups)
        ]
        layer_attns = [attns[g] for g in self.layer_group]
        return self.model(self.input_ids[:bucket], self.positions[:bucket], self.kv_layers, layer_attns)

    def _capture_all(self) -> None:
        """Largest buckets first, all in one memory pool (a smaller graph reuses the larger's
        blocks, as only one replays at a time). The padding rows' inputs are what capture sees."""
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device}")
        pool = None
        with torch.inference_mode():
            for key in sorted(((b, c) for b in self.buckets for c in self.contexts), reverse=True):
                # Every row a padding row: valid for any cache state.
                self._forward(*key, [], [])  # warm-up: Triton compiles, cuBLAS plans
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph, pool=pool):
                        self.outputs[key] = self._forward(*key, [], [])
                except RuntimeError as e:
                    raise RuntimeError(
                        f"capturing the decode CUDA graph for {key[0]} sequences of up to {key[1]} tokens "
                        f"failed ({e}); the model does something a graph cannot hold (a host sync?): "
                        "run without --cuda-graphs"
                    ) from e
                pool = graph.pool()
                self.graphs[key] = graph
        torch.cuda.synchronize(self.device)
