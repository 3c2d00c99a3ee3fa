"""NIXL connector, scheduler side: which requests load or hold KV, and the one table of holds.

Decode: a request with `do_remote_prefill` starts with the prefill's first token (t1) as its
first output and loads its whole prompt (positions 0 .. N-1) minus what the local prefix cache
already holds; it then computes position N (t1) here and samples t2. Only the uncached suffix
blocks, owned by this request alone, are read; per KV cache group, and for a sliding-window
group only the blocks inside the window that position N sees. A full local hit still sends a
notify-only load, so the prefill side frees its blocks.

A decode request aborted before its load was sent to the ranks tells the prefill side at once
(`Releaser`: a signed `Release` under the token), so the hold does not wait for its lease;
unless this engine already sent a load under that token (`_loaded_tokens`): then the hold's end
is that load's (its ReadDone, or the lease after a refused or failed one). vLLM's serving layer
re-submits a failed request's params as a pre-aborted request "to free the prefill's blocks";
releasing there let params with the genuine token but other blocks end the genuine hold.

Prefill: a finished `do_remote_decode` request is held under a fresh transfer token (128
random bits) with its exact block ids; the params name the token. Its `holds.HoldTable`, in
the engine process, is the only place that decides about holds, for all ranks alike: it
answers the side channel's `Held` checks and `Release`s (the side channel is hosted here),
expires unpinned holds at their lease (`ConnectorMetadata.expire`) and releases on request
(`release`, deferred while pinned). A hold is forgotten when every rank reports it finished.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
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
from kvxfer.connectors.config import KVTransferConfig
from kvxfer.connectors.handshake import HandshakeServer, Releaser
from kvxfer.connectors.holds import HoldTable
from kvxfer.connectors.metadata import (
    Release,
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
# Transfer tokens this decode engine sent a load under, newest last; enough for minutes of loads.
LOADED_TOKEN_MEMORY = 4096


class NixlConnectorScheduler(KVConnectorScheduler):
    def __init__(
        self, config: KVTransferConfig, spec: Any, tp_size: int, model_identity: str,
        groups: tuple[KVCacheGroup, ...] | None = None, layout: str | None = None,
    ) -> None:
        self.config = config
        self.block_size = spec.block_size
        self.groups = groups or one_group(spec)
        self.tp_size = tp_size
        self._recv: list[RecvRequest] = []
        self._send: list[SendRequest] = []
        self._sent: set[str] = set()  # decode: unfinished requests whose load went to the ranks
        self._loaded_tokens: OrderedDict[str, None] = OrderedDict()  # decode: tokens loaded under
        self._releaser: Releaser | None = Releaser(
            config.handshake_timeout_s, FrameAuth(config.auth_key)) if config.is_consumer else None
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
        # The side channel's thread checks and releases holds too: the table has its own lock.
        self.holds = HoldTable(config.engine_id, config.instance_id, config.lease_seconds, self.counters)
        self.server: HandshakeServer | None = None
        if config.is_producer:
            self.server = HandshakeServer(
                config.side_channel_host, config.side_channel_port, config.engine_id, config.instance_id,
                config.instance_secret, tp_size, compat_of(spec, model_identity, self.groups, layout), config.lease_seconds,
                FrameAuth(config.auth_key), self.holds.check, self._released_by_reader,
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
        if not self.config.peer_allowed(params.remote_host, params.remote_port):
            raise KVParamsError(
                f"kv_transfer_params: remote_host:remote_port {params.remote_host}:{params.remote_port} is not a side "
                f"channel this engine may connect to (--kv-allowed-peers)"
            )
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
        self._sent.add(request.request_id)
        self._loaded_tokens[params.transfer_token] = None
        self._loaded_tokens.move_to_end(params.transfer_token)
        while len(self._loaded_tokens) > LOADED_TOKEN_MEMORY:
            self._loaded_tokens.popitem(last=False)

    # --- prefill side: the hold table -----------------------------------------------------

    def request_finished(self, request: Any, block_tables: list[list[int]]) -> tuple[bool, dict | None]:
        params = request.kv_transfer_params
        sent = request.request_id in self._sent
        self._sent.discard(request.request_id)
        if isinstance(params, RemotePrefillParams) and not sent and request.finish_reason == "abort" \
                and self._releaser is not None and params.transfer_token not in self._loaded_tokens:
            # Ended before its pull was sent to the ranks: nobody here will read the prefill's
            # hold, so release it now rather than leave it to the lease. (A load already sent,
            # by this request or another with the token, runs to its end and its ReadDone frees
            # the hold; a refused one leaves the hold to its rightful reader.)
            self._releaser.release(params)
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
        token = self.holds.add(request_id, block_ids)
        self._send.append(SendRequest(request_id, token))
        c = self.config
        return RemotePrefillParams(
            True, c.engine_id, c.instance_id, c.side_channel_host, c.side_channel_port, list(block_ids),
            request_id, self.tp_size, num_tokens, token, first_token_id, first_token_logprobs,
        )

    def release_request(self, request_id: str, transfer_token: str | None) -> bool:
        return self.holds.release(request_id, transfer_token)

    def _released_by_reader(self, msg: Release) -> Reply:
        """Side-channel thread: a decode engine's request ended before its pull."""
        if msg.instance_id != self.config.instance_id:
            return Reply(ok=False, error=f"instance {msg.instance_id!r} is not this start of {self.config.engine_id!r}")
        if self.holds.release(msg.request_id, msg.transfer_token):
            return Reply(ok=True)
        return Reply(ok=False, error=f"request {msg.request_id!r} is not held under this token (nothing released)")

    def build_connector_meta(self, scheduler_output: Any) -> ConnectorMetadata:
        meta = ConnectorMetadata(recv=self._recv, send=self._send)
        self._recv, self._send = [], []
        meta.release, meta.expire = self.holds.due()
        return meta

    def is_held(self, request_id: str) -> bool:
        return self.holds.is_held(request_id)

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
        self.holds.forget(output.finished_sending)

    def stats(self) -> dict[str, float]:
        return {**self.counters, "held_requests": len(self.holds)}

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if self._releaser is not None:
            self._releaser.close()
            self._releaser = None
