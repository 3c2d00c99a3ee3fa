"""Tensor-parallel linear layers and how each loads its shard from a checkpoint.

Column-parallel layers split output features over ranks (no communication); row-parallel
layers split input features and sum the partial outputs with one all-reduce. A layer may
stack several checkpoint tensors (q/k/v, gate/up) in one weight, each sharded on its own.

On a CPU without AMX a bfloat16 GEMM of at least `_FLOAT32_GEMM_MIN_ROWS` rows (prefill) runs
in float32 on upcast copies (`_linear`): oneDNN's bfloat16 GEMM on AVX512-BF16 alone measured
1.3-1.8x slower than converting the weight and multiplying in float32 from 128 rows on, and
faster below (decode batches), so weights stay in bfloat16 (docs/benchmarks.md, "Engine against
vLLM on CPU"). The upcast is exact and the output is rounded back once, so only the summation
order differs from a bfloat16 GEMM (which accumulates in float32 too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvxfer.layers.parallel import TPInfo, all_reduce

# (checkpoint tensor prefix, its full number of output rows, first row of this rank, row count)
RowPart = tuple[str, int, int, int]


def _param(*shape: int, dtype=None, device=None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


_FLOAT32_GEMM_MIN_ROWS = 128


def bfloat16_matmul_is_slow(device: torch.device) -> bool:
    """A CPU without AMX: its bfloat16 GEMMs (oneDNN's, and the CPU flash-attention kernel's)
    measured slower than float32 ones on the same shapes, past about a hundred rows."""
    return device.type == "cpu" and not torch.cpu._is_amx_tile_supported()


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`; a large bfloat16 one in float32 where that is faster (see the module docstring)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if x.dtype != torch.bfloat16 or rows < _FLOAT32_GEMM_MIN_ROWS or not bfloat16_matmul_is_slow(x.device):
        return F.linear(x, weight, bias)
    bias = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), bias).to(x.dtype)


class ColumnParallelLinear(nn.Module):
    """`y = x W^T + b` with the rows of W (output features) split over the ranks."""

    def __init__(
        self, in_features: int, out_sizes: list[int], tp: TPInfo, bias: bool = False, dtype=None, device=None
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_sizes = list(out_sizes)
        self.tp = tp
        self.local_sizes = [tp.split(size, "output features")[1] for size in out_sizes]
        rows = sum(self.local_sizes)
        self.weight = _param(rows, in_features, dtype=dtype, device=device)
        self.bias = _param(rows, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.weight, self.bias)

    def load(self, ckpt, *names: str) -> None:
        """Load one checkpoint tensor per entry of `out_sizes`, each split evenly over ranks."""
        if len(names) != len(self.out_sizes):
            raise ValueError(f"expected {len(self.out_sizes)} checkpoint names, got {names}")
        parts = [
            (name, size, self.tp.rank * local, local)
            for name, size, local in zip(names, self.out_sizes, self.local_sizes)
        ]
        self._load_rows(ckpt, parts)

    def _load_rows(self, ckpt, parts: list[RowPart]) -> None:
        weights = [ckpt.read(f"{n}.weight", (rows, self.in_features), 0, start, count) for n, rows, start, count in parts]
        self.weight.copy_(torch.cat(weights))
        if self.bias is not None:
            biases = [ckpt.read(f"{n}.bias", (rows,), 0, start, count) for n, rows, start, count in parts]
            self.bias.copy_(torch.cat(biases))


class ReplicatedLinear(ColumnParallelLinear):
    """A linear every rank holds whole (small projections, MoE router)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=None, device=None) -> None:
        super().__init__(in_features, [out_features], TPInfo(), bias, dtype, device)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection. Query heads split over ranks; KV heads split when there are at
    least as many as ranks, else each rank holds KV head `rank // (tp // num_kv_heads)`."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        num_heads: int,
        num_kv_heads: int,
        tp: TPInfo,
        bias: bool = False,
        dtype=None,
        device=None,
    ) -> None:
        q_heads = tp.split(num_heads, "num_attention_heads")[1]
        if num_kv_heads >= tp.size:
            kv_start, kv_heads = tp.split(num_kv_heads, "num_key_value_heads")
        elif tp.size % num_kv_heads:
            raise ValueError(
                f"num_key_value_heads={num_kv_heads} cannot be replicated over tensor_parallel_size={tp.size}"
            )
        else:
            kv_start, kv_heads = tp.rank // (tp.size // num_kv_heads), 1
        split_sizes = [q_heads * head_size, kv_heads * head_size, kv_heads * head_size]
        super().__init__(hidden_size, [sum(split_sizes)], TPInfo(), bias, dtype, device)
        self.tp = tp
        self.head_size, self.num_heads, self.num_kv_heads = head_size, num_heads, num_kv_heads
        self.q_heads, self.kv_start, self.kv_heads = q_heads, kv_start, kv_heads
        self.split_sizes = split_sizes

    def load(self, ckpt, q_name: str, k_name: str, v_name: str) -> None:
        d = self.head_size
        kv_rows = self.num_kv_heads * d
        self._load_rows(
            ckpt,
            [
                (q_name, self.num_heads * d, self.tp.rank * self.q_heads * d, self.q_heads * d),
                (k_name, kv_rows, self.kv_start * d, self.kv_heads * d),
                (v_name, kv_rows, self.kv_start * d, self.kv_heads * d),
            ],
        )


class RowParallelLinear(nn.Module):
    """`y = x W^T + b` with the columns of W (input features) split over the ranks.

    With `reduce=False` the caller sums the partial outputs itself (to fuse several row-parallel
    results into one all-reduce); the bias is then not applied.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tp: TPInfo,
        bias: bool = False,
        reduce: bool = True,
        dtype=None,
        device=None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.in_features, self.out_features = in_features, out_features
        self.in_start, in_local = tp.split(in_features, "input features")
        self.reduce = reduce
        self.weight = _param(out_features, in_local, dtype=dtype, device=device)
        self.bias = _param(out_features, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _linear(x, self.weight)
        if not self.reduce:
            return y
        y = all_reduce(y, self.tp)
        return y + self.bias if self.bias is not None else y

    def load(self, ckpt, name: str) -> None:
        shape = (self.out_features, self.in_features)
        self.weight.copy_(ckpt.read(f"{name}.weight", shape, 1, self.in_start, self.weight.shape[1]))
        if self.bias is not None:
            self.bias.copy_(ckpt.read(f"{name}.bias", (self.out_features,)))
