"""The prefill side's one table of holds: which finished requests' blocks are held for a remote
reader, under which token, for whom, and until when.

Owned by the scheduler side (engine process) and shared with the side channel's thread (hold
checks, releases), so every method takes the table's lock. The rules:

- One claim per token. A decode engine's load carries a fresh claim id (the same on all of its
  ranks); the first verified hold check fixes the hold's claim, and a check naming another
  claim is refused as a conflict (409) with nothing read, however concurrent: replaying one
  params set admits exactly one pull.
- Pins never outlive the lease. A yes pins the hold for that reader rank for its transfer
  time-out plus `PIN_MARGIN_S`, clipped at the lease's end; a check too close to the end is
  refused as expired. So a token holder cannot keep a hold by re-checking, and the lease is a
  hard bound. The reader's `transfer_timeout_s` must be `0 < t` and fit inside the lease.
- A hold ends (release or expiry, sent to the ranks once) only when no pin is live: no READ
  can still be in flight on its blocks.
- A release is done once: a second one with the right token changes nothing and says so.
- Ended holds' tokens are remembered for a while (`ENDED_MEMORY`, bounded, oldest forgotten
  first): a check naming an expired one is told "expired" (a timing fault of the decode path:
  504), not "not held" (a forged token: 400); a release naming any ended one (the proxy's and
  the decode's release of one abort, in either order) is not counted as refused.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from kvxfer.connectors.config import PIN_MARGIN_S, lease_fit_error
from kvxfer.connectors.metadata import Held, Reply

# Ended holds remembered (request id -> (token, how it ended)); old ones go first. Enough for
# minutes of holds at any realistic rate; a forgotten one reads as "not held" again.
ENDED_MEMORY = 4096

CONFLICT = "conflict"  # Reply.kind: another reader claimed the token (HTTP 409)
EXPIRED = "expired"  # Reply.kind: the lease ran out before the read (HTTP 504)


@dataclass
class Hold:
    token: str
    block_ids: list[int]
    deadline: float  # lease end, time.monotonic()
    claim: str = ""  # the first verified reader's claim; "" until a check passed
    reader: str = ""  # that claim's decode engine
    pins: dict[int, float] = field(default_factory=dict)  # reader rank -> pin end (<= deadline)
    release: bool = False  # asked to release; done once no pin is live
    ended: str = ""  # "released" | "expired" once sent to the ranks: no new pins

    def pinned_until(self) -> float:
        return max(self.pins.values(), default=0.0)


class HoldTable:
    """`counters` is the connector's: "refused_checks" and "refused_releases" are counted here."""

    def __init__(self, engine_id: str, instance_id: str, lease_seconds: float, counters: dict) -> None:
        self.engine_id, self.instance_id, self.lease_seconds = engine_id, instance_id, lease_seconds
        self.counters = counters
        self._holds: dict[str, Hold] = {}
        self._ended: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, request_id: str, block_ids: list[int]) -> str:
        """Hold `block_ids` under a fresh token (returned) for a lease."""
        token = secrets.token_hex(16)
        with self._lock:
            if request_id in self._holds:  # the engine refuses ids still held (RequestIdInUse)
                raise ValueError(f"request id {request_id!r} is already held for a remote reader")
            self._holds[request_id] = Hold(token, list(block_ids), time.monotonic() + self.lease_seconds)
            self._ended.pop(request_id, None)  # a new hold of the id: its old token is history
        return token

    def check(self, msg: Held) -> Reply:
        """Side-channel thread: confirm and pin a hold for one reader rank, or refuse (counted)."""
        now = time.monotonic()
        with self._lock:
            reply = self._check(msg, now)
            if not reply.ok:
                self.counters["refused_checks"] += 1
            return reply

    def _check(self, msg: Held, now: float) -> Reply:
        hold = self._holds.get(msg.request_id)
        if msg.instance_id != self.instance_id:
            return Reply(ok=False, error=(
                f"the params were issued by instance {msg.instance_id!r} of engine {self.engine_id!r}; this side "
                f"channel serves instance {self.instance_id!r} (restarted, or two engines with one id)"))
        if hold is None or not hmac.compare_digest(hold.token, msg.transfer_token):
            if self._ended_as(msg.request_id, msg.transfer_token) == "expired":
                return self._expired_reply(msg.request_id)
            return Reply(ok=False, error=f"request {msg.request_id!r} is not held by engine {self.engine_id!r} "
                                         f"under this token")
        if hold.block_ids != msg.block_ids:
            return Reply(ok=False, error=f"request {msg.request_id!r} is held with other blocks than the params name")
        if not msg.transfer_timeout_s > 0:  # also NaN; the upper bound (inside the lease) is next
            return Reply(ok=False, error=f"transfer_timeout_s must be a positive number of seconds, "
                                         f"got {msg.transfer_timeout_s!r}")
        problem = lease_fit_error(msg.transfer_timeout_s, self.lease_seconds)
        if problem is not None:
            return Reply(ok=False, error=problem)
        if hold.claim and not hmac.compare_digest(hold.claim, msg.claim):
            return Reply(ok=False, kind=CONFLICT, error=(
                f"request {msg.request_id!r} of engine {self.engine_id!r} is already claimed by another pull (of "
                f"engine {hold.reader!r}): a transfer token admits one"))
        if hold.ended == "released" or hold.release:
            return Reply(ok=False, error=f"request {msg.request_id!r} is no longer held by engine "
                                         f"{self.engine_id!r} (released)")
        # What is left of the lease must cover a read and the margin, else the read could outlive it.
        pin_s = min(msg.transfer_timeout_s + PIN_MARGIN_S, hold.deadline - now)
        if hold.ended == "expired" or pin_s <= PIN_MARGIN_S:
            return self._expired_reply(msg.request_id)
        hold.claim, hold.reader = msg.claim, msg.reader
        hold.pins[msg.reader_rank] = max(hold.pins.get(msg.reader_rank, 0.0), now + pin_s)
        return Reply(ok=True, pin_seconds=pin_s)

    def _ended_as(self, request_id: str, token: str | None) -> str:
        """How the hold of `request_id` under `token` ended, while remembered; else ""."""
        ended = self._ended.get(request_id)
        if ended is None or token is None or not hmac.compare_digest(ended[0], token):
            return ""
        return ended[1]

    def _expired_reply(self, request_id: str) -> Reply:
        return Reply(ok=False, kind=EXPIRED, error=(
            f"the lease of request {request_id!r} on engine {self.engine_id!r} ({self.lease_seconds:g}s) ran out "
            f"before the read (the decode side came too late)"))

    def release(self, request_id: str, token: str | None) -> bool:
        """Ask a release under the issued token: True when this call asked it. A wrong or
        missing token is refused and counted; one already released or ending is False, not
        counted (the holder asking twice forges nothing)."""
        with self._lock:
            hold = self._holds.get(request_id)
            if hold is None or token is None or not hmac.compare_digest(hold.token, token):
                if not self._ended_as(request_id, token):  # else its holder, after its end
                    self.counters["refused_releases"] += 1
                return False
            if hold.ended or hold.release:
                return False
            hold.release = True
            return True

    def due(self) -> tuple[list[str], list[str]]:
        """(to release, to expire) now, each once: holds asked to release or past their lease,
        with no live pin (no READ can be in flight on their blocks)."""
        now = time.monotonic()
        release, expire = [], []
        with self._lock:
            for request_id, hold in self._holds.items():
                if hold.ended or now < hold.pinned_until():
                    continue
                if hold.release:
                    hold.ended = "released"
                    release.append(request_id)
                elif now >= hold.deadline:
                    hold.ended = "expired"
                    expire.append(request_id)
        return release, expire

    def forget(self, request_ids: set[str]) -> None:
        """Every rank reported these finished: "held" is answered only for what is held now."""
        with self._lock:
            for request_id in request_ids:
                hold = self._holds.pop(request_id, None)
                if hold is None:
                    continue
                self._ended[request_id] = (hold.token, hold.ended or "read")
                self._ended.move_to_end(request_id)
                while len(self._ended) > ENDED_MEMORY:
                    self._ended.popitem(last=False)

    def is_held(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._holds

    def __len__(self) -> int:
        with self._lock:
            return len(self._holds)
