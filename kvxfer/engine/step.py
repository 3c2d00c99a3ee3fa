"""What one engine step sends to every TP rank (`StepInput`: token and block ids, no tensors),
each layer's view of the rank's cache tensors (`layer_views`), and `StepGraphs`, the shape of
a runner of whole decode steps (the CUDA graphs). Shared by the eager runner (`model_runner`)
and the graphs (`cuda_graphs`), so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from kvxfer.connectors.base import ConnectorMetadata
from kvxfer.engine.sampler import SamplingInfo
from kvxfer.engine.scheduler import SchedulerOutput
from kvxfer.layers.attention_metadata import layers_of
from kvxfer.specs import KVCacheGroup


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
    connector_meta: ConnectorMetadata | None = None

    @classmethod
    def from_scheduler_output(
        cls, out: SchedulerOutput, block_size: int, num_groups: int, connector_meta: ConnectorMetadata | None
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


class StepGraphs(Protocol):
    """Runs some steps whole (the decode CUDA graphs, `cuda_graphs.DecodeGraphs`)."""

    def can_run(self, step: StepInput) -> bool: ...

    def run(self, step: StepInput) -> torch.Tensor:
        """The last hidden states, one row per sequence."""
        ...
