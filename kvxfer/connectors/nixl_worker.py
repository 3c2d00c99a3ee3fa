"""NIXL connector, worker side: one agent per TP rank reading into / serving its KV tensors
(one per KV cache group).

Owns the agent, the KV registration (every rank of a prefill-capable instance registers its
region on the instance's side channel, hosted by the scheduler side, presenting the instance
secret), and the progress thread. The decode side's loads live in `nixl_loads.LoadTracker`,
the prefill side's held requests in `nixl_sends.SendTracker`.

Progress: NIXL's own progress thread spins a core per agent, so it is off; instead a light
thread per agent progresses UCX (every `_PROGRESS_BUSY_S` while it loads a request or has just
begun holding one, every `_PROGRESS_IDLE_S` otherwise, at once when a handshake or hold check
answers; never spinning) and drives the transfers as events: it posts a load's READs as soon
as its hold check is answered, sees them end, sends the ReadDone notifications, counts the
notifications a held request gets, and then wakes the engine loop (a byte on
`KVTransferConfig.event_fd`), whose next step collects what finished (`get_finished`); state
the engine sees still changes only in its steps. The trackers are shared by that thread and
the engine's calls under one lock. A peer's connection set-up also needs this side to progress
while its engine is idle. The agent runs in NIXL's strict thread-sync mode so that several
threads may call it. READs carry no notification: one would make their completion wait for
the prefill side's progress.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from kvxfer.connectors.auth import FrameAuth
from kvxfer.connectors.base import ConnectorMetadata, KVConnectorOutput, KVConnectorWorker
from kvxfer.connectors.config import KVTransferConfig
from kvxfer.connectors.descriptors import Region
from kvxfer.connectors.handshake import register_rank
from kvxfer.connectors.metadata import GroupRegion, RankMetadata, Register, compat_of, one_group
from kvxfer.connectors.nixl_loads import LoadTracker
from kvxfer.connectors.nixl_sends import SendTracker
from kvxfer.specs import KVCacheGroup

logger = logging.getLogger(__name__)

_REGISTER_TIMEOUT_S = 120.0  # ranks wait this long for the instance's side channel to come up
# Progress period while this rank loads a request or began holding one less than
# `_PROGRESS_HOLD_WINDOW_S` ago (a held request's READs complete only when this side progresses,
# and decode engines read within milliseconds of the hold), and otherwise (connection set-up by
# peers, a late reader: slower, not wrong).
_PROGRESS_BUSY_S = 0.0005
_PROGRESS_IDLE_S = 0.02
_PROGRESS_HOLD_WINDOW_S = 1.0


class NixlConnectorWorker(KVConnectorWorker):
    def __init__(
        self, config: KVTransferConfig, spec: Any, tp_rank: int, tp_size: int, model_identity: str,
        groups: tuple[KVCacheGroup, ...] | None = None, layout: str | None = None,
    ) -> None:
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

        if "NIXL_LOG_LEVEL" not in os.environ:  # NIXL logs every agent at INFO on stdout
            logging.getLogger("nixl").setLevel(logging.WARNING)
        spec.validate_tp(tp_size)
        self.config, self.spec, self.tp_rank, self.tp_size = config, spec, tp_rank, tp_size
        self.groups = groups or one_group(spec)
        self.compat = compat_of(spec, model_identity, self.groups, layout)
        self.agent_name = f"{config.engine_id}-r{tp_rank}-{uuid.uuid4().hex[:6]}"
        self.agent = nixl_agent(
            self.agent_name,
            nixl_agent_config(
                enable_prog_thread=False,
                backends=list(config.backends),
                sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
            ),
        )
        self.regions: list[Region] = []
        self._reg_descs: list[Any] = []
        self._cuda_device: int | None = None  # set for the progress thread when the cache is on CUDA
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"kv-handshake-r{tp_rank}")
        self._register_future: Future | None = None
        self.counters = {
            "transfers": 0, "failures": 0, "expired_leases": 0, "released": 0, "refused_notifications": 0,
            "handshakes": 0, "bytes": 0, "descriptors": 0,
        }
        self._kick = threading.Event()  # wakes the progress thread early (an answer came, shutdown)
        self._sends = SendTracker(spec, tp_rank, tp_size, config.lease_seconds, self.counters)
        self._loads = LoadTracker(
            self.agent, config, spec, tp_rank, tp_size, self.compat, self._pool, self.counters, self.groups,
            kick=self._kick.set,
        )
        self._lock = threading.Lock()  # the trackers: the progress thread and the engine's calls
        self._handshakes_reported = 0
        self._stop = threading.Event()
        self._progress = threading.Thread(target=self._progress_loop, name=f"kv-progress-r{tp_rank}", daemon=True)
        self._progress.start()

    @property
    def peers(self) -> dict:
        return self._loads.peers

    def _progress_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                busy = self._loads.busy() or self._sends.has_recent(_PROGRESS_HOLD_WINDOW_S)
            self._kick.wait(_PROGRESS_BUSY_S if busy else _PROGRESS_IDLE_S)
            self._kick.clear()
            if self._cuda_device is not None:  # UCX progress on VRAM needs this thread's device set
                import torch

                torch.cuda.set_device(self._cuda_device)
                self._cuda_device = None
            try:
                notifs = self.agent.get_new_notifs()
                with self._lock:
                    finished = self._loads.advance()
                    if notifs and self.config.is_producer:
                        finished |= self._sends.add_notifications([m for msgs in notifs.values() for m in msgs])
            except Exception as e:  # keep progressing; a broken agent shows up in the engine's calls
                logger.warning("NIXL progress failed: %s", e)
                continue
            if finished:
                self._wake_engine()

    def _wake_engine(self) -> None:
        """Tell the engine loop that the next step has something to collect."""
        if self.config.event_fd < 0:
            return
        try:
            os.write(self.config.event_fd, b"\x01")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups the loop has not read yet
        except OSError as e:  # the engine is shutting down
            logger.debug("waking the engine failed: %s", e)

    # --- registration ---------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: list[Any]) -> None:
        """Register this rank's KV tensor of each group once and publish them on the engine's
        side channel."""
        if len(kv_caches) != len(self.groups):
            raise ValueError(f"{len(kv_caches)} KV cache tensors for {len(self.groups)} KV cache groups")
        for kv_cache, group in zip(kv_caches, self.groups):
            expected = group.spec.block_shape(self.tp_size)
            if tuple(kv_cache.shape[1:]) != tuple(expected) or not kv_cache.is_contiguous():
                raise ValueError(
                    f"KV cache must be a contiguous (num_blocks, *{expected}) tensor, got {tuple(kv_cache.shape)}"
                )
            if str(kv_cache.dtype).removeprefix("torch.") != self.spec.dtype:
                raise ValueError(f"KV cache dtype {kv_cache.dtype} differs from the spec's {self.spec.dtype}")
        first = kv_caches[0]
        mem_type = "VRAM" if first.is_cuda else "DRAM"
        device_id = (first.device.index or 0) if first.is_cuda else 0
        if first.is_cuda:
            self._cuda_device = device_id
        self._reg_descs = [self.agent.register_memory(kv_cache) for kv_cache in kv_caches]
        regions = [
            Region(
                base_addr=kv_cache.data_ptr(),
                num_blocks=kv_cache.shape[0],
                block_bytes=group.spec.bytes_per_block(self.tp_size),
                head_bytes=group.spec.bytes_per_head_block(),
                device_id=device_id,
            )
            for kv_cache, group in zip(kv_caches, self.groups)
        ]
        self.publish_regions(regions, [c.numel() * c.element_size() for c in kv_caches], mem_type)

    def register_span(self, addr: int, nbytes: int, mem_type: str, device_id: int) -> None:
        """Register `nbytes` of memory at `addr` with this rank's agent (a KV layout other than
        kvxfer's one tensor per group, e.g. vLLM's backing buffer; `publish_regions` follows)."""
        self._reg_descs.append(self.agent.register_memory([(addr, nbytes, device_id, "")], mem_type))

    def publish_regions(self, regions: list[Region], region_bytes: list[int], mem_type: str) -> None:
        """Use `regions` (one per group, in registered memory) for loads and, on a prefill-capable
        instance, publish them on its side channel; `region_bytes[g]` is group g's span."""
        if len(regions) != len(self.groups) or len(region_bytes) != len(regions):
            raise ValueError(f"{len(regions)} KV regions for {len(self.groups)} KV cache groups")
        self.mem_type = mem_type
        device_id = regions[0].device_id
        self.regions = self._loads.regions = list(regions)
        self._loads.mem_type = self.mem_type
        for host, port in self.config.peer_addresses:  # not under the lock: it waits on the network
            self._loads.connect(host, port, self._lock)
        if not self.config.is_producer:
            return
        rank = RankMetadata(
            tp_rank=self.tp_rank,
            agent_name=self.agent_name,
            agent_metadata=self.agent.get_agent_metadata(),
            regions=[
                GroupRegion(r.base_addr, nbytes, r.num_blocks, r.num_layers, r.layer_stride)
                for r, nbytes in zip(self.regions, region_bytes)
            ],
            device_id=device_id,
            mem_type=self.mem_type,
            kv_heads=self.spec.heads_per_rank(self.tp_size),
        )
        # In the background: the scheduler side may bind the side channel after this rank gets here.
        c = self.config
        msg = Register(c.engine_id, c.instance_secret, self.compat.hash(), self.tp_size, rank)
        self._register_future = self._pool.submit(
            register_rank, c.side_channel_host, c.side_channel_port, msg, _REGISTER_TIMEOUT_S, FrameAuth(c.auth_key)
        )

    def start_load_kv(self, meta: ConnectorMetadata) -> None:
        with self._lock:
            for req in meta.recv:
                self._loads.start(req)
            for send in meta.send:
                self._sends.hold(send)
            for req_id in meta.release:
                self._sends.end(req_id, "released")
            for req_id in meta.expire:
                self._sends.end(req_id, "expired")
        if meta.recv or meta.send:
            self._kick.set()  # start progressing at the busy period now

    # --- both -----------------------------------------------------------------------------

    def get_finished(self) -> KVConnectorOutput:
        if self._register_future is not None and self._register_future.done():
            self._register_future.result()  # a rank that could not register is a startup error
            self._register_future = None
        out = KVConnectorOutput()
        with self._lock:
            self._loads.poll(out)
            handshakes = self.counters["handshakes"]
            out.handshakes, self._handshakes_reported = handshakes - self._handshakes_reported, handshakes
            if self.config.is_producer:
                self._sends.poll(out)
        return out

    def has_pending(self) -> bool:
        return self._loads.busy() or self._sends.has_pending()

    def shutdown(self) -> None:
        self._stop.set()
        self._kick.set()
        self._progress.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._loads.shutdown()
        for descs in self._reg_descs:
            self.agent.deregister_memory(descs)
        self._reg_descs = []
