"""NIXL connector, prefill side of a worker: the finished requests whose blocks this rank holds.

A request is held from its `SendRequest` until every decode rank that reads from this rank has
sent its `ReadDone` (`spec.consumers`), its lease deadline passes (expired), or the scheduler
side releases it. Expired and released requests are remembered a lease long, so rank 0's side
channel can answer a decode rank's "still held?" check from `is_given_up` (called from that
channel's thread).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kvxfer.connectors.base import KVConnectorOutput
from kvxfer.connectors.metadata import ReadDone

logger = logging.getLogger(__name__)


@dataclass
class _Send:
    deadline: float | None = None  # None until the scheduler's SendRequest arrives
    readers: set[tuple[str, int]] = field(default_factory=set)
    expected: int | None = None  # decode ranks that will notify, known from the first ReadDone
    released: bool = False
    first_seen: float = field(default_factory=time.monotonic)


class SendTracker:
    """Held requests of one prefill rank; counts into the worker's `counters`
    ("released", "expired_leases")."""

    def __init__(self, spec: Any, tp_rank: int, tp_size: int, lease_seconds: float, counters: dict[str, int]) -> None:
        self.spec, self.tp_rank, self.tp_size = spec, tp_rank, tp_size
        self.lease_seconds = lease_seconds
        self.counters = counters
        self._sends: dict[str, _Send] = {}
        # Requests this rank gave up, released or expired -> when; read by the side channel's
        # thread, kept a lease long.
        self._given_up: dict[str, float] = {}
        self._decoder = msgspec.msgpack.Decoder(ReadDone)

    def has_pending(self) -> bool:
        return bool(self._sends)

    def is_given_up(self, request_id: str) -> bool:
        return request_id in self._given_up

    def hold(self, request_id: str, deadline: float) -> None:
        self._given_up.pop(request_id, None)  # a request id used again
        self._sends.setdefault(request_id, _Send()).deadline = deadline

    def release(self, request_id: str) -> None:
        self._given_up[request_id] = time.monotonic()
        entry = self._sends.get(request_id)
        if entry is not None and entry.deadline is not None:  # else already finished here
            entry.released = True

    def add_notifications(self, raw_notifs: list[bytes]) -> None:
        for raw in raw_notifs:
            try:
                done = self._decoder.decode(raw)
            except msgspec.DecodeError:
                logger.warning("ignoring a malformed NIXL notification %r", raw[:64])
                continue
            entry = self._sends.setdefault(done.request_id, _Send())
            if entry.expected is None:
                try:
                    entry.expected = len(self.spec.consumers(self.tp_rank, done.decode_tp_size, self.tp_size))
                except ValueError as e:
                    logger.warning("ignoring a notification for %s: %s", done.request_id, e)
                    continue
            entry.readers.add((done.decode_engine_id, done.decode_rank))

    def poll(self, out: KVConnectorOutput) -> None:
        """Report finished (read, expired or released) requests in `out`; forget old given-up ones."""
        now = time.monotonic()
        for req_id, entry in list(self._sends.items()):
            if entry.deadline is None:
                # Notifications for a request this rank was not (yet) told to hold: keep them a
                # lease long in case the SendRequest is on its way, then drop them.
                if now - entry.first_seen > self.lease_seconds:
                    del self._sends[req_id]
                continue
            if entry.released:
                out.finished_sending.add(req_id)
                out.released_sending.add(req_id)
                self.counters["released"] += 1
            elif entry.expected is not None and len(entry.readers) >= entry.expected:
                out.finished_sending.add(req_id)
            elif now >= entry.deadline:
                out.finished_sending.add(req_id)
                out.expired_sending.add(req_id)
                self._given_up[req_id] = now
                self.counters["expired_leases"] += 1
            else:
                continue
            del self._sends[req_id]
        for req_id, when in list(self._given_up.items()):
            if now - when > self.lease_seconds:
                del self._given_up[req_id]
