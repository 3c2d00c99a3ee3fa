"""integration/vllm/overhead.py (issue 16's benchmark figures from compare_vllm_pd.sh's JSON) gives
the overheads and ratios computed here by hand from the same numbers; it needs no vLLM."""

import json
import subprocess
import sys
from pathlib import Path

OVERHEAD = Path(__file__).resolve().parents[1] / "integration" / "vllm" / "overhead.py"


def _bench_json(path, **endpoints):
    """A `kvxfer bench serve` result with just the fields overhead.py reads (names with _ for -)."""
    path.write_text(json.dumps({"endpoints": {
        name.replace("_", "-"): {"summary": {"ttft": {"p50_ms": p50}, "duration_s": dur}}
        for name, (p50, dur) in endpoints.items()}}))


def test_overhead_subtracts_the_colocated_ttft_and_divides_by_nixls(tmp_path):
    # 128 tokens: overheads 12-10 = 2 ms (kvxfer's connector) and 14-10 = 4 ms (NixlConnector):
    # ratio 0.50; 16 tokens: NixlConnector's overhead is 0, so no ratio; load 30 s / 40 s = 0.750.
    # "kvxfer" (kvxfer's own engine) is no vLLM P/D: left out everywhere.
    _bench_json(tmp_path / "ttft_128.json", kvxfer=(1.0, 1.0), vllm=(14.0, 1.0), vllm_kvxfer=(12.0, 1.0),
                vllm_colocated=(10.0, 1.0))
    _bench_json(tmp_path / "ttft_16.json", vllm=(8.0, 1.0), vllm_kvxfer=(9.0, 1.0), vllm_colocated=(8.0, 1.0))
    _bench_json(tmp_path / "load.json", kvxfer=(1.0, 5.0), vllm=(60.0, 40.0), vllm_kvxfer=(50.0, 30.0),
                vllm_colocated=(40.0, 20.0))
    proc = subprocess.run([sys.executable, str(OVERHEAD), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("ttft    16 tokens") and "overhead vllm-kvxfer/vllm n/a (<= 0)" in lines[0]
    assert lines[1].startswith("ttft   128 tokens") and "kvxfer " not in lines[1].replace("vllm-kvxfer", "")
    assert "overhead vllm-kvxfer 2.0 ms" in lines[1] and "overhead vllm 4.0 ms" in lines[1]
    assert "overhead vllm-kvxfer/vllm 0.50" in lines[1]
    assert lines[2] == "load duration: vllm-kvxfer 30.00 s, vllm-colocated 20.00 s, vllm 40.00 s, vllm-kvxfer/vllm 0.750"
