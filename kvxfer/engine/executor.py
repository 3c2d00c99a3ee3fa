"""TP rank processes and their control channel.

Rank 0 runs in the engine process (so the sampled tokens never cross a process boundary);
ranks 1..N-1 are spawned processes, each driven over a multiprocessing pipe carrying
method names and small arguments (token ids, block ids, connector metadata). Tensors move
only between ranks, over torch.distributed. If this process already belongs to a
torch.distributed group (another TP engine lives here), rank 0 is spawned too, so that
several TP engines can share one process.

A spawned rank exits on the shutdown message, on EOF of its pipe, and when the engine
process dies (PR_SET_PDEATHSIG where available, and a parent-pid watchdog).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

from kvxfer.engine.config import EngineConfig


class WorkerError(RuntimeError):
    """A method raised on a rank; the rank is still alive."""


class EngineDeadError(RuntimeError):
    """A rank died or stopped answering; the engine cannot continue."""


class _LocalRank:
    def __init__(self, config: EngineConfig, tp_size: int) -> None:
        from kvxfer.engine.worker import Worker

        self.rank = 0
        self.worker = Worker(config, 0, tp_size)
        self._call: tuple[str, tuple] | None = None

    def send(self, method: str, args: tuple) -> None:
        self._call = (method, args)

    def recv(self, timeout: float) -> Any:
        method, args = self._call
        self._call = None
        try:
            return getattr(self.worker, method)(*args)
        except Exception as e:
            raise WorkerError(f"rank 0: {type(e).__name__}: {e}") from e

    def stop(self, timeout: float) -> None:
        self.worker.shutdown()


class _ProcessRank:
    def __init__(self, ctx, config: EngineConfig, rank: int, tp_size: int) -> None:
        self.rank = rank
        self.conn, child_conn = ctx.Pipe()
        # PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so only
        # use it when the engine is created on the main thread.
        pdeathsig = threading.current_thread() is threading.main_thread()
        self.process = ctx.Process(
            target=_worker_main,
            args=(config, rank, tp_size, child_conn, os.getpid(), pdeathsig),
            name=f"kvxfer-tp{rank}",
            daemon=True,
        )
        self.process.start()
        child_conn.close()

    def send(self, method: str, args: tuple) -> None:
        try:
            self.conn.send((method, args))
        except (BrokenPipeError, OSError) as e:
            raise EngineDeadError(f"TP rank {self.rank} is gone ({self._exit_text()})") from e

    def recv(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.05):
            if not self.process.is_alive():
                raise EngineDeadError(f"TP rank {self.rank} died ({self._exit_text()})")
            if time.monotonic() > deadline:
                raise EngineDeadError(f"TP rank {self.rank} did not answer within {timeout:.0f}s")
        try:
            status, value = self.conn.recv()
        except (EOFError, OSError) as e:
            raise EngineDeadError(f"TP rank {self.rank} closed its pipe ({self._exit_text()})") from e
        if status == "err":
            raise WorkerError(f"rank {self.rank}: {value}")
        return value

    def stop(self, timeout: float) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(("shutdown", ()))
            except OSError:
                pass
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2.0)
        self.conn.close()

    def _exit_text(self) -> str:
        code = self.process.exitcode
        return "still running" if code is None else f"exit code {code}"


class Executor:
    """Starts the ranks, loads the model on each, agrees on the KV pool, and runs methods on all ranks."""

    def __init__(self, config: EngineConfig) -> None:
        import torch.distributed as dist

        self.config = config
        self.timeout = config.worker_timeout_s
        tp = config.tensor_parallel_size
        rank0_local = tp == 1 or not dist.is_initialized()
        ctx = mp.get_context("spawn")
        self.ranks: list[_LocalRank | _ProcessRank] = []
        try:
            if rank0_local:
                self.ranks.append(_LocalRank(config, tp))
            for rank in range(len(self.ranks), tp):
                self.ranks.append(_ProcessRank(ctx, config, rank, tp))
            # Load first, then join the group: a rank failing to load is reported as such
            # instead of leaving the others waiting in a rendezvous.
            self.proposed_num_blocks = self.collective_rpc("load_model")
            self.num_blocks = self.collective_rpc("init_kv_cache", _free_port())[0]
        except BaseException:
            self.shutdown()
            raise

    def collective_rpc(self, method: str, *args: Any, timeout: float | None = None) -> list:
        """Call `method(*args)` on every rank's worker; results in rank order."""
        for rank in self.ranks:
            rank.send(method, args)
        results, error = [], None
        for rank in self.ranks:
            try:
                results.append(rank.recv(timeout or self.timeout))
            except (WorkerError, EngineDeadError) as e:
                # Keep draining the other ranks so the pipes stay in step.
                if error is None or isinstance(e, EngineDeadError):
                    error = e
                results.append(None)
        if error is not None:
            raise error
        return results

    def shutdown(self) -> None:
        ranks, self.ranks = self.ranks, []
        for rank in reversed(ranks):  # spawned ranks first; rank 0 then leaves the group last
            try:
                rank.stop(timeout=5.0)
            except Exception:
                pass

    def worker_pids(self) -> list[int]:
        return [r.process.pid for r in self.ranks if isinstance(r, _ProcessRank)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_pdeathsig() -> None:
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_main(config: EngineConfig, rank: int, tp_size: int, conn, parent_pid: int, pdeathsig: bool) -> None:
    if pdeathsig:
        _set_pdeathsig()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="parent-watch").start()
    import torch

    # Ranks share the host's cores; oversubscribed intra-op threads only slow every rank down.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp_size))
    from kvxfer.engine.worker import Worker

    worker = Worker(config, rank, tp_size)
    try:
        while True:
            try:
                method, args = conn.recv()
            except (EOFError, OSError):
                break
            if method == "shutdown":
                break
            try:
                reply = ("ok", getattr(worker, method)(*args))
            except Exception as e:
                reply = ("err", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}")
            conn.send(reply)
    finally:
        worker.shutdown()
        conn.close()
