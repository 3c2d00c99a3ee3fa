"""Decode CUDA graphs' static-buffer path (engine/cuda_graphs.py), run without capture on CPU:
padded batches over static buffers give the eager path's hidden states, tokens and log-probs,
and their padding rows write nothing to the KV cache, for batch sizes on and between buckets."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import BLOCK_SIZE, prompts_of

from kvxfer.engine import EngineConfig
from kvxfer.engine.cuda_graphs import DecodeGraphs, batch_buckets, context_buckets
from kvxfer.engine.model_runner import ModelRunner
from kvxfer.engine.step import StepInput, layer_views
from kvxfer.engine.sampler import Sampler, SamplingInfo
from kvxfer.engine.worker import Worker
from kvxfer.layers.attention import AttentionMetadata

MAX_SEQS = 10  # buckets 1, 2, 4, 8, 10
NUM_BLOCKS = 64
LENGTHS = (3, 16, 17, 30, 5, 32, 9, 1, 40, 15)  # block boundaries, just past them, and between


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(10) == [1, 2, 4, 8, 10]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert context_buckets(512) == [512]
    assert context_buckets(1024) == [1024]
    assert context_buckets(40960) == [1024, 4096, 16384, 40960]


@pytest.fixture(scope="module", params=["tiny-qwen3", "tiny-deepseek-mla", "tiny-gemma3"])
def prefilled(request, model_dir):
    """A CPU worker's model and caches (one per KV cache group, tiny-gemma3 has two) holding
    MAX_SEQS prefilled sequences, at the same block ids in every group."""
    config = EngineConfig(model_dir(request.param), block_size=BLOCK_SIZE)
    worker = Worker(config, 0, 1)
    worker.load_model()
    cache = [torch.zeros((NUM_BLOCKS, *g.spec.block_shape(1)), dtype=worker.dtype) for g in worker.groups]
    prompts = prompts_of(LENGTHS, offset=7)
    tables, next_block = [], 1  # block 0 stays unused, like a pool's never-allocated block
    for n in LENGTHS:
        blocks = -(-(n + 1) // BLOCK_SIZE)  # room for the decoded token
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    groups = len(worker.groups)
    step = StepInput([t for p in prompts for t in p], [i for n in LENGTHS for i in range(n)], list(LENGTHS),
                     list(LENGTHS), [[t[: -(-n // BLOCK_SIZE)] for t, n in zip(tables, LENGTHS)]] * groups, [], [], [])
    ModelRunner(worker.model, worker.groups, cache, BLOCK_SIZE, None).run(step)
    return worker, cache, tables


def clone(caches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [c.clone() for c in caches]


def decode_step(batch: int, tables: list[list[int]], logprobs: int | None = 3, groups: int = 1) -> StepInput:
    lens = [n + 1 for n in LENGTHS[:batch]]
    infos = [SamplingInfo(f"r{i}", 0.0, 1.0, None, logprobs) for i in range(batch)]
    return StepInput([11 + i for i in range(batch)], [n - 1 for n in lens], [1] * batch, lens,
                     [[t[: -(-n // BLOCK_SIZE)] for t, n in zip(tables, lens)]] * groups, list(range(batch)), infos, [])


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 8, 9, 10])
def test_static_buffers_match_the_eager_path(prefilled, batch):
    worker, cache, tables = prefilled
    step = decode_step(batch, tables, groups=len(cache))
    eager_cache, static_cache = clone(cache), clone(cache)
    with torch.inference_mode():
        attn = AttentionMetadata.build(step.query_lens, step.seq_lens, step.block_tables[0], BLOCK_SIZE, "cpu")
        views, group_of = layer_views(worker.groups, eager_cache)
        eager = worker.model(torch.tensor(step.input_ids), torch.tensor(step.positions), views, [attn] * len(views))
    graphs = DecodeGraphs(worker.model, worker.groups, static_cache, BLOCK_SIZE, MAX_SEQS, NUM_BLOCKS * BLOCK_SIZE,
                          capture=False)
    assert graphs.can_run(step)
    static = graphs.run(step)
    assert static.shape == eager.shape
    torch.testing.assert_close(static, eager, atol=1e-4, rtol=1e-4)
    # Same KV written for the real tokens, nothing anywhere else (padding rows have no slot).
    for before, eager_g, static_g in zip(cache, eager_cache, static_cache):
        torch.testing.assert_close(static_g, eager_g, atol=1e-5, rtol=1e-5)
        changed = (eager_g != before).flatten(1).any(1).nonzero().flatten().tolist()
        assert set(changed) <= {b for t in step.block_tables[0] for b in t}


def test_runner_hook_samples_what_the_eager_runner_samples(prefilled):
    worker, cache, tables = prefilled
    eager = ModelRunner(worker.model, worker.groups, clone(cache), BLOCK_SIZE, Sampler(worker.device, 0))
    hooked_cache = clone(cache)
    hooked = ModelRunner(worker.model, worker.groups, hooked_cache, BLOCK_SIZE, Sampler(worker.device, 0))
    hooked.decode_graphs = DecodeGraphs(worker.model, worker.groups, hooked_cache, BLOCK_SIZE, MAX_SEQS,
                                        NUM_BLOCKS * BLOCK_SIZE, capture=False)
    # One set of static buffers through shrinking and growing batches: rows a larger batch
    # left behind must not leak into a smaller one.
    for batch in (7, 3, 10, 1, 5):
        step = decode_step(batch, tables, groups=len(cache))
        expected = eager.run(step)
        got = hooked.run(step)
        assert [t for t, _ in got] == [t for t, _ in expected]
        for (_, a), (_, b) in zip(got, expected):
            assert a.keys() == b.keys()
            assert all(abs(a[k] - b[k]) < 1e-4 for k in a)
    for hooked_g, eager_g in zip(hooked_cache, eager.kv_caches):
        torch.testing.assert_close(hooked_g, eager_g, atol=1e-5, rtol=1e-5)


def test_steps_the_graphs_cannot_hold_take_the_eager_path(prefilled):
    worker, cache, tables = prefilled
    graphs = DecodeGraphs(worker.model, worker.groups, clone(cache), BLOCK_SIZE, 4, 2 * BLOCK_SIZE, capture=False)
    assert graphs.can_run(decode_step(4, [[1, 2]] * 4))
    assert not graphs.can_run(decode_step(5, [[1, 2]] * 5))  # more sequences than the largest bucket
    wide = StepInput([1], [39], [1], [40], [[[1, 2, 3]]], [0], [SamplingInfo("w", 0.0, 1.0, None, None)], [])
    assert not graphs.can_run(wide)  # wider than the padded block tables
    prefill = StepInput([1, 2], [0, 1], [2], [2], [[[1]]], [0], [SamplingInfo("p", 0.0, 1.0, None, None)], [])
    assert not graphs.can_run(prefill)
    with pytest.raises(ValueError, match="CUDA device"):
        DecodeGraphs(worker.model, worker.groups, cache, BLOCK_SIZE, 4, 64, capture=True)


@pytest.mark.cuda
@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-deepseek-mla", "tiny-gemma3"])
def test_cuda_graphs_greedy_matches_eager_and_hf(model_dir, hf_reference, preset):
    """Captured graphs replayed for batches of 1..4 sequences give the eager engine's tokens and
    log-probs, which match HF (float32 on the GPU)."""
    from kvxfer import LLM, SamplingParams

    prompts = prompts_of((3, 16, 37, 70), offset=3)
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=True)
    results = {}
    for eager in (True, False):
        with LLM(model_dir(preset), device="cuda", dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=128,
                 max_num_seqs=4, enforce_eager=eager) as llm:
            assert (llm.engine.collective_rpc("decode_graph_count")[0] > 0) != eager
            results[eager] = [llm.generate(prompts[:n], params) for n in (1, 3, 4)]
    ref = hf_reference(preset)
    for graph_outs, eager_outs in zip(results[False], results[True]):
        for prompt, g, e in zip(prompts, graph_outs, eager_outs):
            assert g.output_token_ids == e.output_token_ids == ref.greedy(prompt, 12)[0]
            for lg, le in zip(g.logprobs, e.logprobs):
                assert all(abs(lg[t] - le[t]) < 1e-3 for t in le)
