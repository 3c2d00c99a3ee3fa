"""KV connectors: the connector API (`base`) and the NIXL connector (handshake, descriptors, reads)."""

from kvxfer.connectors.base import (
    ConnectorMetadata,
    KVConnectorOutput,
    KVConnectorScheduler,
    KVConnectorWorker,
    KVOutputAggregator,
    RecvRequest,
    SendRequest,
    TransferStats,
)
from kvxfer.connectors.config import KVTransferConfig

__all__ = [
    "ConnectorMetadata",
    "KVConnectorOutput",
    "KVConnectorScheduler",
    "KVConnectorWorker",
    "KVOutputAggregator",
    "KVTransferConfig",
    "RecvRequest",
    "SendRequest",
    "TransferStats",
]
