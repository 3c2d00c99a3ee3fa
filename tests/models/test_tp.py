"""TP ranks as real processes over gloo produce the same logits as one process."""

import time

import pytest
import torch
import torch.multiprocessing as mp

from kvxfer.ports import free_port

from .harness import scenario_logits, tp_worker

TIMEOUT_S = 240
JOBS = {
    2: ["tiny-qwen3", "tiny-llama-gqa2", "tiny-deepseek-mla", "tiny-deepseek-v3"],
    # tiny-llama-gqa2 has 2 KV heads: at TP 4 each is replicated on two ranks.
    4: ["tiny-llama-gqa2", "tiny-deepseek-mla"],
}


def run_ranks(tp_size: int, jobs: list[tuple[str, str]], out_dir: str) -> None:
    ctx = mp.start_processes(
        tp_worker, args=(tp_size, free_port(), jobs, out_dir), nprocs=tp_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"TP {tp_size} ranks did not finish in {TIMEOUT_S}s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=10)


@pytest.mark.parametrize("tp_size", sorted(JOBS))
def test_tp_ranks_match_single_process(tp_size, preset_dir, tmp_path):
    names = JOBS[tp_size]
    run_ranks(tp_size, [(name, preset_dir(name)) for name in names], str(tmp_path))
    for name in names:
        expected = scenario_logits(preset_dir(name))
        got = torch.load(tmp_path / f"{name}.pt")
        assert [(s, p) for s, p, _ in got] == [(s, p) for s, p, _ in expected]
        worst = max((a - b).abs().max().item() for (_, _, a), (_, _, b) in zip(got, expected))
        assert worst < 1e-4, f"{name} at TP {tp_size}: max |logit diff| {worst}"
