"""Scheduler side of the vLLM connector: vLLM's scheduler calls on kvxfer's
`NixlConnectorScheduler` (its hold table, side channel, params, releases).

What differs from kvxfer's own engine, and is adapted here:
- vLLM's decode does not start from the prefill's first token: it loads all N prompt positions
  and recomputes position N-1 itself (vLLM caps a full hit one token short), sampling t1 again.
  So the load is kvxfer's (every held block of the prompt past the local prefix hit) and the
  params' `first_token_id` is only informative.
- vLLM has no call where a request's params are refused before scheduling: malformed or
  mismatching params are parsed here once, and such a request is scheduled as a load that fails
  at once on the worker side (`KvxferConnectorMetadata.refused`, nothing is read, nothing
  connects), so vLLM's failure policy (`kv_load_failure_policy`: fail or recompute) decides.
- A request is loaded at most once: a preempted, rescheduled request computes locally.
- vLLM's prefill scheduler adds its own keys to the params it returns (`VLLM_OWN_PARAMS`: the
  prefill's cache hits, which the decode's output processor reports); they are vLLM's, read by
  vLLM, and left out of kvxfer's strict parse, which refuses any other unknown field.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvxfer.connectors.base import KVConnectorOutput, KVParamsError
from kvxfer.connectors.metadata import KVTransferParams, RemotePrefillParams, parse_kv_transfer_params
from kvxfer.connectors.nixl_scheduler import NixlConnectorScheduler
from kvxfer.integrations.vllm.layout import ModelKV, layout_name, model_id, transfer_config
from kvxfer.integrations.vllm.metadata import KvxferConnectorMetadata, RefusedLoad

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

# Under "vllm." so that vLLM's logging config (its handler, its level) shows these lines.
logger = logging.getLogger(f"vllm.{__name__}")
# Keys vLLM's scheduler itself adds to a finished prefill's kv_transfer_params (v1/core/sched/scheduler.py).
VLLM_OWN_PARAMS = frozenset({"remote_prefill_cached_tokens"})


@dataclass(frozen=True)
class _Sampling:
    logprobs: int | None


@dataclass(frozen=True)
class RequestView:
    """A vLLM request as kvxfer's scheduler reads one."""

    request_id: str
    kv_transfer_params: KVTransferParams | None
    num_prompt_tokens: int
    finish_reason: str | None  # "stop" | "length" | "abort" | other, once finished
    output_token_ids: list[int]
    sampling_params: _Sampling
    logprobs: None = None  # vLLM keeps no log-probs on its request: none go into the params


def _finish_reason(request: Request) -> str | None:
    from vllm.v1.request import RequestStatus

    return {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH_CAPPED: "length",
            RequestStatus.FINISHED_ABORTED: "abort"}.get(request.status, "other" if request.is_finished() else None)


def _flag(request: Request, key: str) -> bool:
    params = request.kv_transfer_params
    return isinstance(params, dict) and bool(params.get(key))


class KvxferScheduler:
    def __init__(self, vllm_config: VllmConfig, model: ModelKV) -> None:
        self.config = transfer_config(vllm_config)
        self.model = model
        self.inner = NixlConnectorScheduler(
            self.config, model.spec, vllm_config.parallel_config.tensor_parallel_size, model_id(vllm_config),
            model.groups, layout_name(model.spec),
        )
        self._params: dict[str, KVTransferParams | KVParamsError | None] = {}
        self._local: dict[str, int] = {}  # decode: local prefix hit at the last match
        self._loaded: set[str] = set()  # decode: requests whose one load was scheduled
        self._refused: list[RefusedLoad] = []

    def _parsed(self, request: Request) -> KVTransferParams | KVParamsError | None:
        """The request's params parsed once (a KVParamsError is kept, to fail its load)."""
        if request.request_id not in self._params:
            raw = request.kv_transfer_params
            if isinstance(raw, dict):
                raw = {k: v for k, v in raw.items() if k not in VLLM_OWN_PARAMS}
            try:
                parsed = parse_kv_transfer_params(raw)
            except KVParamsError as e:
                parsed = e
            self._params[request.request_id] = parsed
        return self._params[request.request_id]

    def _view(self, request: Request, params: KVTransferParams | None) -> RequestView:
        return RequestView(request.request_id, params, request.num_prompt_tokens, _finish_reason(request),
                           list(request.output_token_ids), _Sampling(request.sampling_params.logprobs))

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        if request.request_id in self._loaded:
            return 0, False
        params = self._parsed(request)
        if isinstance(params, KVParamsError) and _flag(request, "do_remote_prefill"):
            pass  # a load that will fail: its blocks are allocated, nothing is read
        elif not isinstance(params, RemotePrefillParams):
            return 0, False
        else:
            try:
                self.inner.check_new_request(self._view(request, params))
            except KVParamsError as e:
                self._params[request.request_id] = e
        self._local[request.request_id] = num_computed_tokens
        count = request.num_prompt_tokens - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if request.request_id not in self._local or request.request_id in self._loaded:
            return
        self._loaded.add(request.request_id)
        local = self._local.pop(request.request_id)
        params = self._params[request.request_id]
        tables = [list(t) for t in blocks.get_block_ids()]
        if isinstance(params, KVParamsError):
            logger.error("request %s: refused kv_transfer_params, nothing is read: %s", request.request_id, params)
            first = local // self.model.spec.block_size
            self._refused.append(RefusedLoad(request.request_id, [t[first:] for t in tables], str(params)))
            return
        self.inner.update_state_after_alloc(self._view(request, params), tables, local, num_external_tokens)

    def build_connector_meta(self) -> KvxferConnectorMetadata:
        meta = KvxferConnectorMetadata(self.inner.build_connector_meta(None), self._refused)
        self._refused = []
        return meta

    def request_finished(self, request: Request, block_ids: tuple[list[int], ...]) -> tuple[bool, dict | None]:
        params = self._parsed(request)
        self._params.pop(request.request_id, None)
        self._local.pop(request.request_id, None)
        self._loaded.discard(request.request_id)
        if isinstance(params, KVParamsError):
            if _flag(request, "do_remote_decode"):
                logger.error("request %s: refused kv_transfer_params, blocks freed: %s", request.request_id, params)
            return False, None
        return self.inner.request_finished(self._view(request, params), [list(t) for t in block_ids])

    def update_connector_output(self, finished_sending: set[str], finished_recving: set[str]) -> None:
        # vLLM aggregates the ranks; kvxfer's hold table forgets the holds no rank holds any more.
        self.inner.update_connector_output(KVConnectorOutput(finished_sending=set(finished_sending),
                                                             finished_recving=set(finished_recving)))

    def stats(self) -> dict[str, float]:
        return self.inner.stats()

    def shutdown(self) -> None:
        self.inner.shutdown()
