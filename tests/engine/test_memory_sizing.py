"""KV pool sizing: the CUDA budget math (fraction of TOTAL memory, so engines sharing a GPU size
the same pools in any start order), the profiling step, and the CUDA-option validation."""

from __future__ import annotations

import argparse

import pytest
import torch
from engine_helpers import BLOCK_SIZE

from kvxfer.engine import EngineConfig
from kvxfer.engine.memory import CudaMemoryPlan, cpu_kv_budget_bytes
from kvxfer.engine.model_runner import ModelRunner
from kvxfer.engine.sampler import Sampler
from kvxfer.engine.worker import Worker, profile_step

GIB = 1 << 30


def test_budget_is_a_share_of_total_memory_minus_weights_and_activations():
    plan = CudaMemoryPlan(total_bytes=80 * GIB, fraction=0.4, weights_bytes=2 * GIB, activation_bytes=GIB // 2)
    assert plan.kv_bytes == 32 * GIB - 2 * GIB - GIB // 2
    # Free memory is not an input: a second engine computes the same budget whatever the
    # first holds, so two engines at 0.4 each fit in either order (0.8 of the device in all).
    second = CudaMemoryPlan(80 * GIB, 0.4, 2 * GIB, GIB // 2)
    assert second.kv_bytes == plan.kv_bytes
    assert 2 * (plan.kv_bytes + 2 * GIB + GIB // 2) <= 0.8 * 80 * GIB


def test_budget_not_positive_is_reported_with_its_numbers():
    plan = CudaMemoryPlan(total_bytes=16 * GIB, fraction=0.1, weights_bytes=int(1.5 * GIB), activation_bytes=GIB)
    assert plan.kv_bytes < 0
    text = plan.describe()
    for number in ("0.1", "16.00 GiB", "1.50 GiB", "1.00 GiB", "KV pool -0.90 GiB"):
        assert number in text


def test_cpu_budget_is_a_capped_share_split_over_ranks():
    assert cpu_kv_budget_bytes(10 * GIB, 0.2, 1 * GIB, 2) == GIB // 2
    assert cpu_kv_budget_bytes(2 * GIB, 0.2, 1 * GIB, 2) == int(2 * GIB * 0.2) // 2


@pytest.mark.parametrize("max_tokens,max_seqs", [(40, 128), (100, 7), (33, 33), (5, 1)])
def test_profile_step_covers_the_longest_batch(max_tokens, max_seqs):
    step, blocks = profile_step(max_tokens, max_seqs, BLOCK_SIZE)
    seqs = min(max_tokens, max_seqs)
    assert len(step.input_ids) == len(step.positions) == sum(step.query_lens) == max_tokens
    assert len(step.query_lens) == len(step.sample_rows) == len(step.sampling) == seqs
    assert max(step.query_lens) - min(step.query_lens) <= 1
    used = [b for table in step.block_tables[0] for b in table]
    assert sorted(used) == list(range(blocks))  # each sequence has its own blocks
    for n, table in zip(step.query_lens, step.block_tables[0]):
        assert len(table) == -(-n // BLOCK_SIZE)


def test_profile_step_runs_through_the_model_runner(model_dir):
    """The step is a valid batch for the real runner (here on CPU): one sampled token per row."""
    config = EngineConfig(model_dir("tiny-qwen3"), block_size=BLOCK_SIZE, max_num_batched_tokens=60, max_num_seqs=8)
    worker = Worker(config, 0, 1)
    worker.load_model()
    step, blocks = profile_step(config.max_num_batched_tokens, config.max_num_seqs, BLOCK_SIZE)
    cache = torch.zeros((blocks, *worker.spec.block_shape(1)), dtype=worker.dtype)
    sampled = ModelRunner(worker.model, worker.groups, [cache], BLOCK_SIZE, Sampler(worker.device, 0)).run(step)
    assert len(sampled) == 8
    assert all(len(logprobs) >= 20 for _, logprobs in sampled)
    assert cache.abs().sum() > 0  # the step wrote its keys and values


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(device="cuda", gpu_memory_utilization=0.0), "gpu_memory_utilization"),
        (dict(device="cuda", gpu_memory_utilization=1.5), "gpu_memory_utilization"),
        (dict(gpu_memory_utilization=0.5), "gpu_memory_utilization"),
        (dict(device="cuda", kv_cache_memory_fraction=0.5), "kv_cache_memory_fraction"),
        (dict(device="cuda", tensor_parallel_size=2, device_ids=(0,)), "device_ids"),
        (dict(device="cuda", tensor_parallel_size=2, device_ids=(1, 1)), "device_ids"),
        (dict(device="cuda", device_ids=(-1,)), "device_ids"),
        (dict(device_ids=(0,)), "device_ids"),
        (dict(enforce_eager=False), "enforce_eager"),
    ],
)
def test_cuda_options_are_validated(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig("unused", **kwargs)


def test_device_ids_choose_each_rank_gpu():
    config = EngineConfig("unused", device="cuda", tensor_parallel_size=2, device_ids=[3, 1])
    assert config.device_ids == (3, 1)
    assert [config.cuda_device_index(r) for r in range(2)] == [3, 1]
    config.check_cuda_devices(4)
    with pytest.raises(ValueError, match=r"device_ids \[3, 1\].*2 visible"):
        config.check_cuda_devices(2)
    default = EngineConfig("unused", device="cuda", tensor_parallel_size=2)
    assert [default.cuda_device_index(r) for r in range(2)] == [0, 1]
    with pytest.raises(ValueError, match="1 visible"):
        default.check_cuda_devices(1)


def test_serve_flags_reach_the_engine_config():
    from kvxfer.entrypoints import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["m", "--device", "cuda", "--tp", "2", "--device-ids", "2,0",
                              "--gpu-memory-utilization", "0.4", "--cuda-graphs", "--kv-connector", "none"])
    config = serve.engine_config(args)
    assert (config.device_ids, config.gpu_memory_utilization, config.enforce_eager) == ((2, 0), 0.4, False)
    assert serve.engine_config(parser.parse_args(["m", "--kv-connector", "none"])).enforce_eager is True
    with pytest.raises(SystemExit, match="device_ids"):
        serve.engine_config(parser.parse_args(["m", "--device-ids", "0", "--kv-connector", "none"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--device-ids", "0,x"])
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--cuda-graphs", "--enforce-eager"])


@pytest.mark.cuda
def test_two_engines_at_0_4_share_one_gpu_started_at_once(model_dir):
    """Two engine processes, each allowed 0.4 of the GPU, start together and size equal pools
    (the budget is a share of total memory, not of what the other left free)."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, sys, torch\n"
        "from kvxfer import LLM\n"
        "with LLM(sys.argv[1], device='cuda', gpu_memory_utilization=0.4, max_num_batched_tokens=2048) as llm:\n"
        "    info = llm.engine.collective_rpc('kv_pool_info')[0]\n"
        "    print(json.dumps({'blocks': info['num_blocks'], 'total': torch.cuda.mem_get_info()[1]}))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, model_dir("tiny-qwen3")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=os.environ.copy()) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    from kvxfer.models import load_model_config

    per_block = load_model_config(model_dir("tiny-qwen3")).kv_cache_spec(BLOCK_SIZE, "bfloat16").bytes_per_block(1)
    blocks = [r["blocks"] for r in results]
    assert abs(blocks[0] - blocks[1]) <= blocks[0] // 100  # same plan, up to measurement noise
    total = results[0]["total"]
    assert 0.3 * total < blocks[0] * per_block <= 0.4 * total  # a tiny model: nearly all of it is KV
