"""NIXL connector, worker side: one agent per TP rank reading into / serving its KV tensor.

Owns the agent, the KV registration and side channel (rank 0 serves it, the others register),
the progress thread, and the decode side's loads: lazy handshake per remote engine (background
thread, time-out), slices -> descriptors -> one READ per remote rank, polling, a check on the
prefill side channel that the request was not given up meanwhile (so blocks freed and reused
under a READ are never reported as loaded), then a `ReadDone` notification to every prefill
rank in `notify_targets`. The prefill side's held requests live in `nixl_sends.SendTracker`.

Progress: NIXL's own progress thread spins a core per agent, so it is off; instead a light
thread per agent drains notifications (every millisecond while busy), which also progresses
UCX: a peer's connection set-up needs this side to progress even while its engine is idle. The agent runs
in NIXL's strict thread-sync mode so that thread and the caller's may both call it. READs
carry no notification: one would make their completion wait for the prefill side's progress.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from kvxfer.connectors.base import (
    ConnectorMetadata,
    KVConnectorOutput,
    KVConnectorWorker,
    KVParamsError,
    KVPeerError,
    KVTransferError,
    RecvRequest,
    TransferStats,
)
from kvxfer.connectors.config import KVTransferConfig
from kvxfer.connectors.descriptors import Region, read_descriptors
from kvxfer.connectors.handshake import HandshakeServer, check_held, fetch_engine_metadata, register_rank
from kvxfer.connectors.metadata import EngineMetadata, RankMetadata, ReadDone, Register, compat_of
from kvxfer.connectors.nixl_sends import SendTracker

logger = logging.getLogger(__name__)

_REGISTER_TIMEOUT_S = 120.0  # other ranks wait this long for rank 0's side channel to come up
# Progress every millisecond while this rank holds or loads a request, else every 20 ms.
_PROGRESS_BUSY_S = 0.001
_PROGRESS_IDLE_S = 0.02


@dataclass
class Peer:
    meta: EngineMetadata
    agents: dict[int, str]  # remote rank -> NIXL agent name
    regions: dict[int, Region]


@dataclass
class _Load:
    req: RecvRequest
    peer_id: str
    started: float
    handles: list[Any] = field(default_factory=list)
    dlists: list[Any] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # prefill ranks to notify when done
    check: Future | None = None  # READs done; is the request still held on the prefill side?
    bytes: int = 0
    descriptors: int = 0


class NixlConnectorWorker(KVConnectorWorker):
    def __init__(
        self, config: KVTransferConfig, spec: Any, tp_rank: int, tp_size: int, model_identity: str
    ) -> None:
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

        if "NIXL_LOG_LEVEL" not in os.environ:  # NIXL logs every agent at INFO on stdout
            logging.getLogger("nixl").setLevel(logging.WARNING)
        spec.validate_tp(tp_size)
        self.config, self.spec, self.tp_rank, self.tp_size = config, spec, tp_rank, tp_size
        self.compat = compat_of(spec, model_identity)
        self.agent_name = f"{config.engine_id}-r{tp_rank}-{uuid.uuid4().hex[:6]}"
        self.agent = nixl_agent(
            self.agent_name,
            nixl_agent_config(
                enable_prog_thread=False,
                backends=list(config.backends),
                sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
            ),
        )
        self.region: Region | None = None
        self.mem_type = "DRAM"
        self._reg_descs = None
        self._server: HandshakeServer | None = None
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"kv-handshake-r{tp_rank}")
        self._register_future: Future | None = None
        self._handshakes: dict[str, Future] = {}
        self.peers: dict[str, Peer] = {}
        self._waiting: dict[str, list[RecvRequest]] = {}  # remote engine -> loads awaiting its handshake
        self._loads: dict[str, _Load] = {}
        self._failed: dict[str, KVTransferError] = {}  # failures not yet reported
        self._done: set[str] = set()
        self._stats: dict[str, TransferStats] = {}
        self.counters = {
            "transfers": 0, "failures": 0, "expired_leases": 0, "released": 0, "bytes": 0, "descriptors": 0,
        }
        self._sends = SendTracker(spec, tp_rank, tp_size, config.lease_seconds, self.counters)
        self._notif_encoder = msgspec.msgpack.Encoder()
        self._inbox: list[bytes] = []
        self._inbox_lock = threading.Lock()
        self._stop = threading.Event()
        self._progress = threading.Thread(target=self._progress_loop, name=f"kv-progress-r{tp_rank}", daemon=True)
        self._progress.start()

    def _progress_loop(self) -> None:
        while not self._stop.wait(_PROGRESS_BUSY_S if self._sends.has_pending() or self._loads else _PROGRESS_IDLE_S):
            try:
                notifs = self.agent.get_new_notifs()
            except Exception as e:  # keep progressing; a broken agent shows up in the caller's calls
                logger.warning("NIXL progress failed: %s", e)
                continue
            if notifs:
                with self._inbox_lock:
                    for msgs in notifs.values():
                        self._inbox.extend(msgs)

    # --- registration ---------------------------------------------------------------------

    def register_kv_cache(self, kv_cache: Any) -> None:
        """Register this rank's KV tensor once and publish it on the engine's side channel."""
        expected = self.spec.block_shape(self.tp_size)
        if tuple(kv_cache.shape[1:]) != tuple(expected) or not kv_cache.is_contiguous():
            raise ValueError(
                f"KV cache must be a contiguous (num_blocks, *{expected}) tensor, got {tuple(kv_cache.shape)}"
            )
        if str(kv_cache.dtype).removeprefix("torch.") != self.spec.dtype:
            raise ValueError(f"KV cache dtype {kv_cache.dtype} differs from the spec's {self.spec.dtype}")
        self.mem_type = "VRAM" if kv_cache.is_cuda else "DRAM"
        device_id = (kv_cache.device.index or 0) if kv_cache.is_cuda else 0
        self._reg_descs = self.agent.register_memory(kv_cache)
        self.region = Region(
            base_addr=kv_cache.data_ptr(),
            num_blocks=kv_cache.shape[0],
            block_bytes=self.spec.bytes_per_block(self.tp_size),
            head_bytes=self.spec.bytes_per_head_block(),
            device_id=device_id,
        )
        if not self.config.is_producer:
            return
        rank = RankMetadata(
            tp_rank=self.tp_rank,
            agent_name=self.agent_name,
            agent_metadata=self.agent.get_agent_metadata(),
            base_addr=self.region.base_addr,
            region_bytes=kv_cache.numel() * kv_cache.element_size(),
            device_id=device_id,
            mem_type=self.mem_type,
            num_blocks=self.region.num_blocks,
            kv_heads=self.spec.heads_per_rank(self.tp_size),
        )
        host, port = self.config.side_channel_host, self.config.side_channel_port
        if self.tp_rank == 0:
            self._server = HandshakeServer(
                host, port, self.config.engine_id, self.tp_size, self.compat, self._sends.is_given_up
            )
            self._server.add_rank(rank)
        else:
            # In the background: rank 0 may bind its side channel after this rank gets here.
            msg = Register(self.config.engine_id, self.compat.hash(), self.tp_size, rank)
            self._register_future = self._pool.submit(register_rank, host, port, msg, _REGISTER_TIMEOUT_S)

    # --- decode side ----------------------------------------------------------------------

    def start_load_kv(self, meta: ConnectorMetadata) -> None:
        for req in meta.recv:
            self._start_load(req)
        for send in meta.send:
            self._sends.hold(send.request_id, send.deadline)
        for req_id in meta.release:
            self._sends.release(req_id)

    def _start_load(self, req: RecvRequest) -> None:
        if req.error:
            self._fail(req.request_id, KVParamsError(req.error))
            return
        peer = self.peers.get(req.remote_engine_id)
        if peer is not None:
            self._post(req, peer)
            return
        self._waiting.setdefault(req.remote_engine_id, []).append(req)
        if req.remote_engine_id not in self._handshakes:
            self._handshakes[req.remote_engine_id] = self._pool.submit(
                fetch_engine_metadata,
                req.remote_host,
                req.remote_port,
                req.remote_engine_id,
                self.compat,
                self.config.handshake_timeout_s,
            )

    def _finish_handshakes(self) -> None:
        for engine_id, fut in list(self._handshakes.items()):
            if not fut.done():
                continue
            del self._handshakes[engine_id]
            waiting = self._waiting.pop(engine_id, [])
            try:
                peer = self._add_peer(fut.result())
            except KVTransferError as e:  # time-out, dead port (peer); unknown engine, incompatible (params)
                for req in waiting:
                    self._fail(req.request_id, e)
                continue
            except Exception as e:  # NIXL refusing its metadata, an inconsistent region
                for req in waiting:
                    self._fail(req.request_id, KVPeerError(f"KV handshake with {req.remote_host}:{req.remote_port} failed: {e}"))
                continue
            for req in waiting:
                self._post(req, peer)

    def _add_peer(self, meta: EngineMetadata) -> Peer:
        head_bytes = self.spec.bytes_per_head_block()
        agents, regions = {}, {}
        for rank in meta.ranks:
            block_bytes = rank.kv_heads * head_bytes
            expected_heads = self.spec.heads_per_rank(meta.tp_size)
            if rank.kv_heads != expected_heads or rank.region_bytes != rank.num_blocks * block_bytes:
                raise ValueError(f"remote rank {rank.tp_rank} advertises a KV region inconsistent with its spec")
            if rank.mem_type not in ("DRAM", "VRAM"):
                raise ValueError(f"remote rank {rank.tp_rank} has unknown memory type {rank.mem_type!r}")
            agents[rank.tp_rank] = self.agent.add_remote_agent(rank.agent_metadata)
            regions[rank.tp_rank] = Region(rank.base_addr, rank.num_blocks, block_bytes, head_bytes, rank.device_id)
        peer = Peer(meta, agents, regions)
        self.peers[meta.engine_id] = peer
        return peer

    def _drop_peer(self, engine_id: str) -> None:
        """Forget a failed peer (its other loads fail too), so the next request handshakes afresh."""
        peer = self.peers.pop(engine_id, None)
        if peer is None:
            return
        for req_id, load in list(self._loads.items()):
            if load.peer_id == engine_id:
                self._fail(req_id, KVPeerError(f"remote engine {engine_id!r} failed during the transfer"))
        for name in peer.agents.values():
            try:
                self.agent.remove_remote_agent(name)
            except Exception:
                pass

    def _post(self, req: RecvRequest, peer: Peer) -> None:
        load = _Load(req, peer.meta.engine_id, time.perf_counter())
        meta = peer.meta
        error = self._check_load(req, meta)
        if error is not None:
            self._fail(req.request_id, error)
            return
        self._loads[req.request_id] = load
        load.targets = self.spec.notify_targets(self.tp_rank, self.tp_size, meta.tp_size)
        try:
            if req.local_block_ids:
                slices = self.spec.get_tp_transfer_slices(self.tp_rank, self.tp_size, meta.tp_size)
                plan = read_descriptors(slices, self.region, peer.regions, req.local_block_ids, req.remote_block_ids)
                for rank, (local, remote) in plan.items():
                    self._post_read(load, peer.agents[rank], local, remote, peer.meta.ranks[rank].mem_type)
        except Exception as e:  # NIXL refuses (e.g. the peer disconnected)
            error = KVPeerError(f"posting the KV read failed: {type(e).__name__}: {e}")
            self._fail(req.request_id, error, drop_peer=True)

    def _check_load(self, req: RecvRequest, meta: EngineMetadata) -> KVTransferError | None:
        if req.remote_tp_size != meta.tp_size:
            return KVParamsError(
                f"params say remote TP {req.remote_tp_size}, engine {meta.engine_id!r} runs TP {meta.tp_size}"
            )
        bad = [b for b in req.remote_block_ids if not 0 <= b < meta.num_blocks]
        if bad:
            return KVParamsError(
                f"remote block ids {bad[:8]} out of range for the peer's pool of {meta.num_blocks} blocks"
            )
        if len(req.local_block_ids) != len(req.remote_block_ids):  # the scheduler side's own slicing
            return KVTransferError(f"{len(req.local_block_ids)} local blocks for {len(req.remote_block_ids)} remote blocks")
        bad = [b for b in req.local_block_ids if not 0 <= b < self.region.num_blocks]
        if bad:
            return KVTransferError(
                f"local block ids {bad[:8]} out of range for this pool of {self.region.num_blocks} blocks"
            )
        return None

    def _post_read(self, load: _Load, agent: str, local: np.ndarray, remote: np.ndarray, remote_mem: str) -> None:
        local_h = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", local, self.mem_type)
        load.dlists.append(local_h)
        remote_h = self.agent.prep_xfer_dlist(agent, remote, remote_mem)
        load.dlists.append(remote_h)
        idx = np.arange(len(local), dtype=np.int32)
        handle = self.agent.make_prepped_xfer("READ", local_h, idx, remote_h, idx)
        load.handles.append(handle)
        if self.agent.transfer(handle) == "ERR":
            raise RuntimeError(f"NIXL refused the READ from {agent}")
        load.bytes += int(local[:, 1].sum())
        load.descriptors += len(local)

    def _poll_loads(self) -> None:
        now = time.perf_counter()
        for req_id, load in list(self._loads.items()):
            if req_id not in self._loads:
                continue  # failed with its peer while this loop ran
            if load.check is not None:
                if load.check.done():
                    self._finish_check(load)
                continue
            try:
                states = [self.agent.check_xfer_state(h) for h in load.handles]
            except Exception as e:
                states = ["ERR"]
                logger.warning("NIXL state of request %s: %s", req_id, e)
            if "ERR" in states:
                error = KVPeerError("NIXL READ failed (peer gone or memory no longer registered)")
                self._fail(req_id, error, drop_peer=True)
            elif now - load.started > self.config.transfer_timeout_s:
                error = KVPeerError(f"KV READ not done after {self.config.transfer_timeout_s:.1f}s")
                self._fail(req_id, error, drop_peer=True)
            elif all(s == "DONE" for s in states):
                if load.handles:
                    req = load.req
                    load.check = self._pool.submit(
                        check_held, req.remote_host, req.remote_port, req.remote_engine_id,
                        req.remote_request_id, self.config.handshake_timeout_s,
                    )
                else:
                    self._complete(load)  # nothing read: only notify

    def _finish_check(self, load: _Load) -> None:
        try:
            load.check.result()
        except KVTransferError as e:  # given up (released, lease expired) or no answer
            self._fail(load.req.request_id, e)
            return
        except Exception as e:
            self._fail(load.req.request_id, KVPeerError(f"checking the prefill side's hold failed: {e}"))
            return
        self._complete(load)

    def _complete(self, load: _Load) -> None:
        req = load.req
        peer = self.peers.get(load.peer_id)
        done = ReadDone(req.remote_request_id, self.config.engine_id, self.tp_rank, self.tp_size)
        msg = self._notif_encoder.encode(done)
        try:
            for rank in load.targets:
                self.agent.send_notif(peer.agents[rank], msg)
        except Exception as e:
            self._fail(req.request_id, KVPeerError(f"notifying the prefill side failed: {e}"), drop_peer=True)
            return
        self._release(load)
        del self._loads[req.request_id]
        seconds = time.perf_counter() - load.started
        self._stats[req.request_id] = TransferStats(load.bytes, load.descriptors, seconds)
        self._done.add(req.request_id)
        self.counters["transfers"] += 1
        self.counters["bytes"] += load.bytes
        self.counters["descriptors"] += load.descriptors

    def _fail(self, req_id: str, error: KVTransferError, drop_peer: bool = False) -> None:
        logger.warning("KV load of request %s failed: %s", req_id, error)
        load = self._loads.pop(req_id, None)
        if load is not None:
            self._release(load)
            if drop_peer:
                self._drop_peer(load.peer_id)
        self._failed[req_id] = error
        self.counters["failures"] += 1

    def _release(self, load: _Load) -> None:
        # Releasing an in-flight handle cancels it: no READ lands in blocks reported done or failed.
        for h in load.handles + load.dlists:
            try:
                h.release()
            except Exception as e:
                logger.error("releasing a NIXL handle of request %s failed: %s", load.req.request_id, e)
        load.handles.clear()
        load.dlists.clear()

    # --- both -----------------------------------------------------------------------------

    def get_finished(self) -> KVConnectorOutput:
        if self._register_future is not None and self._register_future.done():
            self._register_future.result()  # a rank that could not register is a startup error
            self._register_future = None
        self._finish_handshakes()
        self._poll_loads()
        out = KVConnectorOutput()
        if self.config.is_producer:
            with self._inbox_lock:
                inbox, self._inbox = self._inbox, []
            self._sends.add_notifications(inbox)
            self._sends.poll(out)
        out.finished_recving, self._done = self._done, set()
        failed, self._failed = self._failed, {}
        out.failed_recving = {req_id: str(e) for req_id, e in failed.items()}
        out.failure_kinds = {req_id: e.kind for req_id, e in failed.items()}
        out.recv_stats, self._stats = self._stats, {}
        return out

    def has_pending(self) -> bool:
        return bool(self._loads or self._waiting or self._sends.has_pending())

    def shutdown(self) -> None:
        for req_id in list(self._loads):
            self._fail(req_id, KVTransferError("connector shut down"))
        self._stop.set()
        self._progress.join(timeout=5)
        if self._server is not None:
            self._server.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for engine_id in list(self.peers):
            self._drop_peer(engine_id)
        if self._reg_descs is not None:
            self.agent.deregister_memory(self._reg_descs)
            self._reg_descs = None
