"""Runs one scheduled step on one TP rank: builds the flattened batch and its attention
metadata (one per KV cache group: each group has its own block tables), runs the model over
the rank's paged KV caches (layer `i` on its group's tensor), and samples on rank 0."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvxfer.engine.sampler import Sampler
from kvxfer.engine.step import StepGraphs, StepInput, layer_views
from kvxfer.layers.attention_metadata import AttentionMetadata
from kvxfer.specs import KVCacheGroup


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
        self.decode_graphs: StepGraphs | None = None  # set by the worker with --cuda-graphs

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
