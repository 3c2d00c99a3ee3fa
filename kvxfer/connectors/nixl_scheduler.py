"""NIXL connector, scheduler side: which requests load or hold KV, and the one table of holds.

Decode: a request with `do_remote_prefill` starts with the prefill's first token (t1) as its
first output and loads its whole prompt (positions 0 .. N-1) minus what the local prefix cache
already holds; it then computes position N (t1) here and samples t2. Only the uncached suffix
blocks, owned by this request alone, are read; per KV cache group, and for a sliding-window
group only the blocks inside the window that position N sees. A full local hit still sends a
notify-only load, so the prefill side frees its blocks.

Prefill: a finished `do_remote_decode` request is held under a fresh transfer token (128
random bits) with its exact block ids; the params name the token. This table, in the engine
process, is the only place that decides about holds, for all ranks alike: it answers the side
channel's `Held` checks (which it hosts), pins a verified hold for its reader until the pin
deadline it states, expires unpinned holds at their lease (`ConnectorMetadata.expire`) and
releases on request (`release`, deferred while pinned). A hold is forgotten when every rank
reports it finished, so "held" is answered only for what is held now.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kvxfer.connectors.auth import FrameAuth
from kvxfer.connectors.base import (
    ConnectorMetadata,
    KVConnectorOutput,
    KVConnectorScheduler,
    KVParamsError,
    RecvRequest,
    SendRequest,
)
from kvxfer.connectors.config import PIN_MARGIN_S, KVTransferConfig, lease_fit_error
from kvxfer.connectors.handshake import HandshakeServer
from kvxfer.connectors.metadata import (
    Held,
    RemoteDecodeParams,
    RemotePrefillParams,
    Reply,
    compat_of,
    held_entries,
    one_group,
    split_held,
)
from kvxfer.specs import KVCacheGroup

logger = logging.getLogger(__name__)


@dataclass
class _Hold:
    token: str
    block_ids: list[int]
    deadline: float  # lease end, time.monotonic()
    pins: dict[tuple[str, int], float] = field(default_factory=dict)  # reader -> pin end
    release: bool = False  # asked to release; done once no pin is live
    ended: bool = False  # release or expiry sent to the ranks: no new pins

    def pinned_until(self) -> float:
        return max(self.pins.values(), default=0.0)


class NixlConnectorScheduler(KVConnectorScheduler):
    def __init__(
        self, config: KVTransferConfig, spec: Any, tp_size: int, model_identity: str,
        groups: tuple[KVCacheGroup, ...] | None = None,
    ) -> None:
        self.config = config
        self.block_size = spec.block_size
        self.groups = groups or one_group(spec)
        self.tp_size = tp_size
        self._recv: list[RecvRequest] = []
        self._send: list[SendRequest] = []
        self._holds: dict[str, _Hold] = {}
        self._lock = threading.Lock()  # the side channel's thread checks holds too
        self.counters = {
            "transfers": 0,
            "failures": 0,
            "expired_leases": 0,
            "released": 0,
            "sends_completed": 0,
            "refused_checks": 0,  # hold checks for what is not held so (token, blocks, instance, ended)
            "refused_releases": 0,  # releases naming a wrong, stale or missing token
            "refused_notifications": 0,  # ReadDones with a wrong token, summed over the ranks
            "handshakes": 0,  # peer handshakes of this engine's ranks (at start with `peers`, else lazily)
            "bytes": 0,
            "descriptors": 0,
            "seconds": 0.0,
        }
        self.server: HandshakeServer | None = None
        if config.is_producer:
            self.server = HandshakeServer(
                config.side_channel_host, config.side_channel_port, config.engine_id, config.instance_id,
                config.instance_secret, tp_size, compat_of(spec, model_identity, self.groups), config.lease_seconds,
                FrameAuth(config.auth_key), self._check_hold,
            )

    # --- decode side ----------------------------------------------------------------------

    def check_new_request(self, request: Any) -> None:
        params = request.kv_transfer_params
        if isinstance(params, RemoteDecodeParams) and not self.config.is_producer:
            raise KVParamsError(f"kv_transfer_params: do_remote_decode, but this engine's KV role is "
                                f"{self.config.role!r}")
        if not isinstance(params, RemotePrefillParams):
            return
        if not self.config.is_consumer:
            raise KVParamsError(f"kv_transfer_params: do_remote_prefill, but this engine's KV role is "
                                f"{self.config.role!r}: it cannot load remote KV")
        if params.remote_num_tokens != request.num_prompt_tokens:
            raise KVParamsError(
                f"kv_transfer_params: remote_num_tokens says a prompt of {params.remote_num_tokens} tokens, this "
                f"request has {request.num_prompt_tokens} (the params belong to another prompt)"
            )
        split_held(self.groups, params.remote_num_tokens, params.remote_block_ids)
        if request.sampling_params.logprobs is not None:
            entry = params.first_token_logprobs
            if entry is None or params.first_token_id not in {t for t, _ in entry}:
                raise KVParamsError("kv_transfer_params: first_token_logprobs must hold first_token_id's log-prob "
                                    "when the request asks for logprobs")

    def get_num_new_matched_tokens(self, request: Any, num_local_computed_tokens: int) -> int:
        if not isinstance(request.kv_transfer_params, RemotePrefillParams):
            return 0
        return max(request.num_prompt_tokens - num_local_computed_tokens, 0)

    def update_state_after_alloc(
        self, request: Any, block_tables: list[list[int]], num_local_computed_tokens: int, num_external_tokens: int
    ) -> None:
        params = request.kv_transfer_params
        if not isinstance(params, RemotePrefillParams):
            return
        held = split_held(self.groups, params.remote_num_tokens, params.remote_block_ids)
        entries = held_entries(self.groups, params.remote_num_tokens)
        received = num_local_computed_tokens + num_external_tokens
        local, remote = [], []
        for group, table, ids, entry in zip(self.groups, block_tables, held, entries):
            # Entries past the local prefix hit that the next position's window still reads.
            reads = group.spec.blocks_to_read(received) if num_external_tokens else range(0)
            first = max(reads.start, num_local_computed_tokens // self.block_size)
            local.append(list(table[first : reads.stop]))
            remote.append(list(ids[first - entry.start : reads.stop - entry.start]))
        self._recv.append(
            RecvRequest(
                request_id=request.request_id,
                remote_request_id=params.remote_request_id,
                remote_engine_id=params.remote_engine_id,
                remote_instance_id=params.remote_instance_id,
                remote_host=params.remote_host,
                remote_port=params.remote_port,
                remote_tp_size=params.remote_tp_size,
                transfer_token=params.transfer_token,
                held_block_ids=list(params.remote_block_ids),
                local_block_ids=local,
                remote_block_ids=remote,
            )
        )

    # --- prefill side: the hold table -----------------------------------------------------

    def request_finished(self, request: Any, block_tables: list[list[int]]) -> tuple[bool, dict | None]:
        wants_decode = isinstance(request.kv_transfer_params, RemoteDecodeParams)
        if not (wants_decode and self.config.is_producer and request.finish_reason in ("stop", "length")):
            return False, None
        entries = held_entries(self.groups, request.num_prompt_tokens)
        held = [b for table, entry in zip(block_tables, entries) for b in table[entry.start : entry.stop]]
        if not held:
            return False, None
        first_logprobs = sorted(request.logprobs[0].items(), key=lambda x: -x[1]) if request.logprobs else None
        try:
            params = self.hold(request.request_id, held, request.num_prompt_tokens, request.output_token_ids[0],
                               first_logprobs)
        except ValueError as e:  # the engine let an id still held run again: never merge two holds
            logger.error("%s; its blocks are freed without a hold", e)
            return False, None
        return True, msgspec.to_builtins(params)

    def hold(
        self, request_id: str, block_ids: list[int], num_tokens: int, first_token_id: int,
        first_token_logprobs: list[tuple[int, float]] | None = None,
    ) -> RemotePrefillParams:
        """Hold `block_ids` for a remote reader under a fresh token; the params name them and the
        first token sampled from the prompt (with its log-prob entry, best first, when asked)."""
        token = secrets.token_hex(16)
        with self._lock:
            if request_id in self._holds:  # the engine refuses ids still held (RequestIdInUse)
                raise ValueError(f"request id {request_id!r} is already held for a remote reader")
            self._holds[request_id] = _Hold(token, list(block_ids), time.monotonic() + self.config.lease_seconds)
        self._send.append(SendRequest(request_id, token))
        c = self.config
        return RemotePrefillParams(
            True, c.engine_id, c.instance_id, c.side_channel_host, c.side_channel_port, list(block_ids),
            request_id, self.tp_size, num_tokens, token, first_token_id, first_token_logprobs,
        )

    def _check_hold(self, msg: Held) -> Reply:
        """Side-channel thread: confirm and pin a hold, or refuse (counted)."""
        now = time.monotonic()
        with self._lock:
            hold = self._holds.get(msg.request_id)
            if msg.instance_id != self.config.instance_id:
                error = (
                    f"the params were issued by instance {msg.instance_id!r} of engine {self.config.engine_id!r}; "
                    f"this side channel serves instance {self.config.instance_id!r} (restarted, or two engines "
                    f"with one id)"
                )
            elif hold is None or not hmac.compare_digest(hold.token, msg.transfer_token):
                error = f"request {msg.request_id!r} is not held by engine {self.config.engine_id!r} under this token"
            elif hold.block_ids != msg.block_ids:
                error = f"request {msg.request_id!r} is held with other blocks than the params name"
            elif hold.ended or hold.release or (now >= hold.deadline and now >= hold.pinned_until()):
                error = f"request {msg.request_id!r} is no longer held by engine {self.config.engine_id!r} " \
                        f"(released or lease expired)"
            else:
                error = lease_fit_error(msg.transfer_timeout_s, self.config.lease_seconds)
            if error is not None:
                self.counters["refused_checks"] += 1
                return Reply(ok=False, error=error)
            pin_s = msg.transfer_timeout_s + PIN_MARGIN_S
            key = (msg.reader, msg.reader_rank)
            hold.pins[key] = max(hold.pins.get(key, 0.0), now + pin_s)
            return Reply(ok=True, pin_seconds=pin_s)

    def release_request(self, request_id: str, transfer_token: str | None) -> bool:
        with self._lock:
            hold = self._holds.get(request_id)
            if hold is None or transfer_token is None or not hmac.compare_digest(hold.token, transfer_token):
                self.counters["refused_releases"] += 1
                return False
            if hold.ended:  # its own token, once more: already ending by release or lease, nothing forged
                return False
            hold.release = True
            return True

    def build_connector_meta(self, scheduler_output: Any) -> ConnectorMetadata:
        meta = ConnectorMetadata(recv=self._recv, send=self._send)
        self._recv, self._send = [], []
        now = time.monotonic()
        with self._lock:
            for request_id, hold in self._holds.items():
                if hold.ended or now < hold.pinned_until():
                    continue
                if hold.release:
                    meta.release.append(request_id)
                elif now >= hold.deadline:
                    meta.expire.append(request_id)
                else:
                    continue
                hold.ended = True
        return meta

    def is_held(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._holds

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        c = self.counters
        for stats in output.recv_stats.values():
            if stats.bytes:  # notify-only loads (full local hits) move nothing
                c["transfers"] += 1
                c["bytes"] += stats.bytes
                c["descriptors"] += stats.descriptors
                c["seconds"] += stats.seconds
        c["failures"] += len(output.failed_recving)
        c["refused_notifications"] += output.refused_notifications
        c["handshakes"] += output.handshakes
        c["expired_leases"] += len(output.expired_sending)
        c["released"] += len(output.released_sending)
        c["sends_completed"] += len(output.finished_sending - output.expired_sending - output.released_sending)
        with self._lock:
            for request_id in output.finished_sending:
                self._holds.pop(request_id, None)

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {**self.counters, "held_requests": len(self._holds)}

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
