"""The vLLM scripts against real vLLM servers: `integration/vllm/run_accuracy_test.sh` starts
prefill, decode and a colocated reference (`kvx_start_vllm`, as `launch_pd.sh` and
`compare_vllm_pd.sh` do) on one host behind `kvxfer proxy`, and passes with kvxfer's connector.
(Each kvxfer instance needs its own side channel port: with none in its config two of them
on one host both took vLLM's kv_port 14579, and the second never started. The script pins
prefill and decode to cores 0 and 1 by default, as the other vLLM tests do.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT_TIMEOUT_S = 1800  # bounds a hang: three vLLM starts on a busy 2-core host, then 12 prompts


def test_accuracy_script_passes_with_kvxfer_connector(vllm_python, tiny_qwen3, tmp_path):
    env = {**os.environ, "VLLM_PYTHON": vllm_python, "PYTHON": sys.executable, "MODEL": tiny_qwen3,
           "NUM_PROMPTS": "12", "MAX_TOKENS": "4", "CONCURRENCY": "4", "WORK_DIR": str(tmp_path / "work")}
    run = subprocess.run(["bash", str(ROOT / "integration" / "vllm" / "run_accuracy_test.sh")], env=env,
                         capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
    logs = tmp_path / "work" / "logs"
    tails = {p.name: p.read_text(errors="replace")[-1500:] for p in logs.glob("*.log")} if logs.exists() else {}
    assert run.returncode == 0, f"{run.stdout[-2000:]}\n{run.stderr[-3000:]}\n{tails}"
    assert "PASS ENGINE=vllm CONNECTOR=kvxfer" in run.stdout
    side_ports = [line for line in (logs / "decode.log").read_text(errors="replace").splitlines()
                  if "side_channel_port" in line]
    assert side_ports, "the decode's kv-transfer-config names no side channel port"
