"""`make gpu-check`'s orchestration on a host without a GPU: stage order, CUDA stages reported
"skipped: no GPU", the time check before each stage, limits that stop a stage's whole process
group, failures, and the summary files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvxfer.bench import gpu_check
from kvxfer.bench.gpu_check import Stage, run_stage

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["env", "pytest-cuda", "kernels", "transfer", "parity", "decode", "engine", "accuracy"]


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan killed with its group waits for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | {"CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "kvxfer.bench.gpu_check", "--out", str(out),
                           "--wheels", str(tmp_path / "no-wheels"), "--site", str(tmp_path / "site"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return proc, summary


def test_dry_run_lists_the_stages_in_order_with_the_issue_commands(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvxfer.bench.gpu_check", "--out", str(tmp_path), "--dry-run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    names = [line.split("]")[0][1:] for line in proc.stdout.splitlines() if line.startswith("[")]
    assert names == STAGES
    assert ("bench engine --preset qwen3-0.6b-shape --num-prompts 256 --input-len 100-1024 "
            "--output-len 100-1024 --device cuda") in proc.stdout
    for tokens in (4096, 32768):
        for tp in (1, 2):
            assert f"--tokens {tokens} --prefill-tp {tp} --decode-tp {tp}" in proc.stdout
    assert "GPU_SHARING=1" in proc.stdout and "-m pytest -m cuda" in proc.stdout
    assert not (tmp_path / "summary.json").exists()


def test_without_a_gpu_cuda_stages_skip_and_the_summary_says_so(tmp_path):
    proc, summary = check(tmp_path, "--budget-s", "200")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["wheels", *STAGES]
    assert stages["wheels"]["status"] == "skipped" and "no wheels" in stages["wheels"]["reason"]
    assert stages["env"]["status"] == "passed", Path(stages["env"]["log"]).read_text()[-3000:]
    env = [r for r in stages["env"]["results"] if "nixl_after_cuda" in r]
    assert env and env[0]["nixl_after_cuda"] == "ok"
    for name in STAGES[1:]:
        assert (stages[name]["status"], stages[name]["reason"]) == ("skipped", "no GPU")
    assert summary["device"] == ""
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| pytest-cuda | skipped (no GPU) |" in md and "no GPU" in md.splitlines()[0]


def test_a_stage_that_does_not_fit_the_budget_is_skipped(tmp_path):
    proc, summary = check(tmp_path, "--budget-s", "8", "--only", "env")
    assert proc.returncode == 0
    (env,) = [s for s in summary["stages"] if s["name"] == "env"]
    assert env["status"] == "skipped" and env["reason"].startswith("not enough time")
    assert not (tmp_path / "out" / "logs" / "01-env.log").exists()


def test_unknown_stage_names_are_refused(tmp_path):
    proc, _ = check(tmp_path, "--only", "env,bogus")
    assert proc.returncode == 2 and "bogus" in proc.stderr


def test_a_stage_past_its_limit_is_stopped_with_its_whole_process_group(tmp_path):
    log = tmp_path / "slow.log"
    stage = Stage("slow", "sleeps", ("sleep 120 & echo child $!; sleep 120",), 1, 1, needs_cuda=False)
    start = time.monotonic()
    result = run_stage(stage, log, dict(os.environ), timeout_s=1.0)
    assert result.status == "timed out" and "stopped after" in result.reason
    assert time.monotonic() - start < 60
    child = int(next(line.split()[1] for line in log.read_text().splitlines() if line.startswith("child ")))
    deadline = time.monotonic() + 30
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(child), "the stage's background child survived"


def test_a_failing_command_ends_its_stage_and_results_are_collected(tmp_path):
    log = tmp_path / "fail.log"
    stage = Stage("fail", "fails", ("echo '{\"figure\": 1.5}'", "exit 3", "echo never"), 1, 30, needs_cuda=False)
    result = run_stage(stage, log, dict(os.environ), timeout_s=30)
    assert result.status == "failed" and result.reason == "exit 3: exit 3"
    assert result.results == [{"figure": 1.5}]
    assert "never" not in log.read_text().replace("$ echo never", "")


@pytest.mark.parametrize("quick", [False, True])
def test_every_stage_fits_the_default_budget_alone(quick):
    for stage in gpu_check.stages(sys.executable, quick):
        assert stage.estimate_s <= stage.limit_s <= 450


def test_sigterm_stops_the_running_stage_and_still_writes_the_summary(tmp_path, monkeypatch):
    import signal
    import threading

    sleeper = Stage("sleeper", "sleeps", ("sleep 120 & echo child $!; sleep 120",), 1, 200, needs_cuda=False)
    monkeypatch.setattr(gpu_check, "stages", lambda py, quick=False: [sleeper])
    monkeypatch.setattr(gpu_check, "cuda_available", lambda py, env: (False, ""))
    log = tmp_path / "out" / "logs" / "01-sleeper.log"

    def stop_when_running() -> None:  # once the stage's background child has started
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if log.exists() and any(line.startswith("child ") for line in log.read_text().splitlines()):
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    killer = threading.Thread(target=stop_when_running)
    killer.start()
    try:
        with pytest.raises(SystemExit):
            gpu_check.main(["--out", str(tmp_path / "out"), "--wheels", str(tmp_path / "none")])
    finally:
        killer.join()
        signal.signal(signal.SIGTERM, previous)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    (stage,) = [s for s in summary["stages"] if s["name"] == "sleeper"]
    assert (stage["status"], stage["reason"]) == ("timed out", "the check was stopped")
    child = int(next(line.split()[1] for line in log.read_text().splitlines() if line.startswith("child ")))
    deadline = time.monotonic() + 30
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(child), "the stopped stage's child survived"


def test_a_sigterm_while_the_stage_starts_still_stops_its_group(tmp_path, monkeypatch):
    """The signal lands inside Popen, after the fork (as on a busy host, where the test above
    once failed: the check unwound before it knew the process, and the stage's child lived on).
    It takes effect once the process is known, and the group is stopped."""
    import signal
    import subprocess

    started: list[int] = []
    real_popen = subprocess.Popen

    class SignalledDuringStart(real_popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self.pid)
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # bytecodes still inside Popen, where a handler would run
                pass

    sleeper = Stage("sleeper", "sleeps", ("sleep 120 & echo child $!; sleep 120",), 1, 200, needs_cuda=False)
    monkeypatch.setattr(gpu_check, "stages", lambda py, quick=False: [sleeper])
    monkeypatch.setattr(gpu_check, "cuda_available", lambda py, env: (False, ""))
    monkeypatch.setattr(gpu_check.subprocess, "Popen", SignalledDuringStart)
    log = tmp_path / "out" / "logs" / "01-sleeper.log"
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit):
            gpu_check.main(["--out", str(tmp_path / "out"), "--wheels", str(tmp_path / "none")])
        assert len(started) == 1
        deadline = time.monotonic() + 30  # the group was stopped; its child printed, or never ran
        while time.monotonic() < deadline and (running(started[0]) or group_alive(started[0])):
            time.sleep(0.1)
        assert not group_alive(started[0]), "the stage's process group survived the stop"
    finally:
        signal.signal(signal.SIGTERM, previous)
        for pid in started:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    (stage,) = [s for s in summary["stages"] if s["name"] == "sleeper"]
    assert (stage["status"], stage["reason"]) == ("timed out", "the check was stopped")
    assert log.exists()


def group_alive(pgid: int) -> bool:
    """A process of the group that is not a zombie is left."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False
