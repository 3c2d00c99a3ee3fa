"""`make gpu-check`'s measuring stages run on the host at small sizes (`--device cpu --quick`),
so the GPU session does not spend its minutes on a broken script: each prints its JSON
result, and the parity stage finds kvxfer float32 equal to HF float32."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def stage(*args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "kvxfer.bench.gpu_stages", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_kernels_stage_reports_bandwidth_and_flops():
    rows = {r["kernel"]: r for r in stage("kernels", "--device", "cpu", "--quick", "--dtype", "float32")}
    assert rows["paged_decode"]["gbps"] > 0 and rows["paged_decode"]["copy_gbps"] > 0
    assert rows["paged_prefill"]["ms"] > 0


@pytest.mark.slow  # HF and the engine on every quick prompt: about 1 min on 2 cores
def test_parity_stage_finds_float32_engine_equal_to_hf():
    (row,) = stage("parity", "--device", "cpu", "--quick", "--dtype", "float32")
    assert row["mismatches"] == [] and row["exact"] == row["prompts"] == 3


def test_decode_stage_reports_step_time_against_the_floor():
    rows = stage("decode", "--device", "cpu", "--quick", "--dtype", "float32")
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        assert r["eager_ms"] > 0 and r["floor_ms"] > 0 and 0 < r["eager_floor_fraction"]
        assert "cuda_graphs_ms" not in r  # graphs are CUDA-only


def test_cuda_device_without_a_gpu_is_refused():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, "-m", "kvxfer.bench.gpu_stages", "kernels"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no GPU" in proc.stderr
