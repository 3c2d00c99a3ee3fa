"""Worker side of the vLLM connector: one TP rank's kvxfer `NixlConnectorWorker` over vLLM's
per-layer KV tensors (`layout.layer_regions`), and vLLM's view of its results.

Loads are asynchronous (vLLM parks the request in WAITING_FOR_REMOTE_KVS), so
`wait_for_layer_load`, `save_kv_layer` and `wait_for_save` have nothing to do: the prefill
side's blocks are read by the decode in place, after its request finished.

A failed load (params refused by the prefill's hold check or here, a dead peer, a time-out) is
reported finished and its local blocks as load errors (`get_block_ids_with_load_errors`), so
vLLM's `kv_load_failure_policy` applies: `fail` ends the request with an error, `recompute`
computes the prompt locally. With several KV cache groups (whose block ids vLLM cannot map
back to requests) the request is reported in `failed_recving` instead.

With `stats_path` in kv_connector_extra_config each finished load appends one JSON line
(request id, bytes, descriptors, seconds; or the failure and its kind) to that file.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from kvxfer.connectors.base import ConnectorMetadata, KVConnectorOutput
from kvxfer.connectors.nixl_worker import NixlConnectorWorker
from kvxfer.integrations.vllm.layout import ModelKV, layer_regions, layout_name, model_id, transfer_config
from kvxfer.integrations.vllm.metadata import KvxferConnectorMetadata

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig

# Under "vllm." so that vLLM's logging config (its handler, its level) shows these lines.
logger = logging.getLogger(f"vllm.{__name__}")


class KvxferWorker:
    def __init__(self, vllm_config: VllmConfig, model: ModelKV) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        self.model = model
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.tp_rank = get_tensor_model_parallel_rank() if self.tp_size > 1 else 0
        config = transfer_config(vllm_config)
        self.inner = NixlConnectorWorker(config, model.spec, self.tp_rank, self.tp_size, model_id(vllm_config),
                                         model.groups, layout_name(model.spec))
        self.stats_path = (vllm_config.kv_transfer_config.kv_connector_extra_config or {}).get("stats_path")
        self._local: dict[str, list[list[int]]] = {}  # loads in flight: their local blocks per group
        self._refused = KVConnectorOutput()  # refused loads, reported at the next get_finished
        self._load_errors: set[int] = set()
        self._failed: set[str] = set()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        r = layer_regions(kv_caches, self.model, self.tp_size)
        self.inner.register_span(r.span_addr, r.span_bytes, r.mem_type, r.device_id)
        self.inner.publish_regions(r.regions, r.region_bytes, r.mem_type)
        logger.info("kvxfer: rank %d registered %d KV cache groups (%s layers, %d blocks) in %d bytes",
                    self.tp_rank, len(r.regions), [x.num_layers for x in r.regions],
                    r.regions[0].num_blocks, r.span_bytes)

    def start_load_kv(self, meta: KvxferConnectorMetadata) -> None:
        inner: ConnectorMetadata = meta.inner
        for req in inner.recv:
            self._local[req.request_id] = req.local_block_ids
        for refused in meta.refused:
            self._local[refused.request_id] = refused.local_block_ids
            self._refused.failed_recving[refused.request_id] = refused.reason
            self._refused.failure_kinds[refused.request_id] = "params"
        self.inner.start_load_kv(inner)

    def get_finished(self) -> tuple[set[str], set[str]]:
        out = self.inner.get_finished()
        out.failed_recving = out.failed_recving | self._refused.failed_recving
        out.failure_kinds = out.failure_kinds | self._refused.failure_kinds
        self._refused = KVConnectorOutput()
        for req_id, reason in out.failed_recving.items():
            kind = out.failure_kinds.get(req_id, "transfer")
            logger.error("kvxfer: load of request %s failed (%s): %s", req_id, kind, reason)
            self._failed.add(req_id)
            for ids in self._local.get(req_id, []):
                self._load_errors.update(ids)
        for req_id, stats in out.recv_stats.items():
            logger.info("kvxfer: loaded request %s: %d bytes in %d descriptors (%.4f s)", req_id, stats.bytes,
                        stats.descriptors, stats.seconds)
        self._write_stats(out)
        recving = set(out.finished_recving) | set(out.failed_recving)
        for req_id in recving:
            self._local.pop(req_id, None)
        return set(out.finished_sending), recving

    def take_failed(self) -> set[str]:
        failed, self._failed = self._failed, set()
        return failed

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def _write_stats(self, out: KVConnectorOutput) -> None:
        if not self.stats_path or not (out.recv_stats or out.failed_recving):
            return
        lines = [{"request_id": r, "rank": self.tp_rank, **s.as_dict()} for r, s in out.recv_stats.items()]
        lines += [{"request_id": r, "rank": self.tp_rank, "failed": reason, "kind": out.failure_kinds.get(r, "")}
                  for r, reason in out.failed_recving.items()]
        with open(self.stats_path, "a") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))

    def shutdown(self) -> None:
        self.inner.shutdown()
