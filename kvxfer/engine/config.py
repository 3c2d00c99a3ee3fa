"""Engine configuration, and what dtype "auto" resolves to on this host."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from kvxfer.connectors.config import KVTransferConfig

logger = logging.getLogger(__name__)

# CPU flags (Linux /proc/cpuinfo names) that run bfloat16 matmuls natively through oneDNN.
_NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_bf16_features() -> tuple[str, ...]:
    """The native bfloat16 features this host's CPU reports; empty when none (or unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ()
    return tuple(flag for flag in _NATIVE_BF16_FLAGS if flag in flags)


def resolve_dtype(dtype: str, device: str, checkpoint_dtype: str | None) -> str:
    """The torch dtype name a model runs in. "auto": on CUDA bfloat16; on CPU a bfloat16 (or
    float16) checkpoint runs in bfloat16 where the CPU has native bfloat16 (AMX or AVX512-BF16),
    float32 elsewhere; float32 checkpoints stay float32 (bit-comparable with the HF reference)."""
    if dtype != "auto":
        return dtype
    if device != "cpu":
        return "bfloat16"
    if checkpoint_dtype not in ("bfloat16", "float16"):
        return "float32"
    features = cpu_bf16_features()
    if features:
        logger.info("dtype auto: %s checkpoint runs in bfloat16 (CPU has %s)", checkpoint_dtype, ", ".join(features))
        return "bfloat16"
    logger.info("dtype auto: %s checkpoint runs in float32 (CPU lacks AMX-BF16 and AVX512-BF16)", checkpoint_dtype)
    return "float32"


@dataclass
class EngineConfig:
    model_dir: str
    tensor_parallel_size: int = 1
    device: str = "cpu"
    # "auto": see resolve_dtype (bfloat16 on CUDA; the checkpoint's half dtype on a CPU with
    # native bfloat16, else float32).
    dtype: str = "auto"
    block_size: int = 16
    # Fixed pool size; None sizes the pool from each rank's memory (MIN over ranks).
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 4096
    kv_transfer_config: KVTransferConfig | None = None
    # Bytes each rank may use for its KV pool, one value for all ranks or one per rank
    # (overrides the memory probe; lets tests give ranks different budgets).
    kv_cache_memory_bytes: int | list[int] | None = None
    # CPU: share of the host's available RAM given to the KV pools (capped by
    # cpu_kv_cache_max_bytes, split over the ranks); default 0.2.
    kv_cache_memory_fraction: float | None = None
    # CUDA: share of each device's TOTAL memory this engine may use for weights, peak
    # activations (measured by a profiling forward) and KV (see engine/memory.py); default 0.9.
    gpu_memory_utilization: float | None = None
    # CUDA: rank r runs on cuda:device_ids[r] (default: cuda:r). All GPUs stay visible, so
    # instances on one host can open each other's CUDA IPC handles.
    device_ids: tuple[int, ...] | None = None
    # CUDA: False captures decode steps in CUDA graphs (engine/cuda_graphs.py). Opt-in (True
    # by default) until the graphs have run on a GPU.
    enforce_eager: bool = True
    cpu_kv_cache_max_bytes: int = 1 << 30
    seed: int = 0
    # Upper bound for any wait on a worker (start-up, a step, a collective).
    worker_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
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
        cuda_only = {"gpu_memory_utilization": self.gpu_memory_utilization, "device_ids": self.device_ids,
                     "enforce_eager": None if self.enforce_eager else False}
        if self.device != "cuda":
            for name, value in cuda_only.items():
                if value is not None:
                    raise ValueError(f"{name} applies to device='cuda' only, got {value!r} with device={self.device!r}")
        elif self.kv_cache_memory_fraction is not None:
            raise ValueError("kv_cache_memory_fraction applies to device='cpu'; on CUDA use gpu_memory_utilization")
        util = self.gpu_memory_utilization
        if util is not None and (isinstance(util, bool) or not 0 < util <= 1):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util!r}")
        if self.device_ids is not None:
            ids = self.device_ids = tuple(self.device_ids)
            if len(ids) != self.tensor_parallel_size:
                raise ValueError(f"device_ids has {len(ids)} entries for {self.tensor_parallel_size} ranks: {ids}")
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
                raise ValueError(f"device_ids must be non-negative ints, got {ids}")
            if len(set(ids)) != len(ids):
                # NCCL refuses two ranks of one group on one GPU.
                raise ValueError(f"device_ids must be distinct (one GPU per rank), got {ids}")

    @functools.cached_property
    def torch_dtype_name(self) -> str:
        if self.dtype == "auto" and self.device == "cpu":
            from kvxfer.models import load_model_config

            return resolve_dtype(self.dtype, self.device, load_model_config(self.model_dir).checkpoint_dtype)
        return resolve_dtype(self.dtype, self.device, None)

    def cuda_device_index(self, rank: int) -> int:
        return self.device_ids[rank] if self.device_ids is not None else rank

    def check_cuda_devices(self, visible: int) -> None:
        """Clear error when a rank's device is not among the `visible` CUDA devices."""
        ids = [self.cuda_device_index(r) for r in range(self.tensor_parallel_size)]
        if max(ids) >= visible:
            raise ValueError(
                f"device_ids {ids} (tensor_parallel_size={self.tensor_parallel_size}) need GPUs "
                f"0..{max(ids)}; {visible} visible"
            )

    def kv_memory_for_rank(self, rank: int) -> int | None:
        mem = self.kv_cache_memory_bytes
        if mem is None or isinstance(mem, int):
            return mem
        return mem[rank]
