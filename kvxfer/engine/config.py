"""Engine configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class EngineConfig:
    model_dir: str
    tensor_parallel_size: int = 1
    device: str = "cpu"
    # "auto": float32 on CPU (bit-comparable with the HF reference), bfloat16 on CUDA.
    dtype: str = "auto"
    block_size: int = 16
    # Fixed pool size; None sizes the pool from each rank's memory (MIN over ranks).
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 4096
    kv_transfer_config: Any = None
    # Bytes each rank may use for its KV pool, one value for all ranks or one per rank
    # (overrides the memory probe; lets tests give ranks different budgets).
    kv_cache_memory_bytes: int | list[int] | None = None
    # Share of the probed memory given to the KV pool: CPU available RAM (capped by
    # cpu_kv_cache_max_bytes, split over the ranks), or CUDA free memory after the weights load.
    kv_cache_memory_fraction: float | None = None
    cpu_kv_cache_max_bytes: int = 1 << 30
    seed: int = 0
    # Upper bound for any wait on a worker (start-up, a step, a collective).
    worker_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1 or None, got {self.num_kv_blocks}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        mem = self.kv_cache_memory_bytes
        if isinstance(mem, list) and len(mem) != self.tensor_parallel_size:
            raise ValueError(
                f"kv_cache_memory_bytes has {len(mem)} entries for {self.tensor_parallel_size} ranks"
            )
        if self.kv_cache_memory_fraction is not None and not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")

    @property
    def torch_dtype_name(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if self.device == "cpu" else "bfloat16"

    def kv_memory_for_rank(self, rank: int) -> int | None:
        mem = self.kv_cache_memory_bytes
        if mem is None or isinstance(mem, int):
            return mem
        return mem[rank]
