"""Free TCP ports on the loopback interface, for side channels and servers.

Ports are drawn below (or above) the kernel's ephemeral range: a port the kernel hands out for
`bind(0)` is also the kind it hands to every outgoing connection, so a port probed that way can
be taken by some client's connection (an HTTP request, a gloo or zmq socket) between the probe
and the server's bind. That race failed test runs on busy machines ("cannot bind the KV side
channel ...: Address already in use"). Outside the ephemeral range only another explicit bind can
take a port, and the random draw makes two probers' picks collide rarely.
"""

from __future__ import annotations

import errno
import random
import socket
from pathlib import Path

_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default
_LOWEST = 10000  # below: well-known and registered services
_random = random.SystemRandom()  # not the global RNG: tests seed that, and forked probers would agree


def _candidate_range() -> range:
    """Ports outside the ephemeral range: the larger side of it, within [_LOWEST, 65535]."""
    try:
        low, high = (int(x) for x in _EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        low, high = _DEFAULT_EPHEMERAL
    below = range(_LOWEST, max(_LOWEST, low))
    above = range(max(_LOWEST, high + 1), 65536)
    best = max(below, above, key=len)
    return best if len(best) >= 1000 else range(_LOWEST, 65536)  # an odd set-up: any port will do


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 right now, outside the ephemeral range (held
    together while probing, so they are distinct)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    candidates = _candidate_range()
    socks: list[socket.socket] = []
    try:
        for _ in range(50 * n + 100):
            if len(socks) == n:
                break
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", _random.choice(candidates)))
            except OSError as exc:
                s.close()
                if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                    raise
                continue
            socks.append(s)
        if len(socks) < n:
            raise OSError(errno.EADDRINUSE, f"no {n} free loopback ports found in {candidates}")
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


if __name__ == "__main__":  # `python -m kvxfer.ports N`: for the integration scripts
    import sys

    print(" ".join(str(p) for p in free_ports(int(sys.argv[1]) if len(sys.argv) > 1 else 1)))
