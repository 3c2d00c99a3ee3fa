"""NIXL connector, decode side of a worker: the loads this rank pulls from prefill engines.

A load goes: handshake (once per remote engine, in the background, with a time-out) ->
hold check (one side-channel round trip: the prefill side confirms the request is held under
the params' token with exactly their blocks, and pins it for this rank) -> one READ per remote
rank, covering every KV cache group's blocks (each group is its own registered region) -> done:
a `ReadDone` naming the token to every prefill rank in `notify_targets`. A
refused check fails the load as a params error before anything is read. The READs must end
before the pin does: the load's deadline is the check's send time plus
`min(transfer_timeout_s, pin - PIN_MARGIN_S)`. A READ that cannot be cancelled (releasing its
handle fails) keeps the load in flight until NIXL reports the handle finished; only then is
the failure reported and may its destination blocks be reused.

Peers and handshakes are `peers.PeerTable`'s: by engine id together with the address and
instance id they were fetched from, handshaken per (engine id, address), so params naming a
known engine at another address, or another instance of it, never reach the cached peer's
memory and never hold up another request's handshake.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from kvxfer.connectors.auth import FrameAuth
from kvxfer.connectors.base import (
    KVConnectorOutput,
    KVParamsError,
    KVPeerError,
    KVTransferError,
    RecvRequest,
    TransferStats,
)
from kvxfer.connectors.config import PIN_MARGIN_S, KVTransferConfig
from kvxfer.connectors.descriptors import Region, group_read_descriptors
from kvxfer.connectors.handshake import ReqSockets, check_held
from kvxfer.connectors.metadata import Compat, Held, ReadDone, one_group
from kvxfer.connectors.peers import Peer, PeerTable
from kvxfer.specs import KVCacheGroup

logger = logging.getLogger(__name__)


@dataclass
class _Load:
    req: RecvRequest
    peer_id: str
    started: float
    check: Future | None = None  # the hold check in flight
    deadline: float = 0.0  # READs abandoned after this (inside the prefill's pin)
    handles: list[Any] = field(default_factory=list)
    dlists: list[Any] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # prefill ranks to notify when done
    error: KVTransferError | None = None  # set while cancelling: reported once the handles end
    bytes: int = 0
    descriptors: int = 0


class LoadTracker:
    def __init__(
        self, agent: Any, config: KVTransferConfig, spec: Any, tp_rank: int, tp_size: int, compat: Compat,
        pool: ThreadPoolExecutor, counters: dict[str, int], groups: tuple[KVCacheGroup, ...] | None = None,
        kick: Callable[[], None] = lambda: None,
    ) -> None:
        """`kick()` is called (on a pool thread) when a handshake or hold check answered, so that
        whoever drives `advance` (the worker's progress thread) goes on at once."""
        self.agent, self.config, self.spec = agent, config, spec
        self.groups = groups or one_group(spec)
        self.tp_rank, self.tp_size, self.compat = tp_rank, tp_size, compat
        self._pool, self.counters, self._kick = pool, counters, kick
        self._auth = FrameAuth(config.auth_key)
        self._sockets = ReqSockets()  # hold checks' answered connections to the peers
        self.regions: list[Region] = []  # this rank's pool of each group, set at registration
        self.mem_type = "DRAM"
        self._peers = PeerTable(agent, config, spec, self.groups, compat, pool, counters, kick, self._drop_peer)
        self.peers = self._peers.peers
        self._loads: dict[str, _Load] = {}
        self._failed: dict[str, KVTransferError] = {}  # failures not yet reported
        self._done: set[str] = set()
        self._stats: dict[str, TransferStats] = {}
        self._encoder = msgspec.msgpack.Encoder()

    def busy(self) -> bool:
        return bool(self._loads) or self._peers.busy()

    # --- start ----------------------------------------------------------------------------

    def start(self, req: RecvRequest) -> None:
        routed = self._peers.route(req)
        if isinstance(routed, KVTransferError):
            self._fail(req.request_id, routed)
        elif routed is not None:
            self._begin(req, routed)

    def connect(self, host: str, port: int, lock: threading.Lock) -> None:
        """A configured peer, at start (`PeerTable.connect`: the network waits outside `lock`)."""
        self._peers.connect(host, port, lock)

    def _finish_handshakes(self) -> None:
        for waiting, peer in self._peers.finished():
            for req in waiting:
                if isinstance(peer, KVTransferError):
                    self._fail(req.request_id, peer)
                else:
                    self._begin(req, peer)

    def _drop_peer(self, engine_id: str) -> None:
        """Forget a failed (or restarted) peer: its other loads fail too, and the next request
        handshakes afresh."""
        peer = self._peers.peers.get(engine_id)
        if peer is None:
            return
        self._sockets.discard(*peer.address)
        for req_id, load in list(self._loads.items()):
            if load.peer_id == engine_id and load.error is None:
                self._fail(req_id, KVPeerError(f"remote engine {engine_id!r} failed during the transfer"))
        self._peers.drop(engine_id)

    def _begin(self, req: RecvRequest, peer: Peer) -> None:
        """Check the params against the peer, then ask the prefill side to confirm the hold."""
        error = self._check_against(req, peer)
        if error is not None:
            self._fail(req.request_id, error)
            return
        load = _Load(req, peer.meta.engine_id, time.perf_counter())
        load.targets = self.spec.notify_targets(self.tp_rank, self.tp_size, peer.meta.tp_size)
        self._loads[req.request_id] = load
        # Also a full local hit (nothing to read) checks first: its ReadDone frees the hold, so
        # it must be the token's one claim, never a second one freeing blocks under another's READ.
        held = Held(
            engine_id=req.remote_engine_id, instance_id=req.remote_instance_id, request_id=req.remote_request_id,
            transfer_token=req.transfer_token, block_ids=list(req.held_block_ids), reader=self.config.engine_id,
            reader_rank=self.tp_rank, transfer_timeout_s=self.config.transfer_timeout_s, claim=req.claim,
        )
        load.check = self._pool.submit(
            check_held, req.remote_host, req.remote_port, held, self.config.handshake_timeout_s, self._auth,
            self._sockets,
        )
        load.check.add_done_callback(lambda _: self._kick())

    def _check_against(self, req: RecvRequest, peer: Peer) -> KVTransferError | None:
        meta = peer.meta
        if (req.remote_host, req.remote_port) != peer.address:
            return KVParamsError(
                f"params name engine {meta.engine_id!r} at {req.remote_host}:{req.remote_port}, but it is known at "
                f"{peer.address[0]}:{peer.address[1]} (two engines with one id?)"
            )
        if req.remote_instance_id != meta.instance_id:
            return KVParamsError(
                f"params were issued by instance {req.remote_instance_id!r} of engine {meta.engine_id!r}; "
                f"{peer.address[0]}:{peer.address[1]} serves instance {meta.instance_id!r}"
            )
        if req.remote_tp_size != meta.tp_size:
            return KVParamsError(
                f"params say remote TP {req.remote_tp_size}, engine {meta.engine_id!r} runs TP {meta.tp_size}"
            )
        # The scheduler side's own slicing: one list per group on both sides, alike long.
        if not len(req.local_block_ids) == len(req.remote_block_ids) == len(self.groups) or any(
            len(lo) != len(re) for lo, re in zip(req.local_block_ids, req.remote_block_ids)
        ):
            return KVTransferError(
                f"local blocks {list(map(len, req.local_block_ids))} per group for remote blocks "
                f"{list(map(len, req.remote_block_ids))} in {len(self.groups)} groups"
            )
        # The held blocks are the remote lists' superset (the hold check compares them exactly),
        # so checking what is read against each group's pool covers every id that reaches NIXL.
        for g, (local, remote) in enumerate(zip(req.local_block_ids, req.remote_block_ids)):
            bad = [b for b in remote if not 0 <= b < meta.num_blocks[g]]
            if bad:
                return KVParamsError(
                    f"remote block ids {bad[:8]} out of range for the peer's pool of {meta.num_blocks[g]} blocks"
                    + (f" (KV cache group {g})" if len(self.groups) > 1 else "")
                )
            bad = [b for b in local if not 0 <= b < self.regions[g].num_blocks]
            if bad:
                return KVTransferError(
                    f"local block ids {bad[:8]} out of range for this pool of {self.regions[g].num_blocks} blocks"
                )
        return None

    def _post(self, load: _Load, pin_seconds: float) -> None:
        req, peer = load.req, self.peers.get(load.peer_id)
        # Measured from before the check was sent, so it ends before the pin measured from receipt.
        load.deadline = load.started + min(self.config.transfer_timeout_s, pin_seconds - PIN_MARGIN_S)
        try:
            slices = self.spec.get_tp_transfer_slices(self.tp_rank, self.tp_size, peer.meta.tp_size)
            plan = group_read_descriptors(slices, self.regions, peer.regions, req.local_block_ids, req.remote_block_ids)
            for rank, (local, remote) in plan.items():
                self._post_read(load, peer.agents[rank], local, remote, peer.meta.ranks[rank].mem_type)
        except Exception as e:  # NIXL refuses (e.g. the peer disconnected)
            self._fail(req.request_id, KVPeerError(f"posting the KV read failed: {type(e).__name__}: {e}"), True)

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

    # --- progress -------------------------------------------------------------------------

    def advance(self) -> bool:
        """Move every load on: finished handshakes start their loads, answered hold checks post
        their READs, ended READs notify the prefill side, time-outs fail. True when a load
        finished or failed in this call (it waits in the tracker for `poll`)."""
        reported = len(self._done) + len(self._failed)
        self._finish_handshakes()
        now = time.perf_counter()
        for req_id, load in list(self._loads.items()):
            if self._loads.get(req_id) is not load:
                continue  # failed with its peer while this loop ran
            if load.error is not None:
                self._finish_cancel(load)
            elif load.check is not None:
                if load.check.done():
                    self._finish_check(load)
            else:
                self._poll_reads(load, now)
        return len(self._done) + len(self._failed) > reported

    def poll(self, out: KVConnectorOutput) -> None:
        """Advance, then hand the finished and failed loads to `out` (once each)."""
        self.advance()
        out.finished_recving, self._done = self._done, set()
        failed, self._failed = self._failed, {}
        out.failed_recving = {req_id: str(e) for req_id, e in failed.items()}
        out.failure_kinds = {req_id: e.kind for req_id, e in failed.items()}
        out.recv_stats, self._stats = self._stats, {}

    def _finish_check(self, load: _Load) -> None:
        fut, load.check = load.check, None
        try:
            pin_seconds = fut.result()
        except KVTransferError as e:  # refused (params) or no answer (peer)
            self._fail(load.req.request_id, e)
            return
        except Exception as e:
            self._fail(load.req.request_id, KVPeerError(f"checking the prefill side's hold failed: {e}"))
            return
        if not any(load.req.local_block_ids):
            self._complete(load)  # full local hit: nothing is read, only the ReadDone goes
            return
        self._post(load, pin_seconds)

    def _poll_reads(self, load: _Load, now: float) -> None:
        try:
            states = [self.agent.check_xfer_state(h) for h in load.handles]
        except Exception as e:
            states = ["ERR"]
            logger.warning("NIXL state of request %s: %s", load.req.request_id, e)
        if "ERR" in states:
            error = KVPeerError("NIXL READ failed (peer gone or memory no longer registered)")
            self._fail(load.req.request_id, error, drop_peer=True)
        elif all(s == "DONE" for s in states):
            self._complete(load)
        elif now > load.deadline:
            error = KVPeerError(f"KV READ not done after {load.deadline - load.started:.1f}s")
            self._fail(load.req.request_id, error, drop_peer=True)

    def _complete(self, load: _Load) -> None:
        req = load.req
        peer = self.peers.get(load.peer_id)
        done = ReadDone(req.remote_request_id, req.transfer_token, self.config.engine_id, self.tp_rank, self.tp_size)
        msg = self._encoder.encode(done)
        try:
            for rank in load.targets:
                self.agent.send_notif(peer.agents[rank], msg)
        except Exception as e:
            self._fail(req.request_id, KVPeerError(f"notifying the prefill side failed: {e}"), drop_peer=True)
            return
        self._release_handles(load)
        del self._loads[req.request_id]
        self._stats[req.request_id] = TransferStats(load.bytes, load.descriptors, time.perf_counter() - load.started)
        self._done.add(req.request_id)
        self.counters["transfers"] += 1
        self.counters["bytes"] += load.bytes
        self.counters["descriptors"] += load.descriptors

    def _fail(self, req_id: str, error: KVTransferError, drop_peer: bool = False) -> None:
        logger.warning("KV load of request %s failed: %s", req_id, error)
        load = self._loads.get(req_id)
        if load is not None:
            if load.check is not None:
                load.check.cancel()  # nothing was posted; its answer no longer matters
                load.check = None
            if drop_peer:
                del self._loads[req_id]  # so that dropping the peer does not fail it twice
                self._drop_peer(load.peer_id)
                self._loads[req_id] = load
            load.error = error
            if not self._release_handles(load):
                return  # a READ may still land: reported once NIXL says it ended (_finish_cancel)
            del self._loads[req_id]
        self._report_failure(req_id, error)

    def _finish_cancel(self, load: _Load) -> None:
        try:
            states = [self.agent.check_xfer_state(h) for h in load.handles]
        except Exception:
            states = ["ERR"]
        if "PROC" in states or not self._release_handles(load):
            return
        del self._loads[load.req.request_id]
        self._report_failure(load.req.request_id, load.error)

    def _report_failure(self, req_id: str, error: KVTransferError) -> None:
        self._failed[req_id] = error
        self.counters["failures"] += 1

    def _release_handles(self, load: _Load) -> bool:
        """Release (and so cancel) the load's handles; False when one could not be released yet
        (an in-flight READ whose abort is still running): it stays in the load to retry."""
        kept = []
        for h in load.handles:
            try:
                h.release()
            except Exception as e:
                logger.warning("releasing a NIXL READ of request %s failed: %s", load.req.request_id, e)
                kept.append(h)
        load.handles = kept
        if kept:
            return False
        for h in load.dlists:
            try:
                h.release()
            except Exception as e:
                logger.error("releasing a NIXL descriptor list of request %s failed: %s", load.req.request_id, e)
        load.dlists.clear()
        return True

    def shutdown(self) -> None:
        """Fail every load; the agent is torn down next, which ends any READ still in flight."""
        for req_id, load in list(self._loads.items()):
            self._release_handles(load)
            self._loads.pop(req_id, None)
            self._report_failure(req_id, KVTransferError("connector shut down"))
        for engine_id in list(self._peers.peers):
            self._drop_peer(engine_id)
        self._sockets.close()
