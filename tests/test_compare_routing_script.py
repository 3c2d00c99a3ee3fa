"""integration/compare_routing.sh checks its inputs before it starts anything: a bad one is
named on stderr, the exit status is 1, and OUT is never created (no server was started)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "integration" / "compare_routing.sh"


def _run(tmp_path, *args, **env):
    full = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *args], env=full, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("env", "named"), [
    ({"STAGES": "shared warmup"}, "unknown stage 'warmup'"),
    ({"SHARED_PREFIX": "8x512"}, "SHARED_PREFIX=8x512"),
    ({"RATE": "fast"}, "RATE=fast"),
    ({"NUM_REQUESTS": "-3"}, "NUM_REQUESTS=-3"),
    ({"SHORT_LENS": "16 128"}, "SHORT_LENS: '128'"),
    ({"PREFILL_CPUS": "0"}, "PREFILL_CPUS='0'"),
])
def test_bad_setting_is_named_and_nothing_starts(tmp_path, env, named):
    proc = _run(tmp_path, **env)
    assert proc.returncode == 1
    assert named in proc.stderr
    assert not (tmp_path / "out").exists()


def test_model_that_is_neither_a_directory_nor_a_preset_is_named(tmp_path):
    proc = _run(tmp_path, str(tmp_path / "no" / "model"))
    assert proc.returncode == 1
    assert f"MODEL={tmp_path / 'no' / 'model'}" in proc.stderr
    assert not (tmp_path / "out").exists()
