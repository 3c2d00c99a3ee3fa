"""Compile the Triton kernels for an H100 (sm_90) without a GPU and report ptxas register use.

The interpreter checks numerics but not GPU code generation (tile-size limits, dtype rules,
register pressure). Here each kernel is compiled at the tile sizes `triton_ops` picks for the
real model shapes, with the divisibility hints a launch on those shapes gives. Run as a script:
prints one JSON line per kernel variant (`ok`, `registers`, `spill_bytes`).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from kvxfer.layers import triton_kernels as kernels
from kvxfer.layers import triton_ops

TARGET = GPUTarget("cuda", 90, 32)
CACHE = "*bf16"


def _compile(fn, pointers: dict[str, str], ints: dict[str, int], constexprs: dict, num_warps: int) -> dict:
    """Compile `fn`; ints default to a value that is a multiple of 16 (strides, dims of 128/512)."""
    signature, attrs = {}, {}
    for index, param in enumerate(fn.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            continue
        if param.name in pointers:
            signature[param.name] = pointers[param.name]
            divisible = True  # torch allocations and these per-layer views are 16-byte aligned
        elif param.name == "qk_scale":
            signature[param.name] = "fp32"
            divisible = False
        else:
            signature[param.name] = "i32"
            # do_not_specialize ints get no divisibility hint at launch either.
            divisible = not param.do_not_specialize and ints.get(param.name, 16) % 16 == 0
        if divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp, "kernel.ptx")
        ptx.write_text(compiled.asm["ptx"])
        ptxas = [get_ptxas(TARGET.arch).path, "-v", f"--gpu-name=sm_{TARGET.arch}a", str(ptx), "-o", str(ptx.with_suffix(".cubin"))]
        log = subprocess.run(ptxas, capture_output=True, text=True, check=True, timeout=120).stderr
    return {
        "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
        "spill_bytes": int(re.search(r"(\d+) bytes spill stores", log).group(1)),
    }


def _attention_pointers(extra: dict[str, str]) -> dict[str, str]:
    common = {"q_ptr": CACHE, "kv_ptr": CACHE, "bt_ptr": "*i32", "seq_lens_ptr": "*i32", "qsl_ptr": "*i32", "out_ptr": CACHE}
    return {**common, **extra}


def _decode(group: int, dv: int, dt: int, split: bool) -> dict:
    tiles = triton_ops.decode_tiles(group, dv, dt)
    warps = tiles.pop("num_warps")
    flags = {"HAS_TAIL": dt > 0, "SHARED_V": dt > 0, "SPLIT": split, "DOT_PREC": "tf32"}
    pointers = _attention_pointers({"part_ptr": "*fp32", "lse_ptr": "*fp32"})
    return _compile(kernels.decode_kernel, pointers, {"G": group, "DV": dv, "DT": dt}, {**flags, **tiles}, warps)


def _prefill(group: int, dv: int, dt: int) -> dict:
    tiles = triton_ops.prefill_tiles(dv, dt)
    warps = tiles.pop("num_warps")
    flags = {"HAS_TAIL": dt > 0, "SHARED_V": dt > 0, "DOT_PREC": "tf32"}
    return _compile(kernels.prefill_kernel, _attention_pointers({}), {"G": group, "DV": dv, "DT": dt}, {**flags, **tiles}, warps)


def _store(heads_dim: int, has_value: bool) -> dict:
    pointers = {"key_ptr": CACHE, "value_ptr": CACHE, "cache_ptr": CACHE, "slot_ptr": "*i64"}
    constexprs = {"HAS_VALUE": has_value, "BLOCK_D": triton.next_power_of_2(heads_dim)}
    return _compile(kernels.store_kv_kernel, pointers, {"D": heads_dim}, constexprs, 4)


def _merge(dv: int) -> dict:
    pointers = {"part_ptr": "*fp32", "lse_ptr": "*fp32", "qsl_ptr": "*i32", "out_ptr": CACHE}
    constexprs = {"BLOCK_S": 16, "BLOCK_DV": triton.next_power_of_2(dv)}
    return _compile(kernels.merge_splits_kernel, pointers, {"DV": dv}, constexprs, 4)


# Qwen3-0.6B (16 query heads over 8 KV heads of 128) and DeepSeek-V2-Lite absorbed MLA
# (16 heads over a 576-wide latent, V = its first 512 features).
VARIANTS = {
    "store_kv gqa128": lambda: _store(128, True),
    "store_kv mla576": lambda: _store(576, False),
    "decode gqa128 split": lambda: _decode(2, 128, 0, True),
    "decode mla576 split": lambda: _decode(16, 512, 64, True),
    "merge 512": lambda: _merge(512),
    "prefill gqa128": lambda: _prefill(2, 128, 0),
    "prefill mla576": lambda: _prefill(16, 512, 64),
}


def main() -> int:
    failed = 0
    for name, build in VARIANTS.items():
        try:
            result = {"name": name, "ok": True, **build()}
        except Exception:  # reported to the parent test with the traceback
            result = {"name": name, "ok": False, "error": traceback.format_exc()}
            failed += 1
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
