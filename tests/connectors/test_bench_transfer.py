"""`kvxfer bench transfer` end to end: real rank processes, bytes verified, one JSON object."""

import json
import subprocess
import sys

import pytest


def bench(*args: str) -> dict:
    cmd = [sys.executable, "-m", "kvxfer.entrypoints.cli", "bench", "transfer", "--shape", "tiny-qwen3",
           "--tokens", "200", "--iterations", "1", "--json", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)  # stdout is exactly one JSON object


def test_bench_verifies_bytes_and_descriptors_do_not_depend_on_layers():
    one = bench("--prefill-tp", "2", "--decode-tp", "1", "--num-layers", "1")
    six = bench("--prefill-tp", "2", "--decode-tp", "1", "--num-layers", "6")
    for result in (one, six):
        assert result["verified"] and result["connector_gbps"] > 0 and result["raw_gbps"] > 0
        assert {"bytes", "descriptors", "connector_gbps", "raw_gbps", "ratio"} <= result.keys()
    assert six["bytes"] == 6 * one["bytes"]
    assert six["descriptors"] == one["descriptors"] == 2 * 13  # 13 blocks, half a block from each prefill rank


@pytest.mark.cuda
def test_bench_on_vram():
    result = bench("--prefill-tp", "1", "--decode-tp", "1", "--device", "cuda")
    assert result["verified"] and result["device"] == "cuda"
