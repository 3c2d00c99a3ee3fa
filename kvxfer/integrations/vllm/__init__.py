"""kvxfer as a vLLM V1 KV connector (vLLM 0.32): load it with

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KvxferConnector",
        "kv_connector_module_path": "kvxfer.integrations.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"side_channel_port": 5600}}'

Only this package imports vLLM. `connector` is the class vLLM loads; `layout` maps vLLM's
configs and KV tensors onto kvxfer's specs and regions; `scheduler` and `worker` adapt vLLM's
calls to kvxfer's NIXL connector (its holds, handshake, HMAC, slices, reads, failure kinds).
"""

from kvxfer.integrations.vllm.connector import KvxferConnector
from kvxfer.integrations.vllm.metadata import KvxferConnectorMetadata

__all__ = ["KvxferConnector", "KvxferConnectorMetadata"]
