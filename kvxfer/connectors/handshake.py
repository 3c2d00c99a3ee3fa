"""Handshake side channel: one zmq ROUTER per engine serving all of its ranks' metadata.

Rank 0 hosts the ROUTER at the engine's side-channel port; the other ranks register there;
peers ask with a REQ socket. It also tells a decode rank whether a request's blocks were given
up (released or lease expired) before that rank's READs were done. Every wait has a deadline: a client uses a fresh REQ socket per
attempt (a REQ that missed its reply cannot be reused) and gives up at its timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import msgspec
import zmq

from kvxfer.connectors.base import KVParamsError, KVPeerError
from kvxfer.connectors.metadata import (
    PROTOCOL_VERSION,
    Compat,
    EngineMetadata,
    Held,
    Query,
    RankMetadata,
    Register,
    Reply,
    SideChannelRequest,
    decode_reply,
)

logger = logging.getLogger(__name__)

_ATTEMPT_S = 0.5  # one REQ round trip; a busy peer answers well within this
_NOT_READY_RETRY_S = 0.05


class HandshakeError(KVPeerError):
    """The peer could not be reached or refused (dead port, time-out, bind or registration failure)."""


class HandshakeServer:
    """Serves `EngineMetadata` once all `tp_size` ranks have registered."""

    def __init__(
        self, host: str, port: int, engine_id: str, tp_size: int, compat: Compat,
        given_up: Callable[[str], bool] = lambda request_id: False,
    ) -> None:
        self.engine_id, self.tp_size, self.compat = engine_id, tp_size, compat
        self.given_up = given_up  # called from the server thread
        self._ranks: dict[int, RankMetadata] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socket = zmq.Context.instance().socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as e:
            self._socket.close()
            raise HandshakeError(f"cannot bind the KV side channel at {host}:{port}: {e}") from None
        self.address = (host, port)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(SideChannelRequest)
        self._thread = threading.Thread(target=self._serve, name=f"kv-handshake-{port}", daemon=True)
        self._thread.start()

    def add_rank(self, rank: RankMetadata) -> None:
        with self._lock:
            self._ranks[rank.tp_rank] = rank

    def metadata(self) -> EngineMetadata | None:
        with self._lock:
            if len(self._ranks) < self.tp_size:
                return None
            ranks = [self._ranks[r] for r in range(self.tp_size)]
        return EngineMetadata(
            version=PROTOCOL_VERSION,
            engine_id=self.engine_id,
            tp_size=self.tp_size,
            block_size=self.compat.block_size,
            num_blocks=min(r.num_blocks for r in ranks),
            compat=self.compat,
            compat_hash=self.compat.hash(),
            ranks=ranks,
        )

    def _answer(self, payload: bytes) -> Reply:
        try:
            msg = self._decoder.decode(payload)
        except msgspec.DecodeError as e:
            return Reply(ok=False, error=f"malformed side-channel request: {e}")
        if msg.engine_id != self.engine_id:
            error = f"unknown remote engine {msg.engine_id!r}: this side channel serves {self.engine_id!r}"
            return Reply(ok=False, error=error)
        if isinstance(msg, Held):
            if self.given_up(msg.request_id):
                error = f"request {msg.request_id!r} is no longer held by engine {self.engine_id!r} (released or lease expired)"
                return Reply(ok=False, error=error)
            return Reply(ok=True)
        if isinstance(msg, Register):
            if msg.compat_hash != self.compat.hash() or msg.tp_size != self.tp_size:
                return Reply(ok=False, error=f"rank {msg.rank.tp_rank} does not match rank 0's model or TP size")
            self.add_rank(msg.rank)
            return Reply(ok=True)
        meta = self.metadata()
        if meta is None:
            return Reply(ok=False, error=f"not ready: {len(self._ranks)} of {self.tp_size} ranks registered")
        return Reply(ok=True, metadata=meta)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            frames = self._socket.recv_multipart()
            if len(frames) != 3:
                continue  # not a REQ envelope: ignore rather than crash the server
            identity, _, payload = frames
            reply = self._answer(payload)
            self._socket.send_multipart([identity, b"", self._encoder.encode(reply)])
        self._socket.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _request(host: str, port: int, msg: Register | Query, timeout_s: float) -> Reply:
    """Send `msg` until a reply other than "not ready" arrives or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    payload = msgspec.msgpack.encode(msg)
    last_error = "no reply"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HandshakeError(
                f"KV handshake with {host}:{port} (engine {msg.engine_id!r}) timed out after {timeout_s:.1f}s: "
                f"{last_error}"
            )
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(f"tcp://{host}:{port}")
            sock.send(payload)
            if sock.poll(int(min(remaining, _ATTEMPT_S) * 1000), zmq.POLLIN):
                reply = decode_reply(sock.recv())
                if reply.ok or not reply.error.startswith("not ready"):
                    return reply
                last_error = reply.error
                time.sleep(min(_NOT_READY_RETRY_S, max(deadline - time.monotonic(), 0)))
        finally:
            sock.close()


def register_rank(host: str, port: int, msg: Register, timeout_s: float) -> None:
    reply = _request(host, port, msg, timeout_s)
    if not reply.ok:
        raise HandshakeError(f"KV side channel {host}:{port} refused rank {msg.rank.tp_rank}: {reply.error}")


def check_held(host: str, port: int, engine_id: str, request_id: str, timeout_s: float) -> None:
    """KVPeerError unless the engine still holds `request_id`'s blocks (or has not heard of it yet)."""
    reply = _request(host, port, Held(engine_id=engine_id, request_id=request_id), timeout_s)
    if not reply.ok:
        raise KVPeerError(f"KV side channel {host}:{port}: {reply.error}")


def fetch_engine_metadata(host: str, port: int, engine_id: str, local: Compat, timeout_s: float) -> EngineMetadata:
    """The remote engine's metadata, checked against what this engine needs.

    HandshakeError when unreachable; KVParamsError when the side channel serves another
    engine (the params name one that is not there) or an incompatible one (naming the field).
    """
    reply = _request(host, port, Query(engine_id=engine_id), timeout_s)
    if not reply.ok or reply.metadata is None:
        raise KVParamsError(f"KV side channel {host}:{port}: {reply.error}")
    meta = reply.metadata
    if meta.engine_id != engine_id:
        raise KVParamsError(f"KV side channel {host}:{port} answered for engine {meta.engine_id!r}, not {engine_id!r}")
    try:
        meta.check_compatible(local)
    except ValueError as e:
        raise KVParamsError(f"KV handshake with {host}:{port} failed: {e}") from None
    return meta
