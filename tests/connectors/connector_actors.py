"""Rank processes for worker-level connector tests: each hosts NIXL connector workers.

A test drives an `Actor` (a spawned process) by commands run on its `RankHost`; one process
may host ranks of several engines (one worker, agent and pool each), so a handful of
processes serve every (prefill TP, decode TP) pair. A prefill engine's scheduler side (its
hold table and side channel) runs in the test process, as it runs in the engine process.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback

import numpy as np


class RankHost:
    def __init__(self) -> None:
        self.workers = {}  # key -> (worker, kv tensor)

    def add_worker(self, key, config, spec, rank: int, tp: int, num_blocks: int, identity: str = "test-model",
                   device: str = "cpu"):
        import torch

        from kvxfer.connectors.nixl_worker import NixlConnectorWorker

        if key in self.workers:
            return
        # The pool first: on CUDA this creates the context, which UCX must find when the
        # agent starts (it picks its CUDA transports then).
        kv = torch.zeros((num_blocks, *spec.block_shape(tp)), dtype=getattr(torch, spec.dtype), device=device)
        _sync(kv)
        worker = NixlConnectorWorker(config, spec, rank, tp, model_identity=identity)
        try:
            worker.register_kv_caches([kv])
        except BaseException:
            worker.shutdown()
            raise
        self.workers[key] = (worker, kv)

    def _bytes(self, key):
        import torch

        kv = self.workers[key][1]
        return kv.view(-1).view(torch.uint8).view(kv.shape[0], kv.shape[1], -1)

    def fill(self, key, block_ids: list[int], data: np.ndarray) -> None:
        import torch

        pool = self._bytes(key)
        pool.fill_(0xAB)  # blocks outside the request hold junk a wrong read would copy
        pool[block_ids] = torch.from_numpy(data).to(pool.device)
        _sync(pool)  # another process READs these bytes as soon as this returns

    def clear(self, key) -> None:
        _sync(self._bytes(key).zero_())

    def dump(self, key) -> np.ndarray:
        return self._bytes(key).cpu().numpy()

    def apply(self, key, meta) -> None:
        """Hand the scheduler side's metadata (holds, releases, expiries) to this rank."""
        self.workers[key][0].start_load_kv(meta)

    def notify(self, key, peer_engine_id: str, remote_rank: int, done) -> None:
        """Send a raw `ReadDone` to a prefill rank this rank knows (a forged or stale one in tests)."""
        import msgspec

        worker = self.workers[key][0]
        worker.agent.send_notif(worker.peers[peer_engine_id].agents[remote_rank], msgspec.msgpack.encode(done))

    def load(self, key, requests) -> None:
        from kvxfer.connectors.base import ConnectorMetadata

        self.workers[key][0].start_load_kv(ConnectorMetadata(recv=list(requests)))

    def poll(self, key, timeout: float, recv_ids=(), send_ids=()):
        """Accumulate outputs until every id is reported (or `timeout`); returns plain dicts."""
        worker = self.workers[key][0]
        acc = {"finished_recving": set(), "failed_recving": {}, "failure_kinds": {}, "finished_sending": set(),
               "expired_sending": set(), "released_sending": set(), "recv_stats": {}}
        deadline = time.monotonic() + timeout
        while True:
            out = worker.get_finished()
            acc["finished_recving"] |= out.finished_recving
            acc["failed_recving"].update(out.failed_recving)
            acc["failure_kinds"].update(out.failure_kinds)
            acc["finished_sending"] |= out.finished_sending
            acc["expired_sending"] |= out.expired_sending
            acc["released_sending"] |= out.released_sending
            acc["recv_stats"].update({k: v.as_dict() for k, v in out.recv_stats.items()})
            recv_done = all(r in acc["finished_recving"] or r in acc["failed_recving"] for r in recv_ids)
            if (recv_done and all(s in acc["finished_sending"] for s in send_ids)) or time.monotonic() > deadline:
                acc["elapsed"] = timeout - (deadline - time.monotonic())
                return acc
            time.sleep(0.0005)

    def counters(self, key) -> dict:
        return dict(self.workers[key][0].counters)

    def peers(self, key) -> dict:
        """engine id -> (host, port) of the peers this rank knows."""
        return {engine_id: peer.address for engine_id, peer in self.workers[key][0].peers.items()}

    def has_pending(self, key) -> bool:
        return self.workers[key][0].has_pending()

    def drop(self, key) -> None:
        if key in self.workers:
            self.workers.pop(key)[0].shutdown()

    def shutdown(self) -> None:
        for key in list(self.workers):
            self.drop(key)


def _sync(tensor) -> None:
    """Wait for the kernels writing `tensor` (CUDA runs them asynchronously; NIXL does not wait)."""
    if tensor.is_cuda:
        import torch

        torch.cuda.synchronize(tensor.device)


def _serve(conn) -> None:
    host = RankHost()
    try:
        while True:
            cmd, args = conn.recv()
            if cmd == "stop":
                break
            try:
                conn.send(("ok", getattr(host, cmd)(*args)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        host.shutdown()


# A bound on a hang, not a speed expectation: the first call waits for the spawned process to
# import torch and NIXL, which takes a minute and more on a host busy with other test processes.
ANSWER_TIMEOUT_S = 180


class Actor:
    def __init__(self, name: str) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), name=name, daemon=True)
        self.proc.start()
        self.broken: str | None = None

    def submit(self, cmd: str, *args) -> None:
        if self.broken:
            raise RuntimeError(self.broken)
        self.conn.send((cmd, args))

    def result(self, timeout: float = ANSWER_TIMEOUT_S):
        if self.broken:
            raise RuntimeError(self.broken)
        if not self.conn.poll(timeout):
            # Its late answer would be read as the next call's: this actor is done for.
            self.broken = f"{self.proc.name}: an earlier call got no answer in {timeout}s"
            raise TimeoutError(f"{self.proc.name}: no answer in {timeout}s")
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"{self.proc.name}: {value}")
        return value

    def call(self, cmd: str, *args, timeout: float = ANSWER_TIMEOUT_S):
        self.submit(cmd, *args)
        return self.result(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(10)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("stop", ()))
            except OSError:
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.kill()


def held_heads(num_heads: int, rank: int, tp: int) -> list[int]:
    """Global KV heads in a rank's tensor, from the design: split, or one replicated head when tp > H."""
    if tp <= num_heads:
        per = num_heads // tp
        return list(range(rank * per, rank * per + per))
    return [rank * num_heads // tp]
