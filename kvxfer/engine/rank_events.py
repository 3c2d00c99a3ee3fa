"""Rank events: how TP ranks wake the engine loop when their KV connector has something to report.

One pipe per engine with a KV connector. Every rank writes a byte to it (rank 0 from this
process, the others through the descriptor they inherit, `KVTransferConfig.event_fd`) when a
transfer of theirs finished or failed since they last reported; the engine loop sleeps on the
read end, with a deadline, instead of polling. A byte only wakes the loop: what finished is still
collected, and state still changes, in the next engine step.
"""

from __future__ import annotations

import os
import select


class RankEvents:
    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()  # not inherited, except by the ranks (pass_fds)
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)  # a full pipe already wakes the loop: never block a rank

    def fileno(self) -> int:
        return self.read_fd

    def drain(self) -> int:
        """Consume what the ranks wrote: the number of wake-ups (0: none)."""
        got = 0
        while True:
            try:
                chunk = os.read(self.read_fd, 4096)
            except BlockingIOError:
                return got
            if not chunk:
                return got
            got += len(chunk)

    def wait(self, timeout_s: float) -> int:
        """Sleep until a rank event or `timeout_s`; the wake-ups consumed (0: none came)."""
        select.select([self.read_fd], [], [], timeout_s)
        return self.drain()

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.read_fd = self.write_fd = -1
