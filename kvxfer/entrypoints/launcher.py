"""Start, health-wait and stop server and proxy processes (used by the demo and the tests).

Each process runs in its own session, so stopping it also stops the TP workers it spawned.
A process started on ports drawn by `kvxfer.ports` (`ManagedProcess.on_free_ports`) can lose a
port to another process between the draw and its bind; `wait_healthy` then restarts it on new
ports instead of failing (the race broke CI runs: "address already in use" from a proxy).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

from kvxfer.ports import free_ports

BIND_FAILED = re.compile(r"address already in use|errno 98|cannot bind", re.IGNORECASE)
BIND_ATTEMPTS = 3
ArgvForPorts = Callable[[Sequence[int]], list[str]]


def serve_argv(model_dir: str, role: str, tp: int, port: int, side_channel_port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kvxfer.entrypoints.serve", str(model_dir), "--role", role,
            "--tp", str(tp), "--host", "127.0.0.1", "--port", str(port),
            "--side-channel-port", str(side_channel_port), *extra]


def proxy_argv(prefill: list[str], decode: list[str], port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kvxfer.entrypoints.cli", "proxy", "--prefill", *prefill, "--decode", *decode,
            "--host", "127.0.0.1", "--port", str(port), *extra]


class ManagedProcess:
    def __init__(self, name: str, argv: list[str], port: int, log_path: str | Path, env: dict | None = None,
                 redraw: tuple[int, ArgvForPorts] | None = None):
        self.name = name
        self.argv = argv
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._redraw = redraw  # (how many ports, argv for them): set by on_free_ports
        self.port_redraws = 0

    @classmethod
    def on_free_ports(cls, name: str, num_ports: int, argv_for: ArgvForPorts, log_path: str | Path,
                      env: dict | None = None) -> ManagedProcess:
        """A process on `num_ports` freshly drawn ports (the first is its HTTP port), redrawn
        and restarted by `wait_healthy` if it lost one of them before binding it."""
        ports = free_ports(num_ports)
        return cls(name, argv_for(ports), ports[0], log_path, env, redraw=(num_ports, argv_for))

    def _restart_on_new_ports(self) -> None:
        num_ports, argv_for = self._redraw
        self.stop()
        ports = free_ports(num_ports)
        self.argv, self.url = argv_for(ports), f"http://127.0.0.1:{ports[0]}"
        self.port_redraws += 1
        self.start()

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
                if (self._redraw is not None and self.port_redraws < BIND_ATTEMPTS - 1
                        and BIND_FAILED.search(self.log_tail())):
                    self._restart_on_new_ports()
                    continue
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
