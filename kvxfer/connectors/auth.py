"""Side-channel frame authentication: HMAC-SHA256 with a timestamp and nonce against replay.

Without a key a frame is the bare msgpack payload. With `KVTransferConfig.auth_key` a request
frame is `MAGIC | ts (float64, wall clock) | nonce (16 bytes) | mac (32) | payload` with
`mac = HMAC(key, ts | nonce | payload)`; the server refuses a bad mac, a timestamp outside
`REPLAY_WINDOW_S` and a nonce already seen within that window. A reply is `MAGIC | mac | payload`
with the mac bound to its request's nonce, so an old reply cannot answer a new request.
Authentication, not secrecy: an eavesdropper on the link still sees the payloads.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
import time
from collections import OrderedDict

MAGIC = b"KVA1"
REPLAY_WINDOW_S = 60.0
_TS = struct.Struct(">d")
_NONCE_BYTES = 16
_MAC_BYTES = 32
_HEADER = len(MAGIC) + _TS.size + _NONCE_BYTES + _MAC_BYTES


class AuthError(ValueError):
    """A side-channel frame is not authenticated by this instance's key."""


class FrameAuth:
    def __init__(self, key: bytes | None) -> None:
        self.key = key
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # nonce -> ts, within the window
        self._lock = threading.Lock()

    def _mac(self, *parts: bytes) -> bytes:
        return hmac.new(self.key, b"".join(parts), hashlib.sha256).digest()

    def seal_request(self, payload: bytes) -> tuple[bytes, bytes]:
        """(frame, nonce): the nonce is what `open_reply` binds the reply to."""
        if self.key is None:
            return payload, b""
        ts, nonce = _TS.pack(time.time()), os.urandom(_NONCE_BYTES)
        return MAGIC + ts + nonce + self._mac(ts, nonce, payload) + payload, nonce

    def open_request(self, frame: bytes) -> tuple[bytes, bytes]:
        """(payload, nonce); AuthError unless the frame is fresh and signed with this key."""
        if self.key is None:
            return frame, b""
        if len(frame) < _HEADER or not frame.startswith(MAGIC):
            raise AuthError("unauthenticated side-channel request (this instance requires --kv-auth-key-file)")
        i = len(MAGIC)
        ts_raw, nonce = frame[i : i + _TS.size], frame[i + _TS.size : i + _TS.size + _NONCE_BYTES]
        mac, payload = frame[_HEADER - _MAC_BYTES : _HEADER], frame[_HEADER:]
        if not hmac.compare_digest(mac, self._mac(ts_raw, nonce, payload)):
            raise AuthError("side-channel request with a bad signature (another --kv-auth-key-file?)")
        (ts,) = _TS.unpack(ts_raw)
        now = time.time()
        if not abs(now - ts) <= REPLAY_WINDOW_S:
            raise AuthError(f"side-channel request timestamp {now - ts:+.0f}s off (replayed, or clocks differ)")
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now - 2 * REPLAY_WINDOW_S:
                self._seen.popitem(last=False)
            if nonce in self._seen:
                raise AuthError("replayed side-channel request")
            self._seen[nonce] = ts
        return payload, nonce

    def seal_reply(self, payload: bytes, nonce: bytes) -> bytes:
        if self.key is None:
            return payload
        return MAGIC + self._mac(b"reply", nonce, payload) + payload

    def open_reply(self, frame: bytes, nonce: bytes) -> bytes | None:
        """The payload of a reply signed for `nonce`; None when unsigned (only an error may be)."""
        if self.key is None:
            return frame
        n = len(MAGIC) + _MAC_BYTES
        if len(frame) < n or not frame.startswith(MAGIC):
            return None
        if not hmac.compare_digest(frame[len(MAGIC) : n], self._mac(b"reply", nonce, frame[n:])):
            raise AuthError("side-channel reply with a bad signature")
        return frame[n:]
