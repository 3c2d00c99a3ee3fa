"""Side channel: one zmq ROUTER per instance serving its ranks' metadata and its hold checks.

The scheduler side of a prefill-capable instance hosts the ROUTER at the side-channel port;
every rank registers there, proving with the instance secret that it belongs to this start of
the engine; decode ranks fetch the metadata (`Query`) and, before each pull, ask whether the
request is held under its token with exactly the named blocks (`Held`, answered and pinned by
the hold table). With an auth key every frame is signed (`auth.FrameAuth`). A request that is
malformed, unknown, unauthenticated or out of range gets an error reply; nothing a peer sends
stops the serving thread. Every wait has a deadline: a client gives up at its timeout and closes
a REQ socket that missed its reply (it cannot be reused). Hold checks, one per pull on its
critical path, reuse answered connections (`ReqSockets`): a new connection's set-up was most of
the check's round trip. Handshakes use a fresh socket.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import msgspec
import zmq

from kvxfer.connectors.auth import AuthError, FrameAuth
from kvxfer.connectors.base import KVConflictError, KVExpiredError, KVParamsError, KVPeerError
from kvxfer.connectors.metadata import (
    PROTOCOL_VERSION,
    Compat,
    EngineMetadata,
    Held,
    Query,
    RankMetadata,
    Register,
    Release,
    RemotePrefillParams,
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
    """Serves `EngineMetadata` once all `tp_size` ranks have registered, and hold checks."""

    def __init__(
        self, host: str, port: int, engine_id: str, instance_id: str, secret: bytes, tp_size: int,
        compat: Compat, lease_seconds: float, auth: FrameAuth,
        check_hold: Callable[[Held], Reply] = lambda msg: Reply(ok=False, error="this engine holds no requests"),
        release: Callable[[Release], Reply] = lambda msg: Reply(ok=False, error="this engine holds no requests"),
    ) -> None:
        self.engine_id, self.instance_id, self.tp_size, self.compat = engine_id, instance_id, tp_size, compat
        self.lease_seconds = lease_seconds
        self._secret, self._auth = secret, auth
        self.check_hold, self.release = check_hold, release  # called from the server thread
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

    def metadata(self) -> EngineMetadata | None:
        with self._lock:
            if len(self._ranks) < self.tp_size:
                return None
            ranks = [self._ranks[r] for r in range(self.tp_size)]
        return EngineMetadata(
            version=PROTOCOL_VERSION,
            engine_id=self.engine_id,
            instance_id=self.instance_id,
            lease_seconds=self.lease_seconds,
            tp_size=self.tp_size,
            block_size=self.compat.block_size,
            num_blocks=[min(r.regions[g].num_blocks for r in ranks) for g in range(len(ranks[0].regions))],
            compat=self.compat,
            compat_hash=self.compat.hash(),
            ranks=ranks,
        )

    def _answer(self, payload: bytes) -> Reply:
        try:
            msg = self._decoder.decode(payload)
        except msgspec.DecodeError as e:
            return Reply(ok=False, error=f"malformed side-channel request: {e}")
        if msg.engine_id != self.engine_id and not (isinstance(msg, Query) and msg.engine_id == ""):
            error = f"unknown remote engine {msg.engine_id!r}: this side channel serves {self.engine_id!r}"
            return Reply(ok=False, error=error)
        if isinstance(msg, Held):
            return self.check_hold(msg)
        if isinstance(msg, Release):
            return self.release(msg)
        if isinstance(msg, Register):
            return self._register(msg)
        meta = self.metadata()
        if meta is None:
            return Reply(ok=False, error=f"not ready: {len(self._ranks)} of {self.tp_size} ranks registered")
        return Reply(ok=True, metadata=meta)

    def _register(self, msg: Register) -> Reply:
        if not hmac.compare_digest(msg.secret, self._secret):
            return Reply(ok=False, error="registration refused: not a rank of this instance")
        if not 0 <= msg.rank.tp_rank < self.tp_size or msg.tp_size != self.tp_size:
            return Reply(ok=False, error=f"registration refused: rank {msg.rank.tp_rank} of TP {msg.tp_size}, "
                                         f"this instance runs TP {self.tp_size}")
        if msg.compat_hash != self.compat.hash() or len(msg.rank.regions) != len(self.compat.kv_cache_groups):
            return Reply(ok=False, error=f"rank {msg.rank.tp_rank} does not match the instance's model")
        with self._lock:
            self._ranks[msg.rank.tp_rank] = msg.rank
        return Reply(ok=True)

    def _handle(self, frame: bytes) -> bytes:
        nonce = b""
        try:
            payload, nonce = self._auth.open_request(frame)
            reply = self._answer(payload)
        except AuthError as e:
            return self._encoder.encode(Reply(ok=False, error=str(e)))  # unsigned: the caller has no key
        except Exception as e:  # a bug must not stop the side channel: answer it instead
            logger.exception("side-channel request failed")
            reply = Reply(ok=False, error=f"side-channel error: {type(e).__name__}: {e}")
        return self._auth.seal_reply(self._encoder.encode(reply), nonce)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(100):
                    continue
                frames = self._socket.recv_multipart()
                if len(frames) < 2:
                    continue  # no routing identity: nobody to answer
                if len(frames) != 3 or frames[1]:
                    reply = self._encoder.encode(Reply(ok=False, error="not a REQ envelope"))
                else:
                    reply = self._handle(frames[2])
                self._socket.send_multipart([frames[0], b"", reply])
            except zmq.ZMQError as e:  # e.g. the peer went away before its reply
                logger.warning("side channel: %s", e)
        self._socket.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _req_socket(host: str, port: int) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{host}:{port}")
    return sock


class ReqSockets:
    """REQ sockets whose last request was answered, by peer address, ready for the next one.
    Any thread may take one; the lock hands it over, so one thread uses it at a time (as zmq
    requires). Its owner discards a peer's sockets when it drops the peer and closes all at
    shutdown; a socket given back after that is closed."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[zmq.Socket]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def take(self, host: str, port: int) -> zmq.Socket:
        with self._lock:
            idle = self._idle.get((host, port))
            if idle:
                return idle.pop()
        return _req_socket(host, port)

    def give_back(self, host: str, port: int, sock: zmq.Socket) -> None:
        with self._lock:
            if not self._closed:
                self._idle.setdefault((host, port), []).append(sock)
                return
        sock.close()

    def discard(self, host: str, port: int) -> None:
        with self._lock:
            socks = self._idle.pop((host, port), [])
        for sock in socks:
            sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks = [sock for idle in self._idle.values() for sock in idle]
            self._idle.clear()
        for sock in socks:
            sock.close()


def _request(host: str, port: int, msg: SideChannelRequest, timeout_s: float, auth: FrameAuth,
             sockets: ReqSockets | None = None) -> Reply:
    """Send `msg` until a reply other than "not ready" arrives or `timeout_s` passes (on a
    socket from `sockets` when given, returned there once answered)."""
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
        sock = sockets.take(host, port) if sockets is not None else _req_socket(host, port)
        answered = False
        try:
            frame, nonce = auth.seal_request(payload)
            # A REQ send blocks while the socket has no pipe: after a peer that is not a zmq side
            # channel (an HTTP port) rejected the connection, or a reused socket's peer went away.
            attempt_ms = max(int(min(remaining, _ATTEMPT_S) * 1000), 1)
            sock.setsockopt(zmq.SNDTIMEO, attempt_ms)
            try:
                sock.send(frame)
            except zmq.Again:
                last_error = "nothing there accepts a KV side channel connection"
                continue
            if sock.poll(attempt_ms, zmq.POLLIN):
                raw = sock.recv()
                answered = True
                try:
                    opened = auth.open_reply(raw, nonce)
                    reply = decode_reply(raw if opened is None else opened)
                except ValueError as e:  # AuthError, a malformed or other-version reply
                    raise KVParamsError(f"KV side channel {host}:{port}: {e}") from None
                if opened is None and reply.ok:  # only a refusal may come unsigned
                    raise KVParamsError(f"KV side channel {host}:{port}: unauthenticated reply")
                if reply.ok or not reply.error.startswith("not ready"):
                    return reply
                last_error = reply.error
                time.sleep(min(_NOT_READY_RETRY_S, max(deadline - time.monotonic(), 0)))
        finally:
            if sockets is not None and answered:
                sockets.give_back(host, port, sock)
            else:
                sock.close()


def register_rank(host: str, port: int, msg: Register, timeout_s: float, auth: FrameAuth) -> None:
    reply = _request(host, port, msg, timeout_s, auth)
    if not reply.ok:
        raise HandshakeError(f"KV side channel {host}:{port} refused rank {msg.rank.tp_rank}: {reply.error}")


_REFUSALS = {"": KVParamsError, "conflict": KVConflictError, "expired": KVExpiredError}


def check_held(host: str, port: int, msg: Held, timeout_s: float, auth: FrameAuth,
               sockets: ReqSockets | None = None) -> float:
    """Seconds the prefill side pins the hold from receipt. When it refuses: KVConflictError
    (another pull claimed the token), KVExpiredError (the lease ran out first), else
    KVParamsError (not held so: made up, finished, released; another token, blocks or instance)."""
    reply = _request(host, port, msg, timeout_s, auth, sockets)
    if not reply.ok:
        raise _REFUSALS.get(reply.kind, KVParamsError)(f"KV side channel {host}:{port}: {reply.error}")
    return reply.pin_seconds


class Releaser:
    """Decode side: tells a prefill side channel to release a hold nobody here will read (the
    request ended before its pull), in the background so that no engine step waits on a peer.
    Signed like every side-channel frame; the prefill side releases only under the hold's token."""

    def __init__(self, timeout_s: float, auth: FrameAuth) -> None:
        self._timeout_s, self._auth = timeout_s, auth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-release")

    def release(self, params: RemotePrefillParams) -> None:
        msg = Release(params.remote_engine_id, params.remote_instance_id, params.remote_request_id,
                      params.transfer_token)
        self._pool.submit(self._send, params.remote_host, params.remote_port, msg)

    def _send(self, host: str, port: int, msg: Release) -> None:
        try:
            reply = _request(host, port, msg, self._timeout_s, self._auth)
        except Exception as e:  # the peer is gone or slow: its lease frees the blocks
            logger.info("releasing %s at %s:%d failed (its lease ends it): %s", msg.request_id, host, port, e)
            return
        if not reply.ok:
            logger.info("releasing %s at %s:%d: %s", msg.request_id, host, port, reply.error)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def fetch_engine_metadata(
    host: str, port: int, engine_id: str, local: Compat, timeout_s: float, auth: FrameAuth
) -> EngineMetadata:
    """The remote engine's metadata, checked against what this engine needs.

    HandshakeError when unreachable; KVParamsError when the side channel serves another
    engine (the params name one that is not there) or an incompatible one (naming the field).
    An empty `engine_id` takes whichever engine serves there (a configured peer).
    """
    reply = _request(host, port, Query(engine_id=engine_id), timeout_s, auth)
    if not reply.ok or reply.metadata is None:
        raise KVParamsError(f"KV side channel {host}:{port}: {reply.error}")
    meta = reply.metadata
    if engine_id and meta.engine_id != engine_id:
        raise KVParamsError(f"KV side channel {host}:{port} answered for engine {meta.engine_id!r}, not {engine_id!r}")
    try:
        meta.check_compatible(local)
    except ValueError as e:
        raise KVParamsError(f"KV handshake with {host}:{port} failed: {e}") from None
    return meta
