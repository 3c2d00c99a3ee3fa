"""Runs one scheduled step on one TP rank: builds the flattened batch and its attention
metadata (one per KV cache group: each group has its own block tables), runs the model over
the rank's paged KV caches (layer `i` on its group's tensor), and samples on rank 0."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from kvxfer.engine.sampler import Sampler, SamplingInfo
from kvxfer.engine.scheduler import SchedulerOutput
from kvxfer.layers.attention import AttentionMetadata, layers_of
from kvxfer.specs import KVCacheGroup

if TYPE_CHECKING:
    from kvxfer.engine.cuda_graphs import DecodeGraphs


@dataclass
class StepInput:
    """One step, as sent to every rank: token ids and block ids only, no tensors."""

    input_ids: list[int]
    positions: list[int]
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[list[int]]]  # [group][sequence]: the sequence's blocks of that group
    sample_rows: list[int]  # sequences (batch rows) whose next token is sampled
    sampling: list[SamplingInfo]  # one per sample row
    finished_request_ids: list[str]
    connector_meta: Any = None

    @classmethod
    def from_scheduler_output(
        cls, out: SchedulerOutput, block_size: int, num_groups: int, connector_meta: Any
    ) -> StepInput:
        tables: list[list[list[int]]] = [[] for _ in range(num_groups)]
        step = cls([], [], [], [], tables, [], [], list(out.finished_ids), connector_meta)
        for row, sched in enumerate(out.scheduled):
            request, n = sched.request, sched.num_new_tokens
            start, end = request.num_computed_tokens, request.num_computed_tokens + n
            step.input_ids.extend(request.token_slice(start, end))
            step.positions.extend(range(start, end))
            step.query_lens.append(n)
            step.seq_lens.append(end)
            for group, table in zip(step.block_tables, request.block_tables):
                group.append(table[: -(-end // block_size)])
            if sched.samples:
                params = request.sampling_params
                step.sample_rows.append(row)
                step.sampling.append(
                    SamplingInfo(request.request_id, params.temperature, params.top_p, params.seed, params.logprobs,
                                 len(request.output_token_ids))
                )
        return step


def layer_views(
    groups: Sequence[KVCacheGroup], kv_caches: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[int]]:
    """Each model layer's cache view `[num_blocks, heads, 2, block_size, head_size]` in its
    group's tensor, and the layer's group index."""
    num_layers = sum(len(g.layer_ids) for g in groups)
    views: list[torch.Tensor] = [None] * num_layers  # type: ignore[list-item]
    group_of = [0] * num_layers
    for g, (group, cache) in enumerate(zip(groups, kv_caches)):
        for layer, view in zip(group.layer_ids, layers_of(cache)):
            views[layer], group_of[layer] = view, g
    return views, group_of


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        groups: Sequence[KVCacheGroup],
        kv_caches: Sequence[torch.Tensor],
        block_size: int,
        sampler: Sampler | None,
    ) -> None:
        self.model = model
        self.kv_caches = list(kv_caches)
        self.kv_layers, self.layer_group = layer_views(groups, kv_caches)
        self.block_size = block_size
        self.device = kv_caches[0].device
        self.sampler = sampler  # rank 0 only
        self.decode_graphs: DecodeGraphs | None = None  # set by the worker with --cuda-graphs

    @torch.inference_mode()
    def run(self, step: StepInput) -> list[tuple[int, dict[int, float] | None]] | None:
        """Sampled (token, log-probs) per sample row on rank 0; None on the other ranks."""
        if not step.query_lens:
            return [] if self.sampler is not None else None
        # --- CUDA graphs hook (engine/cuda_graphs.py): decode-only steps replay a graph ---
        if self.decode_graphs is not None and self.decode_graphs.can_run(step):
            hidden = self.decode_graphs.run(step)
            starts = list(range(len(step.query_lens) + 1))
        else:  # --- end of the CUDA graphs hook; the eager path ---
            attns = [
                AttentionMetadata.build(step.query_lens, step.seq_lens, tables, self.block_size, self.device)
                for tables in step.block_tables
            ]
            input_ids = torch.tensor(step.input_ids, dtype=torch.long, device=self.device)
            positions = torch.tensor(step.positions, dtype=torch.long, device=self.device)
            hidden = self.model(input_ids, positions, self.kv_layers, [attns[g] for g in self.layer_group])
            starts = attns[0].query_start_loc_host
        if not step.sample_rows:
            return [] if self.sampler is not None else None
        last = torch.tensor([starts[row + 1] - 1 for row in step.sample_rows], device=self.device)
        # Every rank joins: the logits are gathered from the vocab shards onto rank 0.
        logits = self.model.compute_logits(hidden[last])
        if self.sampler is None:
            return None
        return self.sampler(logits, step.sampling)
