"""Linear layers of a bfloat16 model on CPU: weights kept in `gemm_dtype`, outputs in the
model's dtype and equal to a float64 product of the same bfloat16 numbers up to bf16 rounding."""

import pytest
import torch

from kvxfer.layers.linear import ColumnParallelLinear, RowParallelLinear, bfloat16_matmul_is_slow, gemm_dtype
from kvxfer.layers.parallel import TPInfo


def test_gemm_dtype_policy():
    slow = bfloat16_matmul_is_slow("cpu")
    assert gemm_dtype(torch.bfloat16, "cpu") == (torch.float32 if slow else torch.bfloat16)
    assert gemm_dtype(torch.float32, "cpu") == torch.float32
    assert gemm_dtype(torch.bfloat16, "meta") == torch.bfloat16  # only a CPU's own kernels decide
    assert gemm_dtype(torch.float16, "cpu") == torch.float16


@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_bfloat16_linear_matches_float64_product(rows, kind):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(48, 64, generator=gen).bfloat16()
    b = torch.randn(48, generator=gen).bfloat16()
    x = torch.randn(rows, 64, generator=gen).bfloat16()
    if kind == "column":
        layer = ColumnParallelLinear(64, [48], TPInfo(), bias=True, dtype=torch.bfloat16)
    else:
        layer = RowParallelLinear(64, 48, TPInfo(), bias=True, dtype=torch.bfloat16)
    assert layer.weight.dtype == gemm_dtype(torch.bfloat16, "cpu")
    layer.weight.copy_(w)
    layer.bias.copy_(b)
    assert torch.equal(layer.weight.bfloat16(), w)  # the checkpoint's values, exactly
    with torch.inference_mode():
        out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 48)
    want = x.double() @ w.double().T + b.double()
    # One bfloat16 rounding of the product (and, row-parallel, of the bias add): 2^-8 relative.
    torch.testing.assert_close(out.double(), want, rtol=2 ** -7, atol=2 ** -7 * want.abs().max().item())
