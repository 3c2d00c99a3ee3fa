"""ManagedProcess.on_free_ports: a process that loses its drawn port to another process before
binding it is restarted on new ports; any other early exit is reported, not retried."""

from __future__ import annotations

import socket
import sys

import httpx
import pytest

from kvxfer.entrypoints.launcher import BIND_ATTEMPTS, ManagedProcess

# A real HTTP server on argv[1] answering 200 on /health; binding a taken port raises
# "OSError: [Errno 98] Address already in use", as uvicorn's does.
HEALTH_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


class PortThief:
    """Listens on the first port of the first `times` draws: another process that took it."""

    def __init__(self, times: int):
        self.times = times
        self.draws: list[list[int]] = []
        self.sockets: list[socket.socket] = []

    def argv(self, ports) -> list[str]:
        self.draws.append(list(ports))
        if len(self.draws) <= self.times:
            s = socket.socket()
            s.bind(("127.0.0.1", ports[0]))
            s.listen()
            self.sockets.append(s)
        return [sys.executable, "-c", HEALTH_SERVER, str(ports[0])]

    def close(self) -> None:
        for s in self.sockets:
            s.close()


@pytest.fixture
def thief_factory():
    made: list[tuple[PortThief, ManagedProcess]] = []

    def make(times: int, tmp_path) -> tuple[PortThief, ManagedProcess]:
        thief = PortThief(times)
        proc = ManagedProcess.on_free_ports("health", 2, thief.argv, tmp_path / "health.log")
        made.append((thief, proc))
        return thief, proc

    yield make
    for thief, proc in made:
        proc.stop()
        thief.close()


def test_a_lost_port_is_redrawn_and_the_process_restarted(thief_factory, tmp_path):
    thief, proc = thief_factory(1, tmp_path)
    proc.start().wait_healthy(60)
    assert proc.port_redraws == 1 and len(thief.draws) == 2
    assert proc.url == f"http://127.0.0.1:{thief.draws[1][0]}" != f"http://127.0.0.1:{thief.draws[0][0]}"
    assert httpx.get(f"{proc.url}/health").status_code == 200


def test_it_gives_up_after_the_last_attempt_and_says_why(thief_factory, tmp_path):
    thief, proc = thief_factory(BIND_ATTEMPTS, tmp_path)
    with pytest.raises(RuntimeError, match="(?i)address already in use"):
        proc.start().wait_healthy(60)
    assert len(thief.draws) == BIND_ATTEMPTS


def test_an_exit_for_another_reason_is_not_retried(tmp_path):
    draws: list[list[int]] = []

    def argv(ports) -> list[str]:
        draws.append(list(ports))
        return [sys.executable, "-c", "import sys; sys.exit('no model here')"]

    proc = ManagedProcess.on_free_ports("broken", 1, argv, tmp_path / "broken.log")
    with pytest.raises(RuntimeError, match="no model here"):
        proc.start().wait_healthy(60)
    assert len(draws) == 1 and proc.port_redraws == 0
