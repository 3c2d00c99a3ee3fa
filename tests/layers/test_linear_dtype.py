"""Linear layers of a bfloat16 model: large GEMMs may run in float32 on a CPU without AMX
(`linear._linear`); either way the output is bfloat16 and equal to a float64 product of the
same bfloat16 numbers up to one bfloat16 rounding, and the weights stay bfloat16."""

import pytest
import torch

from kvxfer.layers import linear
from kvxfer.layers.linear import ColumnParallelLinear, RowParallelLinear
from kvxfer.layers.parallel import TPInfo


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
    layer.weight.copy_(w)
    layer.bias.copy_(b)
    with torch.inference_mode():
        out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 48) and layer.weight.dtype == torch.bfloat16
    want = x.double() @ w.double().T + b.double()
    # One bfloat16 rounding of the product (and, row-parallel, of the bias add): 2^-8 relative.
    torch.testing.assert_close(out.double(), want, rtol=2 ** -7, atol=2 ** -7 * want.abs().max().item())


def test_float32_path_agrees_with_the_bfloat16_gemm(monkeypatch):
    # Forced on (whatever this CPU is): the float32 path's result differs from oneDNN's bfloat16
    # GEMM only by summation order, so by at most one bfloat16 rounding step.
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=gen).bfloat16()
    x = torch.randn(200, 256, generator=gen).bfloat16()
    monkeypatch.setattr(linear, "bfloat16_matmul_is_slow", lambda device: True)
    got = linear._linear(x, w)
    want = torch.nn.functional.linear(x, w)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7 * want.abs().max().item())
