"""integration/run_accuracy_test.sh's GPU assignment, checked on any host through its DRY_RUN
mode: every instance gets `--device-ids` (all GPUs stay visible, never a per-instance
CUDA_VISIBLE_DEVICES), TP ranks of one instance get distinct GPUs, and GPU_SHARING=1 puts
prefill, decode and reference on one GPU with a memory share each."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "integration" / "run_accuracy_test.sh"


def dry_run(**env: str) -> tuple[int, dict[str, list[str]]]:
    """(exit status, server name -> its command's arguments)."""
    base = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "GPU_MEMORY_UTILIZATION")}
    proc = subprocess.run(["bash", str(SCRIPT)], env=base | {"DRY_RUN": "1", "DEVICE": "cuda"} | env,
                          capture_output=True, text=True, timeout=120)
    commands = {}
    for line in proc.stdout.splitlines():
        if m := re.match(r"(\w+): (.*)$", line):
            commands[m.group(1)] = m.group(2).split()
    return proc.returncode, commands if proc.returncode == 0 else {"stderr": [proc.stderr]}


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_one_gpu_shared_by_prefill_decode_and_reference():
    rc, cmds = dry_run(NUM_GPUS="1", GPU_SHARING="1")
    assert rc == 0, cmds
    assert sorted(cmds) == ["decode0", "prefill0", "reference"]
    for args in cmds.values():
        assert option(args, "--device-ids") == "0"
        assert option(args, "--device") == "cuda"
    shares = {float(option(args, "--gpu-memory-utilization")) for args in cmds.values()}
    assert len(shares) == 1 and 3 * shares.pop() <= 0.9  # three engines fit on the one GPU


def test_each_instance_gets_its_own_gpus_when_there_are_enough():
    rc, cmds = dry_run(NUM_GPUS="4", PREFILL_TP="2", NUM_DECODE="1")
    assert rc == 0, cmds
    ids = {name: option(args, "--device-ids") for name, args in cmds.items()}
    assert ids == {"prefill0": "0,1", "decode0": "2", "reference": "3"}
    assert all(option(args, "--gpu-memory-utilization") == "0.85" for args in cmds.values())


def test_sharing_keeps_ranks_of_one_instance_on_distinct_gpus():
    rc, cmds = dry_run(NUM_GPUS="2", PREFILL_TP="2", DECODE_TP="2", GPU_SHARING="1")
    assert rc == 0, cmds
    for args in cmds.values():
        ids = option(args, "--device-ids").split(",")
        assert len(set(ids)) == len(ids) == int(option(args, "--tp"))


@pytest.mark.parametrize(
    "env,message",
    [
        (dict(NUM_GPUS="1"), "need 3 GPUs.*GPU_SHARING=1"),
        (dict(NUM_GPUS="1", PREFILL_TP="2", GPU_SHARING="1"), "need 4 GPUs"),
        (dict(NUM_GPUS="0"), "no GPU is visible"),
        (dict(NUM_GPUS="x"), "NUM_GPUS must be"),
        (dict(DRY_RUN="yes"), "DRY_RUN must be"),
    ],
)
def test_bad_gpu_settings_are_refused(env, message):
    rc, out = dry_run(**env)
    assert rc != 0
    assert re.search(message, out["stderr"][0]), out


def test_cpu_runs_get_no_gpu_options():
    rc, cmds = dry_run(DEVICE="cpu")
    assert rc == 0, cmds
    assert all("--device-ids" not in args and "--gpu-memory-utilization" not in args for args in cmds.values())
