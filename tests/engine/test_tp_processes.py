"""TP rank processes: pool sizing agreed by all-reduce MIN, clean exits, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from engine_helpers import BLOCK_SIZE, prompts_of

from kvxfer import LLM, SamplingParams
from kvxfer.engine.executor import EngineDeadError, WorkerError

PRESET = "tiny-qwen3"


def pid_exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")  # zombie: exited, not yet reaped
    except FileNotFoundError:
        return True


def wait_exited(pids, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(pid_exited(p) for p in pids):
            return True
        time.sleep(0.1)
    return all(pid_exited(p) for p in pids)


def test_pool_size_is_the_min_over_ranks_and_workers_exit_on_shutdown(model_dir):
    from kvxfer.models import load_model_config

    spec = load_model_config(model_dir(PRESET)).kv_cache_spec(BLOCK_SIZE, "float32")
    per_block = spec.bytes_per_block(2)
    budgets = [40 * per_block + 123, 25 * per_block]
    llm = LLM(model_dir(PRESET), tensor_parallel_size=2, block_size=BLOCK_SIZE, kv_cache_memory_bytes=budgets)
    pids = llm.engine.worker_pids()
    try:
        assert len(pids) == 1 and not pid_exited(pids[0])
        info = llm.engine.collective_rpc("kv_pool_info")
        assert [i["rank"] for i in info] == [0, 1]
        assert [i["proposed_num_blocks"] for i in info] == [40, 25]
        assert [i["num_blocks"] for i in info] == [25, 25]
        assert llm.engine.stats()["num_blocks"] == 25
        shapes = [t.shape for t in llm.engine.collective_rpc("read_kv_blocks", [0, 24])]
        assert shapes == [(2, *spec.block_shape(2))] * 2
        # The agreed pool works: more tokens than fit at once, served by preemption.
        prompts = prompts_of((30, 30, 30), offset=21)
        params = SamplingParams(max_tokens=100, ignore_eos=True)
        outs = llm.generate(prompts, params)
        assert all(len(o.output_token_ids) == 100 for o in outs)
        # A second TP engine in this process (which already holds a process group) spawns all
        # of its ranks, and computes the same.
        with LLM(model_dir(PRESET), tensor_parallel_size=2, block_size=BLOCK_SIZE, num_kv_blocks=64) as other:
            other_pids = other.engine.worker_pids()
            assert len(other_pids) == 2
            assert [o.output_token_ids for o in other.generate(prompts, params)] == [o.output_token_ids for o in outs]
        assert wait_exited(other_pids, 30.0)
    finally:
        llm.shutdown()
    assert wait_exited(pids, 30.0), "TP worker still running after shutdown"


def test_workers_exit_when_the_engine_process_is_killed(model_dir):
    script = textwrap.dedent(
        f"""
        import sys, time
        from kvxfer import LLM
        llm = LLM({model_dir(PRESET)!r}, tensor_parallel_size=2, num_kv_blocks=16)
        print(" ".join(map(str, llm.engine.worker_pids())), flush=True)
        time.sleep(120)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 1 and not pid_exited(pids[0])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert wait_exited(pids, 30.0), f"orphan TP worker(s) {pids} after the engine was killed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_workers_of_an_engine_built_on_a_thread_survive_the_thread(model_dir):
    # PR_SET_PDEATHSIG would fire when the creating thread ends; servers build engines on threads.
    box = {}
    t = threading.Thread(target=lambda: box.update(llm=LLM(model_dir(PRESET), tensor_parallel_size=2, num_kv_blocks=16)))
    t.start()
    t.join(120)
    llm = box["llm"]
    try:
        pids = llm.engine.worker_pids()
        time.sleep(1.0)
        assert not any(pid_exited(p) for p in pids)
        (out,) = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True))
        assert len(out.output_token_ids) == 2
        # A failing call is reported and leaves the ranks in step.
        with pytest.raises(WorkerError, match="no_such_method"):
            llm.engine.collective_rpc("no_such_method")
        assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True))[0].output_token_ids == (
            out.output_token_ids
        )
        # A dead rank is reported at once, not waited for.
        os.kill(pids[0], signal.SIGKILL)
        assert wait_exited(pids, 30.0)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="rank 1"):
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
        assert time.monotonic() - start < 30  # at once, not after a collective's time-out
        # Dead for good: every later call says why at once.
        assert "rank 1" in llm.engine.dead
        with pytest.raises(EngineDeadError, match="rank 1"):
            llm.engine.step()
        with pytest.raises(EngineDeadError, match="rank 1"):
            llm.engine.add_request("late", [5, 6, 7])
    finally:
        llm.shutdown()
    assert wait_exited(pids, 30.0)
