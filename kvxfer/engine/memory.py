"""KV pool memory budgets: the pure sizing math for CUDA (`--gpu-memory-utilization`) and the
host-RAM share for CPU ranks.

On CUDA an engine may use `fraction` of the device's TOTAL memory for weights, peak
activations and its KV pool. The budget is not derived from free memory, so two engines on one
GPU with 0.4 each size the same pools whichever starts first, or both at once. Memory outside
torch's allocator (the CUDA context, NCCL and cuBLAS workspaces, about 0.5-1 GiB per process)
is not counted: fractions of engines sharing a GPU must leave room for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class CudaMemoryPlan:
    total_bytes: int  # the device's total memory
    fraction: float  # share of it this engine may use
    weights_bytes: int  # allocated after the weights load
    activation_bytes: int  # peak allocated during the profiling forward, above the weights
    graph_bytes: int = 0  # the decode CUDA graphs' memory pool and static buffers (kept for good)

    @property
    def kv_bytes(self) -> int:
        """Bytes left for the KV pool; zero or negative when nothing is left."""
        used = self.weights_bytes + self.activation_bytes + self.graph_bytes
        return int(self.total_bytes * self.fraction) - used

    def describe(self) -> str:
        gib = 1 << 30
        return (
            f"gpu_memory_utilization {self.fraction} of {self.total_bytes / gib:.2f} GiB = "
            f"{self.total_bytes * self.fraction / gib:.2f} GiB; weights {self.weights_bytes / gib:.2f} GiB, "
            f"peak activations {self.activation_bytes / gib:.2f} GiB, CUDA graphs {self.graph_bytes / gib:.2f} GiB; "
            f"KV pool {self.kv_bytes / gib:.2f} GiB"
        )


def cpu_kv_budget_bytes(available_ram: int, fraction: float, cap: int, tp_size: int) -> int:
    """One CPU rank's KV budget: the ranks share one host's RAM (and zeroing a pool touches
    every page), so a share of what is available, capped, split over the ranks."""
    return min(int(available_ram * fraction), cap) // tp_size


def available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
