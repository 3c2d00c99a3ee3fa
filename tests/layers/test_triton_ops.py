"""Triton attention ops (`kvxfer.layers.triton_ops`) against torch_ops and a dense reference.

On CPU the kernels run under Triton's interpreter in a subprocess (TRITON_INTERPRET must be set
before triton is first imported, and must not leak into this process), and are compiled for
sm_90 in another to check code generation; on CUDA they run for real.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton_checks import CHECKS, INTERPRETER_CASES

HERE = Path(__file__).parent

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def interpreter_results():
    """Run every interpreter check once in one subprocess; results by "name[dtype]"."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "triton_checks.py")],
        cwd=HERE, env=env, capture_output=True, text=True, timeout=300,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            results[result["name"]] = result
    return results, proc


@needs_triton
@pytest.mark.slow  # one interpreter subprocess for every case: 1-2.5 min on 2 cores
@pytest.mark.parametrize("name,dtype", INTERPRETER_CASES)
def test_triton_ops_under_interpreter(interpreter_results, name, dtype):
    results, proc = interpreter_results
    key = f"{name}[{dtype}]"
    assert key in results, f"no result for {key} (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    assert results[key]["ok"], results[key]["error"]


@needs_triton
def test_kernels_compile_for_h100_without_register_spills():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "triton_compile_check.py")],
        cwd=HERE, env=env, capture_output=True, text=True, timeout=300,
    )
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert results, f"no results (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    failures = [r["error"] for r in results if not r["ok"]]
    assert not failures, "\n".join(failures)
    spilling = {r["name"]: r["spill_bytes"] for r in results if r["spill_bytes"]}
    assert not spilling, f"register spills (bytes) at the chosen tile sizes: {spilling}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", list(CHECKS))
def test_triton_ops_on_cuda(name, dtype):
    CHECKS[name]("cuda", dtype)
