"""Start, health-wait and stop server and proxy processes (used by the demo and the tests).

Each process runs in its own session, so stopping it also stops the TP workers it spawned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def serve_argv(model_dir: str, role: str, tp: int, port: int, side_channel_port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kvxfer.entrypoints.serve", str(model_dir), "--role", role,
            "--tp", str(tp), "--host", "127.0.0.1", "--port", str(port),
            "--side-channel-port", str(side_channel_port), *extra]


def proxy_argv(prefill: list[str], decode: list[str], port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kvxfer.entrypoints.cli", "proxy", "--prefill", *prefill, "--decode", *decode,
            "--host", "127.0.0.1", "--port", str(port), *extra]


class ManagedProcess:
    def __init__(self, name: str, argv: list[str], port: int, log_path: str | Path, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> ManagedProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_healthy(self, timeout_s: float) -> ManagedProcess:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before becoming healthy:\n"
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not healthy after {timeout_s:.0f}s:\n{self.log_tail()}")
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash, as the tests simulate it)."""
        self._signal_group(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM (graceful shutdown), then SIGKILL whatever is left of the group."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)
        self.proc.wait(10)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_all(processes: list[ManagedProcess]) -> None:
    for p in processes:  # signal all first: they shut down in parallel
        if p.proc is not None:
            p._signal_group(signal.SIGTERM)
    for p in processes:
        p.stop()
