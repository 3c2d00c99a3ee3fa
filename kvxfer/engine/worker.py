"""One TP rank: the model shard, the rank's KV cache tensor, the worker side of the
connector, and the memory probe that sizes the rank's KV pool."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from kvxfer.engine.config import EngineConfig
from kvxfer.engine.model_runner import ModelRunner, StepInput
from kvxfer.engine.sampler import Sampler


class Worker:
    def __init__(self, config: EngineConfig, rank: int, tp_size: int) -> None:
        self.config = config
        self.rank = rank
        self.tp_size = tp_size
        self.device = torch.device("cuda", rank) if config.device == "cuda" else torch.device("cpu")
        self.dtype = getattr(torch, config.torch_dtype_name)
        self.proposed_num_blocks = 0
        self.num_blocks = 0
        self.kv_cache: torch.Tensor | None = None
        self.connector = None
        self.runner: ModelRunner | None = None
        self._owns_process_group = False

    def load_model(self) -> int:
        """Load this rank's shard; returns the number of KV blocks this rank could hold."""
        from kvxfer.models import build_model, load_model_config

        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.model_config = load_model_config(self.config.model_dir)
        self.model = build_model(self.model_config, self.rank, self.tp_size, self.device, self.dtype)
        self.model.load_weights(self.config.model_dir)
        self.spec = self.model_config.kv_cache_spec(self.config.block_size, self.config.torch_dtype_name)
        self.proposed_num_blocks = self._propose_num_blocks()
        return self.proposed_num_blocks

    def _propose_num_blocks(self) -> int:
        from kvxfer.specs import num_blocks_for

        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        budget = self.config.kv_memory_for_rank(self.rank)
        if budget is None:
            budget = self._probe_kv_memory()
        return num_blocks_for(self.spec, budget, self.tp_size)

    def _probe_kv_memory(self) -> int:
        fraction = self.config.kv_cache_memory_fraction
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * (fraction or 0.8))
        # The ranks share one host's RAM (and zeroing a CPU pool touches every page).
        share = min(int(_available_ram_bytes() * (fraction or 0.2)), self.config.cpu_kv_cache_max_bytes)
        return share // self.tp_size

    def init_kv_cache(self, dist_port: int) -> int:
        """Join the TP group, agree on the pool size (MIN over ranks), allocate the KV cache."""
        num_blocks = self.proposed_num_blocks
        if self.tp_size > 1:
            if not dist.is_initialized():
                dist.init_process_group(
                    "nccl" if self.device.type == "cuda" else "gloo",
                    init_method=f"tcp://127.0.0.1:{dist_port}",
                    rank=self.rank,
                    world_size=self.tp_size,
                    timeout=datetime.timedelta(seconds=self.config.worker_timeout_s),
                )
                self._owns_process_group = True
            agreed = torch.tensor([num_blocks], dtype=torch.int64, device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            num_blocks = int(agreed.item())
        if num_blocks < 1:
            raise ValueError(
                f"no room for a single KV block of {self.spec.bytes_per_block(self.tp_size)} bytes "
                f"on some rank; set num_kv_blocks or kv_cache_memory_bytes"
            )
        self.num_blocks = num_blocks
        self.kv_cache = torch.zeros(
            (num_blocks, *self.spec.block_shape(self.tp_size)), dtype=self.dtype, device=self.device
        )
        sampler = Sampler(self.device, self.config.seed) if self.rank == 0 else None
        self.runner = ModelRunner(self.model, self.kv_cache, self.config.block_size, sampler)
        if self.config.kv_transfer_config is not None:
            from kvxfer.connectors import create_worker_connector

            self.connector = create_worker_connector(
                self.config.kv_transfer_config, self.config, self.spec, self.rank, self.tp_size
            )
            self.connector.register_kv_cache(self.kv_cache)
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

    def kv_pool_info(self) -> dict[str, int]:
        return {"rank": self.rank, "proposed_num_blocks": self.proposed_num_blocks, "num_blocks": self.num_blocks}

    def read_kv_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """CPU copy of the given blocks of this rank's cache, shape [len(ids), *block_shape]."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return self.kv_cache.index_select(0, index).cpu()

    def shutdown(self) -> None:
        if self.connector is not None:
            self.connector.shutdown()
            self.connector = None
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False


def _available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
