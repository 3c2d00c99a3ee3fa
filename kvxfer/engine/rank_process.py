"""Entry point of a spawned TP rank: `python -m kvxfer.engine.rank_process FD PARENT_PID PDEATHSIG`.

Serves method calls from the engine over the connection on FD until the shutdown message,
EOF, or the death of the engine process (PR_SET_PDEATHSIG on Linux, and a parent-pid
watchdog that also covers a blocked collective).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection


def _set_pdeathsig() -> None:
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)


def main(fd: int, parent_pid: int, pdeathsig: bool) -> None:
    if pdeathsig:
        _set_pdeathsig()
    if os.getppid() != parent_pid:  # the engine died before the death signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="parent-watch").start()
    conn = Connection(fd)
    try:
        config, rank, tp_size = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return
    import torch

    from kvxfer.connectors.base import KVConnectorBroken

    # Ranks share the host's cores; oversubscribed intra-op threads only slow every rank down.
    from kvxfer.engine.executor import threads_per_rank

    torch.set_num_threads(threads_per_rank(tp_size))
    from kvxfer.engine.worker import Worker

    worker = Worker(config, rank, tp_size)
    try:
        while True:
            try:
                method, args = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                break
            if method == "shutdown":
                break
            try:
                payload = pickle.dumps(("ok", getattr(worker, method)(*args)), protocol=pickle.HIGHEST_PROTOCOL)
            except KVConnectorBroken as e:
                payload = pickle.dumps(("broken", str(e)))
            except Exception as e:
                payload = pickle.dumps(("err", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-4)}"))
            conn.send_bytes(payload)
    finally:
        worker.shutdown()
        conn.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1")
    # Everything this rank owns is shut down; skip interpreter finalization, where torch's gloo
    # threads being torn down aborted a finished rank once (tests/models/harness.py does the same).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
