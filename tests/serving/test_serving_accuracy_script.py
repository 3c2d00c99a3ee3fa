"""integration/run_accuracy_test.sh as a user runs it: one heterogeneous-TP CPU run that
must pass, its input checks, and Ctrl-C stopping everything it started."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from serving_helpers import child_pids

SCRIPT = Path(__file__).resolve().parents[2] / "integration" / "run_accuracy_test.sh"


def _interruptible() -> None:
    """In the script's process, before exec: SIGINT back to its default. A suite started in the
    background of a non-interactive shell (`make test &`, CI runners) inherits SIGINT ignored, and
    a signal ignored on entry to bash can be neither trapped nor delivered to its children: Ctrl-C
    would do nothing there, unlike in the user's terminal this test stands for."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(env: dict, tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SCRIPT)], env=os.environ | {"WORK_DIR": str(tmp_path / "run")} | env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_interruptible)


def finish(proc: subprocess.Popen, timeout_s: float) -> str:
    """The script's output; on time-out it is stopped the way a user would (SIGTERM, its trap
    cleans up), then killed."""
    try:
        return proc.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out = proc.communicate()[0]
        pytest.fail(f"run_accuracy_test.sh did not finish in {timeout_s}s:\n{out[-4000:]}")


def started_pids(output: str) -> list[int]:
    return [int(p) for p in re.findall(r"started \S+ \(pid (\d+),", output)]


def assert_all_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 30
    for pid in pids:
        while True:
            try:
                os.killpg(pid, 0)  # each server runs in its own process group, workers included
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, f"process group {pid} still alive"
            time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_accuracy_script_heterogeneous_tp_passes(tiny_qwen3, tmp_path):
    proc = start({"MODEL": tiny_qwen3, "PREFILL_TP": "2", "DECODE_TP": "1", "DEVICE": "cpu",
                  "BLOCK_SIZE": "16"}, tmp_path)
    out = finish(proc, 240)
    assert proc.returncode == 0, out[-4000:]
    assert "ACCURACY CHECK PASSED" in out and "PASS MODEL=" in out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["prompts"] >= 100 and report["passed"]
    assert report["exact"] + len(report["near_ties"]) == report["prompts"]
    assert not report["no_transfer"] and not report["leaked"] and report["bytes"] > 0
    pids = started_pids(out)
    assert len(pids) == 4  # prefill, decode, reference, proxy
    assert_all_gone(pids)


@pytest.mark.parametrize("env,message", [
    ({"MODEL": "/no/such/model"}, "neither a model directory"),
    ({"PREFILL_TP": "two"}, "PREFILL_TP must be a positive integer"),
    ({"DEVICE": "tpu"}, "DEVICE must be cpu or cuda"),
    ({"DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": ""}, "no GPU is visible"),
], ids=["unknown model", "bad TP", "bad device", "cuda without GPUs"])
def test_accuracy_script_rejects_bad_settings(tiny_qwen3, tmp_path, env, message):
    proc = start({"MODEL": tiny_qwen3} | env, tmp_path)
    out = finish(proc, 60)
    assert proc.returncode != 0 and message in out and started_pids(out) == []


def test_too_few_gpus_is_a_clear_error(tiny_qwen3, tmp_path):
    # Two visible ids, while prefill TP 2 + decode TP 2 + reference TP 1 need five.
    proc = start({"MODEL": tiny_qwen3, "DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": "0,1", "PREFILL_TP": "2",
                  "DECODE_TP": "2"}, tmp_path)
    out = finish(proc, 60)
    assert proc.returncode != 0 and "need 5 GPUs" in out and "2 visible" in out
    assert started_pids(out) == []


def _check_pid(script_pid: int, deadline: float) -> int:
    """The pid of the script's accuracy_check.py child, once it runs."""
    while time.monotonic() < deadline:
        for pid in child_pids(script_pid):
            try:
                if b"accuracy_check.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                pass
        time.sleep(0.05)
    pytest.fail("accuracy_check.py never started")


def test_ctrl_c_stops_everything(tiny_qwen3, tmp_path):
    """Ctrl-C while the check provably runs: the check is stopped (SIGSTOP) before the
    interrupt, so it cannot have finished, and continued after it, as a terminal would deliver."""
    proc = start({"MODEL": tiny_qwen3, "PREFILL_TP": "2", "DECODE_TP": "1", "MAX_TOKENS": "64"}, tmp_path)
    seen = ""
    deadline = time.monotonic() + 240
    while "proxy is healthy" not in seen:  # every server up; the check starts next
        line = proc.stdout.readline()
        assert line or proc.poll() is None, seen
        seen += line
        assert time.monotonic() < deadline, seen
    check = _check_pid(proc.pid, deadline)
    os.kill(check, signal.SIGSTOP)  # it cannot finish now
    try:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does (pending for the check)
    finally:
        # Gone already if the interrupt came before Python set its handler up (SIGINT's default
        # action ends a process at once, stopped or not): it was interrupted all the same.
        with contextlib.suppress(ProcessLookupError):
            os.kill(check, signal.SIGCONT)
    out = seen + finish(proc, 60)
    assert proc.returncode == 130, out[-3000:]
    assert "PASS MODEL=" not in out and "ACCURACY CHECK PASSED" not in out
    pids = started_pids(out)
    assert len(pids) == 4  # prefill, decode, reference, proxy
    assert_all_gone(pids)
