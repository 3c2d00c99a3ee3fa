"""Helpers for end-to-end tests with a prefill and a decode `LLM` in one test process tree."""

from __future__ import annotations

import math
import time
import uuid

import torch
from connector_actors import held_heads

from kvxfer import LLM, KVTransferConfig
from kvxfer.ports import free_port

BLOCK_SIZE = 8
NUM_BLOCKS = 64


def prefill_llm(model: str, tp: int, lease: float = 30.0, **kw) -> LLM:
    for attempt in range(3):  # a probed free port may be taken by another process before we bind it
        config = KVTransferConfig(role="prefill", side_channel_port=free_port(), lease_seconds=lease)
        try:
            return LLM(model, tensor_parallel_size=tp, block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS,
                       kv_transfer_config=config, **kw)
        except Exception as e:
            if "cannot bind the KV side channel" not in str(e) or attempt == 2:
                raise


def decode_llm(model: str, tp: int, policy: str = "fail", **kw) -> LLM:
    config = KVTransferConfig(role="decode", failure_policy=policy, handshake_timeout_s=2.0, transfer_timeout_s=10.0)
    return LLM(model, tensor_parallel_size=tp, block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS,
               kv_transfer_config=config, **kw)


def run_and_capture(engine, prompts, sp, params, timeout: float = 120.0):
    """Run requests to the end; capture each prompt's KV blocks (per KV cache group, per rank)
    once the whole prompt is computed or received and before anything reuses the blocks (a
    sliding group's entries before the window read as its null block)."""
    ids = [f"t-{uuid.uuid4().hex[:8]}-{i}" for i in range(len(prompts))]
    for rid, prompt, kv in zip(ids, prompts, params):
        engine.add_request(rid, prompt, sp, kv)
    bs = engine.config.block_size
    captured, outputs = {}, {}
    deadline = time.monotonic() + timeout
    while len(outputs) < len(ids):
        assert time.monotonic() < deadline, f"requests not done after {timeout}s: {set(ids) - set(outputs)}"
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        for rid, prompt in zip(ids, prompts):
            request = engine.scheduler.requests.get(rid)
            if rid not in captured and request is not None and request.num_computed_tokens >= len(prompt):
                n = math.ceil(len(prompt) / bs)
                captured[rid] = [
                    engine.collective_rpc("read_kv_blocks", table[:n], g)
                    for g, table in enumerate(request.block_tables)
                ]
        if engine.last_step_num_tokens == 0:
            time.sleep(0.002)
    return [outputs[r] for r in ids], [captured.get(r) for r in ids]


def tokens_kv(rank_blocks: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[blocks, heads, layers, kv, bs, dim] -> [heads, layers, kv, tokens, dim] for the first tokens."""
    b, h, layers, kv, bs, d = rank_blocks.shape
    flat = rank_blocks.permute(1, 2, 3, 0, 4, 5).reshape(h, layers, kv, b * bs, d)
    return flat[:, :, :, :num_tokens]


def drain(llm: LLM, timeout: float = 15.0) -> None:
    """Step an engine until the connector holds no finished request's blocks."""
    deadline = time.monotonic() + timeout
    while llm.engine.stats()["num_pending_free"] or llm.engine.has_unfinished_requests():
        assert time.monotonic() < deadline, f"engine still holds blocks: {llm.engine.stats()}"
        llm.engine.step()
        time.sleep(0.002)


def assert_all_blocks_free(*llms: LLM) -> None:
    for llm in llms:
        stats = llm.engine.stats()
        assert stats["num_free_blocks"] == stats["num_blocks"], stats


def expected_read_bytes(spec, d_tp: int, num_blocks_read: int) -> int:
    """Bytes all decode ranks read for `num_blocks_read` blocks, from the head partition."""
    per_head = spec.num_layers * spec.kv_slots * spec.block_size * spec.head_size * spec.itemsize
    heads = sum(len(held_heads(spec.num_kv_heads, r, d_tp)) for r in range(d_tp))
    return num_blocks_read * heads * per_head


def _child_prefill_main(conn, model: str, tp: int, port: int) -> None:
    from kvxfer import SamplingParams

    llm = prefill_llm(model, tp)
    conn.send(llm.engine.worker_pids())
    while True:
        prompts = conn.recv()
        if prompts is None:
            break
        outs = llm.generate(prompts, SamplingParams(max_tokens=1), kv_transfer_params={"do_remote_decode": True})
        conn.send([o.kv_transfer_params for o in outs])
    llm.shutdown()


class ChildPrefill:
    """A prefill engine in its own process tree, so that a test can kill it outright."""

    def __init__(self, model: str, tp: int) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child_prefill_main, args=(child, model, tp, free_port()), daemon=False)
        self.proc.start()
        if not self.conn.poll(180):
            self.kill()
            raise TimeoutError("the prefill engine process did not start")
        self.worker_pids = self.conn.recv()

    def generate_params(self, prompts) -> list[dict]:
        self.conn.send(prompts)
        if not self.conn.poll(60):
            raise TimeoutError("the prefill engine process did not answer")
        return self.conn.recv()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(10)

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(30)
        if self.proc.is_alive():
            self.kill()
