"""`KvxferConnector`: the `KVConnectorBase_V1` subclass vLLM loads (`kv_connector_module_path`
kvxfer.integrations.vllm); it only dispatches vLLM's calls to its role's side (`scheduler`,
`worker`), which adapt them to kvxfer's NIXL connector.

What maps to what:
- scheduler: get_num_new_matched_tokens / update_state_after_alloc -> a kvxfer `RecvRequest`
  (the prompt's held blocks past the local prefix hit); request_finished -> a token-bound hold
  under a lease (delay-free) and kvxfer's `RemotePrefillParams` as the kv_transfer_params;
  build_connector_meta -> kvxfer's `ConnectorMetadata` (loads, holds, releases, expiries).
- worker: register_kv_caches -> one region per KV cache group split by layer, published on the
  prefill's side channel; start_load_kv -> hold check then one READ per remote rank;
  get_finished -> finished holds (ReadDone with the token) and loads; load failures ->
  get_block_ids_with_load_errors (vLLM's failure policy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from kvxfer.integrations.vllm.layout import model_kv
from kvxfer.integrations.vllm.metadata import KvxferConnectorMetadata
from kvxfer.integrations.vllm.scheduler import KvxferScheduler
from kvxfer.integrations.vllm.worker import KvxferWorker

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class KvxferConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        model = model_kv(vllm_config, kv_cache_config)
        self._groups = len(model.groups)
        self._scheduler: KvxferScheduler | None = None
        self._worker: KvxferWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = KvxferScheduler(vllm_config, model)
        else:
            self._worker = KvxferWorker(vllm_config, model)

    # --- scheduler side -------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta()

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self._scheduler is not None
        self._scheduler.update_connector_output(connector_output.finished_sending or set(),
                                                connector_output.finished_recving or set())

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        # Without HMA vLLM passes the one group's block list.
        return self._scheduler.request_finished(request, (list(block_ids),))

    # --- worker side ----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvxferConnectorMetadata)
        self._worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: the request waits, not the layer

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # the decode reads the prefill's blocks in place

    def wait_for_save(self) -> None:
        return

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        sending, recving = self._worker.get_finished()
        return sending or None, recving or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._worker is not None
        sending, recving = self._worker.get_finished()
        failed = self._worker.take_failed()
        # One group: failures go as block ids (get_block_ids_with_load_errors); vLLM maps block
        # ids back to requests only with one group, so several report the requests instead.
        return KVConnectorTransferResults(sending, recving, failed if self._groups > 1 else set())

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        errors = self._worker.take_load_errors()
        return errors if self._groups == 1 else set()

    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown()
        if self._worker is not None:
            self._worker.shutdown()
