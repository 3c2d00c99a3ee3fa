"""What vLLM's scheduler side hands its workers each step: kvxfer's `ConnectorMetadata` (loads,
holds, releases, expiries) and the loads refused before anything connects."""

from __future__ import annotations

import msgspec
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from kvxfer.connectors.base import ConnectorMetadata


class RefusedLoad(msgspec.Struct, frozen=True):
    """A decode request whose kv_transfer_params were refused: its `local_block_ids` (per group)
    that the load would have filled are reported failed, with `reason`."""

    request_id: str
    local_block_ids: list[list[int]]
    reason: str


class KvxferConnectorMetadata(KVConnectorMetadata):
    def __init__(self, inner: ConnectorMetadata, refused: list[RefusedLoad]) -> None:
        self.inner = inner
        self.refused = refused
