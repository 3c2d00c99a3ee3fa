"""TP rank processes and their control channel.

Rank 0 runs in the engine process (so the sampled tokens never cross a process boundary);
ranks 1..N-1 are separate processes (`python -m kvxfer.engine.rank_process`, so the
caller's main module is never re-imported), each driven over a socket-pair connection
carrying method names and small arguments (token ids, block ids, connector metadata).
Tensors move only between ranks, over torch.distributed. If this process already belongs
to a torch.distributed group (another TP engine lives here), rank 0 is spawned too, so
that several TP engines can share one process.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from kvxfer.connectors.base import KVConnectorBroken
from kvxfer.engine.config import EngineConfig
from kvxfer.engine.rank_events import RankEvents


def threads_per_rank(tp_size: int) -> int:
    """Intra-op threads for one of `tp_size` ranks sharing this process's cores: the cores it may
    run on (its affinity, so `taskset` counts), split evenly."""
    return max(1, len(os.sched_getaffinity(0)) // tp_size)


class WorkerError(RuntimeError):
    """A method raised on a rank; the rank is still alive."""


class RankBrokenError(WorkerError):
    """A rank's KV connector is broken (e.g. its registration failed): the rank answers, but
    no later step can be trusted to report its transfers, so the engine cannot go on."""


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
        except KVConnectorBroken as e:
            raise RankBrokenError(f"rank 0: {e}") from e
        except Exception as e:
            raise WorkerError(f"rank 0: {type(e).__name__}: {e}") from e

    def stop(self, timeout: float) -> None:
        self.worker.shutdown()


class _ProcessRank:
    def __init__(self, config: EngineConfig, rank: int, tp_size: int) -> None:
        self.rank = rank
        ours, theirs = socket.socketpair()
        kv = config.kv_transfer_config
        event_fds = (kv.event_fd,) if kv is not None and kv.event_fd >= 0 else ()
        # PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so it is
        # only armed when the engine is created on the main thread.
        pdeathsig = threading.current_thread() is threading.main_thread()
        argv = [sys.executable, "-m", "kvxfer.engine.rank_process", str(theirs.fileno()), str(os.getpid())]
        self.process = subprocess.Popen(argv + ["1" if pdeathsig else "0"], pass_fds=(theirs.fileno(), *event_fds))
        theirs.close()
        self.conn = Connection(ours.detach())
        self._send((config, rank, tp_size))

    def _send(self, obj: Any) -> None:
        # Plain pickle: tensors travel by value, not as shared-memory handles that need
        # multiprocessing's authentication between these processes.
        self.conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def send(self, method: str, args: tuple) -> None:
        try:
            self._send((method, args))
        except (BrokenPipeError, OSError) as e:
            raise EngineDeadError(f"TP rank {self.rank} is gone ({self._exit_text()})") from e

    def recv(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.05):
            if self.process.poll() is not None:
                raise EngineDeadError(f"TP rank {self.rank} died ({self._exit_text()})")
            if time.monotonic() > deadline:
                raise EngineDeadError(f"TP rank {self.rank} did not answer within {timeout:.0f}s")
        try:
            status, value = pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError) as e:
            raise EngineDeadError(f"TP rank {self.rank} closed its pipe ({self._exit_text()})") from e
        if status == "err":
            raise WorkerError(f"rank {self.rank}: {value}")
        if status == "broken":
            raise RankBrokenError(f"rank {self.rank}: {value}")
        return value

    def stop(self, timeout: float) -> None:
        try:
            self._send(("shutdown", ()))
        except OSError:
            pass
        for action, wait in ((None, timeout), (self.process.terminate, 2.0), (self.process.kill, 2.0)):
            if self.process.poll() is not None:
                break
            if action is not None:
                action()
            try:
                self.process.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        self.conn.close()

    def _exit_text(self) -> str:
        code = self.process.poll()
        return "still running" if code is None else f"exit code {code}"


class Executor:
    """Starts the ranks, loads the model on each, agrees on the KV pool, and runs methods on all ranks."""

    def __init__(self, config: EngineConfig) -> None:
        import torch.distributed as dist

        self.timeout = config.worker_timeout_s
        tp = config.tensor_parallel_size
        # With a KV connector the ranks wake the engine loop when transfers finish (rank_events).
        self.events: RankEvents | None = None
        if config.kv_transfer_config is not None:
            self.events = RankEvents()
            kv = dataclasses.replace(config.kv_transfer_config, event_fd=self.events.write_fd)
            config = dataclasses.replace(config, kv_transfer_config=kv)
        self.config = config
        rank0_local = tp == 1 or not dist.is_initialized()
        self.ranks: list[_LocalRank | _ProcessRank] = []
        self._caller_num_threads: int | None = None
        try:
            if rank0_local:
                if tp > 1 and config.device == "cpu":
                    # Rank 0 shares the cores with the other ranks, like they do (see rank_process);
                    # the caller's setting comes back at shutdown.
                    import torch

                    self._caller_num_threads = torch.get_num_threads()
                    torch.set_num_threads(threads_per_rank(tp))
                self.ranks.append(_LocalRank(config, tp))
            for rank in range(len(self.ranks), tp):
                self.ranks.append(_ProcessRank(config, rank, tp))
            # Load first, then join the group: a rank failing to load is reported as such
            # instead of leaving the others waiting in a rendezvous.
            self.collective_rpc("load_model")
            # The ranks meet in a file store (they all run on this host): a TCP port probed free
            # here could be taken by another process before rank 0 binds it, leaving the other
            # ranks waiting out their time-out. The group needs the file only to form.
            rendezvous = tempfile.mkdtemp(prefix="kvxfer-tp-")
            try:
                self.num_blocks = self.collective_rpc("init_kv_cache", os.path.join(rendezvous, "store"))[0]
            finally:
                shutil.rmtree(rendezvous, ignore_errors=True)
        except BaseException:
            self.shutdown()
            raise

    def collective_rpc(self, method: str, *args: Any, timeout: float | None = None) -> list:
        """Call `method(*args)` on every rank's worker; results in rank order."""
        results, error = self.collective_rpc_each(method, *args, timeout=timeout)
        if error is not None:
            raise error
        return results

    def collective_rpc_each(
        self, method: str, *args: Any, timeout: float | None = None
    ) -> tuple[list, WorkerError | None]:
        """Like `collective_rpc`, but a rank whose method raised does not hide the others'
        results: (results in rank order, None for a rank that raised; the error, a
        RankBrokenError first). EngineDeadError is raised."""
        for rank in self.ranks:
            rank.send(method, args)
        results: list = []
        error: WorkerError | EngineDeadError | None = None
        for rank in self.ranks:
            try:
                results.append(rank.recv(timeout or self.timeout))
            except (WorkerError, EngineDeadError) as e:
                # Keep draining the other ranks so the pipes stay in step.
                if error is None or _severity(e) > _severity(error):
                    error = e
                results.append(None)
        if isinstance(error, EngineDeadError):
            raise error
        return results, error

    def shutdown(self) -> None:
        ranks, self.ranks = self.ranks, []
        for rank in reversed(ranks):  # spawned ranks first; rank 0 then leaves the group last
            try:
                rank.stop(timeout=5.0)
            except Exception:
                pass
        if self.events is not None:  # every rank, and so every writer, has stopped
            self.events.close()
        if self._caller_num_threads is not None:
            import torch

            torch.set_num_threads(self._caller_num_threads)
            self._caller_num_threads = None

    def worker_pids(self) -> list[int]:
        return [r.process.pid for r in self.ranks if isinstance(r, _ProcessRank)]


def _severity(error: Exception) -> int:
    return 2 if isinstance(error, EngineDeadError) else 1 if isinstance(error, RankBrokenError) else 0
