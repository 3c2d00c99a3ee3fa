"""integration/compare_vllm_pd.sh refuses clearly, before starting anything, without a usable
vLLM environment (vLLM is a benchmark peer, never a kvxfer dependency, so CI has none)."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "integration" / "compare_vllm_pd.sh"


def _run(tmp_path, vllm_venv):
    env = {**os.environ, "VLLM_VENV": str(vllm_venv), "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def test_missing_vllm_environment_is_named(tmp_path):
    proc = _run(tmp_path, tmp_path / "no-such-venv")
    assert proc.returncode == 1
    assert f"VLLM_VENV={tmp_path / 'no-such-venv'}" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_vllm_environment_without_vllm_is_refused(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)  # kvxfer's Python: no vllm there
    proc = _run(tmp_path, venv)
    assert proc.returncode == 1
    assert "cannot import vllm and nixl" in proc.stderr
