"""NIXL connector, decode side of a worker: the prefill engines one rank reads from, and the
handshakes with them.

A peer is identified by its engine id AND the side-channel address its metadata came from.
Handshakes run per (engine id, host, port): a request waits only behind the handshake of the
address it names, never behind another client's handshake with another address (one client's
params naming the right engine at a wrong port cannot fail another client's pull). The answer
proves the engine id (it must name the engine asked for; signed with `--kv-auth-key-file`, so
without the key nobody can answer for an engine). Once an engine is known, params naming it at
another address are refused at once (400); the same address with another instance id is
handshaken afresh, and the peer is replaced only when the new answer shows a new instance (a
restart), so a made-up instance id fails only its own request. At most
`MAX_ADDRESSES_PER_ENGINE` addresses are tried at once for one engine id.

Network waits never run under the worker's lock: handshakes run on the pool, and `connect`
(the configured `--kv-peers`, at start) fetches and connects outside it, taking the lock only
to enter the peer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kvxfer.connectors.auth import FrameAuth
from kvxfer.connectors.base import KVParamsError, KVPeerError, KVTransferError, RecvRequest
from kvxfer.connectors.config import KVTransferConfig, lease_fit_error
from kvxfer.connectors.descriptors import Region
from kvxfer.connectors.handshake import HandshakeError, fetch_engine_metadata
from kvxfer.connectors.metadata import Compat, EngineMetadata, GroupRegion
from kvxfer.specs import KVCacheGroup

logger = logging.getLogger(__name__)

MAX_ADDRESSES_PER_ENGINE = 4  # handshakes in flight for one engine id at distinct addresses

PeerKey = tuple[str, str, int]  # (engine id, host, port)


@dataclass
class Peer:
    meta: EngineMetadata
    address: tuple[str, int]  # where its metadata was fetched
    agents: dict[int, str]  # remote rank -> NIXL agent name
    regions: dict[int, list[Region]]  # remote rank -> its region of each KV cache group


class PeerTable:
    """Known peers by engine id, and handshakes in flight by (engine id, host, port), with the
    loads waiting for each. Not locked itself: the worker's lock guards it, except `connect`."""

    def __init__(
        self, agent: Any, config: KVTransferConfig, spec: Any, groups: tuple[KVCacheGroup, ...], compat: Compat,
        pool: ThreadPoolExecutor, counters: dict[str, int], kick: Callable[[], None],
        on_replace: Callable[[str], None],
    ) -> None:
        """`on_replace(engine_id)` is called before a restarted peer replaces its former start:
        the owner fails the former start's loads and `drop`s it."""
        self._on_replace = on_replace
        self.agent, self.config, self.spec, self.groups, self.compat = agent, config, spec, groups, compat
        self._pool, self.counters, self._kick = pool, counters, kick
        self._auth = FrameAuth(config.auth_key)
        self.peers: dict[str, Peer] = {}
        self._handshakes: dict[PeerKey, Future] = {}
        self._waiting: dict[PeerKey, list[RecvRequest]] = {}

    def busy(self) -> bool:
        return bool(self._waiting)

    def route(self, req: RecvRequest) -> Peer | KVTransferError | None:
        """The known peer to read `req` from; an error to fail it with at once; or None: it
        now waits for the handshake with the address it names (`finished` hands it back)."""
        address = (req.remote_host, req.remote_port)
        peer = self.peers.get(req.remote_engine_id)
        if peer is not None and peer.address != address:
            return KVParamsError(
                f"params name engine {req.remote_engine_id!r} at {address[0]}:{address[1]}, but it is known at "
                f"{peer.address[0]}:{peer.address[1]} (two engines with one id?)"
            )
        if peer is not None and req.remote_instance_id == peer.meta.instance_id:
            return peer
        key = (req.remote_engine_id, *address)  # unknown, or another instance at its address: ask there
        if key not in self._handshakes:
            in_flight = sum(1 for k in self._handshakes if k[0] == req.remote_engine_id)
            if in_flight >= MAX_ADDRESSES_PER_ENGINE:
                return KVParamsError(
                    f"params name engine {req.remote_engine_id!r} at {address[0]}:{address[1]}, while {in_flight} "
                    f"other addresses are being tried for it"
                )
            fut = self._pool.submit(
                fetch_engine_metadata, req.remote_host, req.remote_port, req.remote_engine_id, self.compat,
                self.config.handshake_timeout_s, self._auth,
            )
            fut.add_done_callback(lambda _: self._kick())
            self._handshakes[key] = fut
        self._waiting.setdefault(key, []).append(req)
        return None

    def finished(self) -> list[tuple[list[RecvRequest], Peer | KVTransferError]]:
        """The handshakes that ended: each one's waiting loads with their peer, or the error
        that fails them."""
        done = []
        for key, fut in list(self._handshakes.items()):
            if not fut.done():
                continue
            del self._handshakes[key]
            done.append((self._waiting.pop(key, []), self._enter(fut, key)))
        return done

    def _enter(self, fut: Future, key: PeerKey) -> Peer | KVTransferError:
        engine_id, host, port = key
        try:
            meta = fut.result()
        except KVTransferError as e:  # time-out, dead port (peer); another engine, incompatible (params)
            return e
        except Exception as e:
            return KVPeerError(f"KV handshake with {host}:{port} failed: {e}")
        known = self.peers.get(engine_id)
        if known is not None and known.address != (host, port):
            return KVParamsError(
                f"engine {engine_id!r} answered at {host}:{port}, but it is known at "
                f"{known.address[0]}:{known.address[1]} (two engines with one id?)"
            )
        if known is not None and known.meta.instance_id == meta.instance_id:
            return known  # the same start: a request's other instance id fails on its own
        if known is not None:  # restarted at its address: the former start's loads cannot go on
            self._on_replace(engine_id)
        try:
            peer = self._peer_of(meta, (host, port))
        except KVTransferError as e:
            return e
        except Exception as e:  # NIXL refusing its metadata, an inconsistent region
            return KVPeerError(f"KV handshake with {host}:{port} failed: {e}")
        return peer

    def connect(self, host: str, port: int, lock: threading.Lock) -> None:
        """Handshake with a configured peer now (at start: metadata, then the NIXL connection to
        each of its ranks), so its first request pays no handshake; the network waits run
        outside `lock`. An incompatible peer, a lease the transfer time-out does not fit, or an
        engine id already known elsewhere raise KVParamsError; an unreachable one is left to
        the first request's lazy handshake."""
        try:
            meta = fetch_engine_metadata(host, port, "", self.compat, self.config.handshake_timeout_s, self._auth)
        except HandshakeError as e:
            logger.warning("KV peer %s:%d not reachable at start (handshake on first use): %s", host, port, e)
            return
        with lock:
            known = self.peers.get(meta.engine_id)
            if known is not None and known.address != (host, port):
                raise KVParamsError(
                    f"KV peers {known.address[0]}:{known.address[1]} and {host}:{port} both run engine "
                    f"{meta.engine_id!r}"
                )
            if known is not None:
                return
            peer = self._peer_of(meta, (host, port))
        for name in peer.agents.values():  # UCX endpoints now, not on the first READ
            try:
                self.agent.make_connection(name)
            except Exception as e:
                logger.warning("connecting to KV peer %s:%d ahead failed (done on first use): %s", host, port, e)

    def _peer_of(self, meta: EngineMetadata, address: tuple[str, int]) -> Peer:
        """Check and enter a peer (replacing a former start of it: `drop` first fails its loads)."""
        problem = lease_fit_error(self.config.transfer_timeout_s, meta.lease_seconds)
        if problem is not None:
            raise KVParamsError(f"KV peer {meta.engine_id!r} at {address[0]}:{address[1]}: {problem}")
        head_bytes = [g.spec.bytes_per_head_block() for g in self.groups]
        for rank in meta.ranks:
            expected_heads = self.spec.heads_per_rank(meta.tp_size)
            if rank.kv_heads != expected_heads or len(rank.regions) != len(self.groups) or any(
                not _region_fits(r, rank.kv_heads, h) for r, h in zip(rank.regions, head_bytes)
            ):
                raise ValueError(f"remote rank {rank.tp_rank} advertises a KV region inconsistent with its spec")
            if rank.mem_type not in ("DRAM", "VRAM"):
                raise ValueError(f"remote rank {rank.tp_rank} has unknown memory type {rank.mem_type!r}")
        agents, regions = {}, {}
        for rank in meta.ranks:
            agents[rank.tp_rank] = self.agent.add_remote_agent(rank.agent_metadata)
            regions[rank.tp_rank] = [
                Region(r.base_addr, r.num_blocks, rank.kv_heads * h // r.num_layers, h // r.num_layers,
                       rank.device_id, r.num_layers, r.layer_stride)
                for r, h in zip(rank.regions, head_bytes)
            ]
        peer = Peer(meta, address, agents, regions)
        self.peers[meta.engine_id] = peer
        self.counters["handshakes"] += 1
        return peer

    def drop(self, engine_id: str) -> Peer | None:
        """Forget a peer and its NIXL agents (the caller fails its loads)."""
        peer = self.peers.pop(engine_id, None)
        if peer is None:
            return None
        for name in peer.agents.values():
            try:
                self.agent.remove_remote_agent(name)
            except Exception:
                pass
        return peer


def _region_fits(r: GroupRegion, kv_heads: int, head_bytes: int) -> bool:
    """Whether an advertised region holds exactly its blocks of `kv_heads` heads of `head_bytes`
    (all of the group's layers); split by layer, each layer's blocks within its stride."""
    if r.num_layers == 1:
        return r.region_bytes == r.num_blocks * kv_heads * head_bytes
    if r.num_layers < 1 or head_bytes % r.num_layers:
        return False
    layer_bytes = r.num_blocks * kv_heads * head_bytes // r.num_layers
    return r.layer_stride >= layer_bytes and r.region_bytes == (r.num_layers - 1) * r.layer_stride + layer_bytes
