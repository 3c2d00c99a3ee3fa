"""NIXL connector, prefill side of a worker: the finished requests whose blocks this rank holds.

A request is held from its `SendRequest` (which carries its transfer token) until every decode
rank that reads from this rank has sent a `ReadDone` naming that token (`spec.consumers`), or
the scheduler side ends it: `release` (released) or `expire` (its lease ran out; the scheduler
side decides that once for all ranks, so a pinned hold never expires on one rank's clock).
A `ReadDone` with another token is refused and counted ("refused_notifications"); it changes
nothing for the real holder. Notifications that arrive before their `SendRequest` wait for it,
a lease long.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kvxfer.connectors.base import KVConnectorOutput, SendRequest
from kvxfer.connectors.metadata import ReadDone

logger = logging.getLogger(__name__)


@dataclass
class _Send:
    token: str
    # The decode engine, its TP size and the ranks of it that read from this rank, from the
    # first ReadDone with the token (the prefill admits one claim per token, so one engine).
    reader: tuple[str, int] | None = None
    expected: frozenset[int] = frozenset()
    readers: set[int] = field(default_factory=set)
    ended: str = ""  # "released" | "expired" once the scheduler side ends it
    since: float = field(default_factory=time.monotonic)  # when this rank learned of the hold


class SendTracker:
    """Held requests of one prefill rank; counts into the worker's `counters`
    ("released", "expired_leases", "refused_notifications")."""

    def __init__(self, spec: Any, tp_rank: int, tp_size: int, lease_seconds: float, counters: dict[str, int]) -> None:
        self.spec, self.tp_rank, self.tp_size = spec, tp_rank, tp_size
        self.lease_seconds = lease_seconds
        self.counters = counters
        self._refused_reported = 0  # refused notifications already reported to the engine
        self._sends: dict[str, _Send] = {}
        self._early: dict[str, tuple[float, list[ReadDone]]] = {}  # request id -> (first seen, notifications)
        self._decoder = msgspec.msgpack.Decoder(ReadDone)

    def has_pending(self) -> bool:
        return bool(self._sends)

    def has_recent(self, window_s: float) -> bool:
        """Whether a hold began less than `window_s` ago (its reader is likely about to READ)."""
        now = time.monotonic()
        return any(now - entry.since < window_s for entry in self._sends.values())

    def hold(self, send: SendRequest) -> None:
        if send.request_id in self._sends:  # the engine never reuses an id it still holds
            logger.error("request %s is already held; ignoring a second hold", send.request_id)
            return
        self._sends[send.request_id] = _Send(send.transfer_token)
        for done in self._early.pop(send.request_id, (0.0, []))[1]:
            self._count(done)

    def end(self, request_id: str, how: str) -> None:
        entry = self._sends.get(request_id)
        if entry is not None:  # else already finished here by its readers
            entry.ended = how

    def add_notifications(self, raw_notifs: list[bytes]) -> bool:
        """Count ReadDones; True when one completed a held request (its readers all notified)."""
        completed = False
        for raw in raw_notifs:
            try:
                done = self._decoder.decode(raw)
            except msgspec.DecodeError:
                logger.warning("ignoring a malformed NIXL notification %r", raw[:64])
                continue
            if done.request_id in self._sends:
                completed |= self._count(done)
            else:
                self._early.setdefault(done.request_id, (time.monotonic(), []))[1].append(done)
        return completed

    def _count(self, done: ReadDone) -> bool:
        """Count one ReadDone of a held request; True when its last expected reader notified."""
        entry = self._sends[done.request_id]
        if not hmac.compare_digest(entry.token, done.transfer_token):
            self.counters["refused_notifications"] += 1
            logger.warning("refusing a ReadDone for %s with a wrong transfer token", done.request_id)
            return False
        if entry.reader is None:
            try:
                expected = frozenset(self.spec.consumers(self.tp_rank, done.decode_tp_size, self.tp_size))
            except ValueError as e:
                logger.warning("ignoring a notification for %s: %s", done.request_id, e)
                return False
            entry.reader, entry.expected = (done.decode_engine_id, done.decode_tp_size), expected
        # Freed only when each expected reader rank has notified: a ReadDone from another
        # engine, TP size or rank cannot stand in for one whose READ may be in flight.
        if (done.decode_engine_id, done.decode_tp_size) != entry.reader or done.decode_rank not in entry.expected:
            self.counters["refused_notifications"] += 1
            logger.warning("refusing a ReadDone for %s from %s rank %d of TP %d, not a reader of this rank",
                           done.request_id, done.decode_engine_id, done.decode_rank, done.decode_tp_size)
            return False
        before = len(entry.readers)
        entry.readers.add(done.decode_rank)
        return before < len(entry.expected) <= len(entry.readers)

    def poll(self, out: KVConnectorOutput) -> None:
        """Report finished (read, expired or released) requests in `out`, and the notifications
        refused since the last poll (the engine exports them)."""
        refused = self.counters["refused_notifications"]
        out.refused_notifications, self._refused_reported = refused - self._refused_reported, refused
        for req_id, entry in list(self._sends.items()):
            if entry.ended == "released":
                out.released_sending.add(req_id)
                self.counters["released"] += 1
            elif entry.ended == "expired":
                out.expired_sending.add(req_id)
                self.counters["expired_leases"] += 1
            elif entry.reader is None or len(entry.readers) < len(entry.expected):
                continue
            out.finished_sending.add(req_id)
            del self._sends[req_id]
        now = time.monotonic()
        for req_id, (first_seen, _) in list(self._early.items()):
            if now - first_seen > self.lease_seconds:  # no hold came: a stray or forged notification
                del self._early[req_id]
