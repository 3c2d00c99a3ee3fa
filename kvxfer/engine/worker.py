"""One TP rank: its device, the model shard, the rank's KV cache tensors (one per KV cache
group), the worker side of the connector, and the memory probe that sizes the rank's KV pools
(on CUDA, a profiling forward at the longest batch; the math is in engine/memory.py)."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from kvxfer.engine.block_manager import engine_kv_cache_groups
from kvxfer.engine.config import EngineConfig
from kvxfer.engine.cuda_graphs import DecodeGraphs
from kvxfer.engine.memory import CudaMemoryPlan, available_ram_bytes, cpu_kv_budget_bytes
from kvxfer.engine.model_runner import ModelRunner
from kvxfer.engine.step import StepInput
from kvxfer.engine.sampler import Sampler, SamplingInfo
from kvxfer.specs import SlidingWindowSpec

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
DEFAULT_CPU_KV_FRACTION = 0.2


class Worker:
    def __init__(self, config: EngineConfig, rank: int, tp_size: int) -> None:
        self.config = config
        self.rank = rank
        self.tp_size = tp_size
        if config.device == "cuda":
            self.device = torch.device("cuda", config.cuda_device_index(rank))
        else:
            self.device = torch.device("cpu")
        self.dtype = getattr(torch, config.torch_dtype_name)
        self.proposed_num_blocks: tuple[int, ...] = ()
        self.num_blocks: tuple[int, ...] = ()  # per KV cache group, agreed by every rank
        self.kv_caches: list[torch.Tensor] = []  # per group
        self.connector = None
        self.runner: ModelRunner | None = None
        self.memory_plan: CudaMemoryPlan | None = None
        self._owns_process_group = False

    def load_model(self) -> None:
        """Load this rank's shard (the pool is sized once the ranks have joined their group)."""
        from kvxfer.models import build_model, load_model_config

        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.model_config = load_model_config(self.config.model_dir)
        self.model = build_model(self.model_config, self.rank, self.tp_size, self.device, self.dtype)
        self.model.load_weights(self.config.model_dir)
        self.spec = self.model_config.kv_cache_spec(self.config.block_size, self.config.torch_dtype_name)
        self.groups = engine_kv_cache_groups(self.model_config, self.config)

    def _propose_num_blocks(self) -> tuple[int, ...]:
        """Blocks per group: `num_kv_blocks` in every group's pool, else this rank's budget split
        by `split_num_blocks` (one group: the budget over the block size).

        The split is made for max_num_seqs sequences of one length that fill the budget together
        (in the one-tensor layout of all layers; at most max_position_embeddings): sized for the
        longest sequence the model allows instead, a small budget would give a sliding group
        less than one window while the full groups could still hold many short sequences."""
        from kvxfer.specs import split_num_blocks

        if self.config.num_kv_blocks is not None:
            return (self.config.num_kv_blocks,) * len(self.groups)
        budget = self.config.kv_memory_for_rank(self.rank)
        if budget is None:
            budget = self._probe_kv_memory()
        per_seq = budget // self.spec.bytes_per_block(self.tp_size) // self.config.max_num_seqs
        max_positions = getattr(self.model_config.hf_config, "max_position_embeddings", None) or 1 << 62
        max_tokens = min(max(per_seq, 1) * self.config.block_size, max_positions)
        return split_num_blocks(self.groups, budget, self.tp_size, max_tokens)

    def _zero_caches(self, num_blocks: tuple[int, ...]) -> list[torch.Tensor]:
        return [
            torch.zeros((n, *g.spec.block_shape(self.tp_size)), dtype=self.dtype, device=self.device)
            for n, g in zip(num_blocks, self.groups)
        ]

    def _probe_kv_memory(self) -> int:
        if self.device.type == "cuda":
            self.memory_plan = self._cuda_memory_plan()
            return max(self.memory_plan.kv_bytes, 0)
        fraction = self.config.kv_cache_memory_fraction or DEFAULT_CPU_KV_FRACTION
        return cpu_kv_budget_bytes(available_ram_bytes(), fraction, self.config.cpu_kv_cache_max_bytes, self.tp_size)

    def _cuda_memory_plan(self) -> CudaMemoryPlan:
        """Weights as allocated now, peak activations from a forward (every rank at once: TP
        collectives) at the longest batch the scheduler may send; the device's total memory."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        weights = torch.cuda.memory_allocated(self.device)
        activations, graphs = self._profile_activation_bytes()
        torch.cuda.empty_cache()
        _, total = torch.cuda.mem_get_info(self.device)
        fraction = self.config.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
        return CudaMemoryPlan(total, fraction, weights, activations, graphs)

    def _profile_activation_bytes(self) -> tuple[int, int]:
        """Peak bytes a step of max_num_batched_tokens tokens (in as many sequences as the
        scheduler allows, every one sampled with top-p and log-probs) allocates beyond what is
        allocated before it, not counting the scratch KV cache it writes; and, with CUDA
        graphs, what the largest decode graph's pool and the static buffers will keep."""
        step, blocks = profile_step(
            self.config.max_num_batched_tokens, self.config.max_num_seqs, self.config.block_size, len(self.groups)
        )
        caches = self._zero_caches((blocks,) * len(self.groups))
        sampler = Sampler(self.device, 0) if self.rank == 0 else None
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        ModelRunner(self.model, self.groups, caches, self.config.block_size, sampler).run(step)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        graphs = 0
        if not self.config.enforce_eager:
            # The largest bucket's eager forward over the static buffers: what its graph holds.
            torch.cuda.reset_peak_memory_stats(self.device)
            decode = self._decode_graphs(caches, capture=False)
            decode.largest_forward()
            torch.cuda.synchronize(self.device)
            graphs = torch.cuda.max_memory_allocated(self.device) - before
            del decode
        del caches
        return peak, graphs

    def _decode_graphs(self, caches: list[torch.Tensor], capture: bool) -> DecodeGraphs:
        # Block tables as wide as the longest sequence the full-attention pools (a sliding pool
        # holds windows only) and the model's positions allow (a wider step runs eagerly).
        max_positions = getattr(self.model_config.hf_config, "max_position_embeddings", None) or 1 << 62
        full = [c.shape[0] for c, g in zip(caches, self.groups) if not isinstance(g.spec, SlidingWindowSpec)]
        max_model_len = min(max_positions, *(n * self.config.block_size for n in full))
        return DecodeGraphs(
            self.model, self.groups, caches, self.config.block_size, self.config.max_num_seqs, max_model_len, capture
        )

    def init_kv_cache(self, rendezvous_file: str) -> tuple[int, ...]:
        """Join the TP group (meeting at `rendezvous_file`, see `Executor`), size this rank's
        pools, agree on their sizes (MIN over ranks, per group), allocate; returns the blocks per
        group."""
        if self.tp_size > 1 and not dist.is_initialized():
            dist.init_process_group(
                "nccl" if self.device.type == "cuda" else "gloo",
                init_method=f"file://{rendezvous_file}",
                rank=self.rank,
                world_size=self.tp_size,
                timeout=datetime.timedelta(seconds=self.config.worker_timeout_s),
            )
            self._owns_process_group = True
        # Sized only now: the profiling forward needs the group. A rank short of memory
        # proposes 0 rather than raising, so every rank reaches the all-reduce and fails alike.
        num_blocks = self.proposed_num_blocks = self._propose_num_blocks()
        if self.tp_size > 1:
            agreed = torch.tensor(num_blocks, dtype=torch.int64, device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            num_blocks = tuple(agreed.tolist())
        for n, group in zip(num_blocks, self.groups):
            # A sliding-window pool also holds its null block (engine/block_manager.py).
            if n < 1 + isinstance(group.spec, SlidingWindowSpec):
                plan = f" ({self.memory_plan.describe()})" if self.memory_plan is not None else ""
                raise ValueError(
                    f"no room for {1 + isinstance(group.spec, SlidingWindowSpec)} KV block(s) of "
                    f"{group.spec.bytes_per_block(self.tp_size)} bytes for layers {list(group.layer_ids)} on some "
                    f"rank{plan}; raise gpu_memory_utilization or set num_kv_blocks or kv_cache_memory_bytes"
                )
        self.num_blocks = num_blocks
        self.kv_caches = self._zero_caches(num_blocks)
        sampler = Sampler(self.device, self.config.seed) if self.rank == 0 else None
        self.runner = ModelRunner(self.model, self.groups, self.kv_caches, self.config.block_size, sampler)
        if self.device.type == "cuda" and not self.config.enforce_eager:
            self.runner.decode_graphs = self._decode_graphs(self.kv_caches, capture=True)
        if self.config.kv_transfer_config is not None:
            from kvxfer.connectors import create_worker_connector

            self.connector = create_worker_connector(
                self.config.kv_transfer_config, self.config, self.spec, self.rank, self.tp_size, self.groups
            )
            self.connector.register_kv_caches(self.kv_caches)
        return num_blocks

    def execute_step(self, step: StepInput):
        """(sampled tokens on rank 0 else None, this rank's connector output or None).

        A connector error raises KVConnectorBroken, after the model step: the other ranks'
        collectives still meet this rank's. A model error raises before `get_finished`, so
        this rank's finished transfers are reported with its next step."""
        from kvxfer.connectors.base import KVConnectorBroken

        broken: Exception | None = None
        if self.connector is not None and step.connector_meta is not None:
            try:
                self.connector.start_load_kv(step.connector_meta)
            except Exception as e:
                broken = e
        sampled = self.runner.run(step)
        finished = None
        if self.connector is not None and broken is None:
            try:
                finished = self.connector.get_finished()
            except Exception as e:
                broken = e
        if broken is not None:
            raise KVConnectorBroken(f"KV connector failed: {type(broken).__name__}: {broken}") from broken
        return sampled, finished

    def kv_pool_info(self) -> dict[str, int | list[int]]:
        """Blocks proposed and agreed, over all groups and per group."""
        return {
            "rank": self.rank,
            "proposed_num_blocks": sum(self.proposed_num_blocks),
            "num_blocks": sum(self.num_blocks),
            "group_num_blocks": list(self.num_blocks),
        }

    def decode_graph_count(self) -> int:
        """CUDA graphs captured on this rank (0: eager)."""
        graphs = self.runner.decode_graphs if self.runner is not None else None
        return len(graphs.graphs) if graphs is not None else 0

    def read_kv_blocks(self, block_ids: list[int], group: int = 0) -> torch.Tensor:
        """CPU copy of the given blocks of this rank's cache of `group`, shape [len(ids), *block_shape]."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return self.kv_caches[group].index_select(0, index).cpu()

    def shutdown(self) -> None:
        if self.connector is not None:
            self.connector.shutdown()
            self.connector = None
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False


def profile_step(max_tokens: int, max_seqs: int, block_size: int, num_groups: int = 1) -> tuple[StepInput, int]:
    """The largest step the scheduler may send, for measuring peak memory: max_tokens prompt
    tokens over as many sequences as allowed (short ones keep positions in range), every one
    sampled with top-p and 20 log-probs (the sampler's largest temporaries); and the number of
    KV blocks its block tables use (in each of `num_groups` groups' pools)."""
    seqs = min(max_seqs, max_tokens)
    lens = [max_tokens // seqs + (i < max_tokens % seqs) for i in range(seqs)]
    tables, blocks = [], 0
    for n in lens:
        tables.append(list(range(blocks, blocks + -(-n // block_size))))
        blocks += len(tables[-1])
    infos = [SamplingInfo(f"profile-{i}", 1.0, 0.9, None, 20) for i in range(seqs)]
    positions = [p for n in lens for p in range(n)]
    step = StepInput([0] * max_tokens, positions, lens, lens, [tables] * num_groups, list(range(seqs)), infos, [])
    return step, blocks

