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
from kvxfer.specs import KVCacheGroup


def create_scheduler_connector(
    config: KVTransferConfig, engine_config, spec, groups: tuple[KVCacheGroup, ...] | None = None
) -> KVConnectorScheduler:
    """The scheduler side, in the engine process (a prefill-capable one serves the side channel);
    `spec` is the whole model's, `groups` its KV cache groups (default: all layers in one)."""
    from kvxfer.connectors.metadata import model_identity
    from kvxfer.connectors.nixl_scheduler import NixlConnectorScheduler

    return NixlConnectorScheduler(
        config, spec, engine_config.tensor_parallel_size, model_identity(engine_config.model_dir), groups
    )


def create_worker_connector(
    config: KVTransferConfig, engine_config, spec, tp_rank: int, tp_size: int,
    groups: tuple[KVCacheGroup, ...] | None = None,
) -> KVConnectorWorker:
    """The worker side, in TP rank `tp_rank`; identifies the model by its checkpoint config."""
    from kvxfer.connectors.metadata import model_identity
    from kvxfer.connectors.nixl_worker import NixlConnectorWorker

    return NixlConnectorWorker(config, spec, tp_rank, tp_size, model_identity(engine_config.model_dir), groups)

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
    "create_scheduler_connector",
    "create_worker_connector",
]
