"""NIXL connector, scheduler side: which requests load or hold KV, and the params between them.

Decode: a request with `do_remote_prefill` loads its prompt minus the last token (always
computed here, for its logits) minus what the local prefix cache already holds; only the
uncached suffix blocks, owned by this request alone, are read. A full local hit still sends a
notify-only load, so the prefill side frees its blocks. Prefill: a finished `do_remote_decode`
request keeps its blocks under a lease and returns the params its decode side needs;
`release_request` ends the lease early (the ranks stop holding it at the next step).
"""

from __future__ import annotations

import hmac
import math
import secrets
import time
from typing import Any

from kvxfer.connectors.base import (
    ConnectorMetadata,
    KVConnectorOutput,
    KVConnectorScheduler,
    KVParamsError,
    RecvRequest,
    SendRequest,
)
from kvxfer.connectors.config import KVTransferConfig
from kvxfer.connectors.metadata import RemoteDecodeParams, RemotePrefillParams, remote_prefill_params


class NixlConnectorScheduler(KVConnectorScheduler):
    def __init__(self, config: KVTransferConfig, engine_config: Any, spec: Any) -> None:
        self.config = config
        self.block_size = spec.block_size
        self.tp_size = engine_config.tensor_parallel_size
        self._params: dict[str, RemotePrefillParams] = {}  # decode requests until their blocks exist
        self._recv: list[RecvRequest] = []
        self._send: list[SendRequest] = []
        self._release: list[str] = []
        self._held: dict[str, str] = {}  # held request id -> its transfer token
        self._releasing: set[str] = set()
        self.counters = {
            "transfers": 0,
            "failures": 0,
            "expired_leases": 0,
            "released": 0,
            "refused_releases": 0,
            "sends_completed": 0,
            "bytes": 0,
            "descriptors": 0,
            "seconds": 0.0,
        }

    def check_new_request(self, request: Any) -> None:
        params = request.kv_transfer_params
        error = ""
        if isinstance(params, RemotePrefillParams):
            error = self._check(request, params)
        elif isinstance(params, RemoteDecodeParams) and not self.config.is_producer:
            error = f"this engine's KV transfer role is {self.config.role!r}: it cannot hold KV for a remote decode"
        if error:
            raise KVParamsError(f"request {request.request_id!r}: {error}")

    def get_num_new_matched_tokens(self, request: Any, num_local_computed_tokens: int) -> int:
        params = request.kv_transfer_params
        if not isinstance(params, RemotePrefillParams):
            return 0
        self._params[request.request_id] = params
        return max(request.num_prompt_tokens - 1 - num_local_computed_tokens, 0)

    def update_state_after_alloc(
        self, request: Any, block_ids: list[int], num_local_computed_tokens: int, num_external_tokens: int
    ) -> None:
        params = self._params.pop(request.request_id, None)
        if params is None:
            return
        first = num_local_computed_tokens // self.block_size
        end = first
        if num_external_tokens:
            end = math.ceil((num_local_computed_tokens + num_external_tokens) / self.block_size)
        self._recv.append(
            RecvRequest(
                request_id=request.request_id,
                remote_request_id=params.remote_request_id,
                remote_engine_id=params.remote_engine_id,
                remote_host=params.remote_host,
                remote_port=params.remote_port,
                remote_tp_size=params.remote_tp_size,
                local_block_ids=list(block_ids[first:end]),
                remote_block_ids=list(params.remote_block_ids[first:end]),
            )
        )

    def _check(self, request: Any, params: RemotePrefillParams) -> str:
        if not self.config.is_consumer:
            return f"this engine's KV transfer role is {self.config.role!r}: it cannot load remote KV"
        if params.remote_num_tokens != request.num_prompt_tokens:
            return (
                f"kv_transfer_params are for a prompt of {params.remote_num_tokens} tokens, "
                f"this request has {request.num_prompt_tokens}"
            )
        try:
            params.check_shape(self.block_size, num_blocks=1 << 62)  # the peer's pool is checked after the handshake
        except ValueError as e:
            return str(e)
        return ""

    def build_connector_meta(self, scheduler_output: Any) -> ConnectorMetadata:
        meta = ConnectorMetadata(recv=self._recv, send=self._send, release=self._release)
        self._recv, self._send, self._release = [], [], []
        return meta

    def release_request(self, request_id: str, transfer_token: str | None) -> bool:
        token = self._held.get(request_id)
        if token is None or request_id in self._releasing:
            return False
        if transfer_token is None or not hmac.compare_digest(token, transfer_token):
            self.counters["refused_releases"] += 1
            return False
        self._releasing.add(request_id)
        self._release.append(request_id)
        return True

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        self._params.pop(request.request_id, None)
        wants_decode = isinstance(request.kv_transfer_params, RemoteDecodeParams)
        if not (wants_decode and self.config.is_producer and request.finish_reason in ("stop", "length")):
            return False, None
        num_tokens = request.num_prompt_tokens
        held = list(block_ids[: math.ceil(num_tokens / self.block_size)])
        if not held:
            return False, None
        self._send.append(SendRequest(request.request_id, time.monotonic() + self.config.lease_seconds))
        token = self._held[request.request_id] = secrets.token_hex(16)
        return True, remote_prefill_params(
            self.config.engine_id,
            self.config.side_channel_host,
            self.config.side_channel_port,
            held,
            request.request_id,
            self.tp_size,
            num_tokens,
            token,
        )

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        c = self.counters
        for stats in output.recv_stats.values():
            if stats.bytes:  # notify-only loads (full local hits) move nothing
                c["transfers"] += 1
                c["bytes"] += stats.bytes
                c["descriptors"] += stats.descriptors
                c["seconds"] += stats.seconds
        c["failures"] += len(output.failed_recving)
        c["expired_leases"] += len(output.expired_sending)
        c["released"] += len(output.released_sending)
        c["sends_completed"] += len(output.finished_sending - output.expired_sending - output.released_sending)
        for request_id in output.finished_sending:
            self._held.pop(request_id, None)
        self._releasing -= output.finished_sending

    def stats(self) -> dict[str, float]:
        return {**self.counters, "held_requests": len(self._held)}
