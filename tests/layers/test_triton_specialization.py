"""The Triton kernels do not specialise on integers that change from step to step (Triton
would compile one variant per value class: 1, a multiple of 16, other; and recompile inside
timed runs as batches change)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from kvxfer.layers import triton_kernels as kernels  # noqa: E402

# Per kernel: the integer arguments the launch sites in triton_ops compute from the batch
# (block-table width, context split length and count) or that change from layer to layer
# (the sliding window; 0 on full-attention layers). Strides of the cache, query and output,
# head counts and sizes depend on the model only.
PER_STEP = {
    "decode_kernel": {"bt_sb", "tokens_per_split", "window"},
    "merge_splits_kernel": {"n_splits"},
    "prefill_kernel": {"bt_sb", "window"},
    "store_kv_kernel": set(),
}


@pytest.mark.parametrize("name", sorted(PER_STEP))
def test_per_step_integers_are_not_specialised(name):
    fn = getattr(kernels, name)
    if not hasattr(fn, "params"):
        pytest.skip("TRITON_INTERPRET is set: the interpreter does not specialise")
    params = {p.name: p for p in fn.params}
    assert PER_STEP[name] <= set(params), f"{name} lost a parameter: {PER_STEP[name] - set(params)}"
    unspecialised = {n for n, p in params.items() if p.do_not_specialize}
    assert unspecialised == PER_STEP[name]
