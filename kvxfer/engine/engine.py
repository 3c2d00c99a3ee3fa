"""`LLMEngine`: requests in, one scheduled model step per `step()`, outputs out.

`add_request` and `abort_request` may be called from any thread: they validate at once
and queue (releasing a held request waits for a running step to end); `step()` applies
the queue, schedules, runs every rank, and returns the outputs of the requests that
advanced. With a connector, every step also carries the connector metadata to the ranks
and collects their finished transfers, even when no model work is scheduled, so requests
waiting for remote KV never stall the loop. A dead rank or a broken KV connector ends the
engine: EngineDeadError from then on.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from kvxfer.connectors.base import KVParamsError
from kvxfer.connectors.metadata import RemoteDecodeParams, RemotePrefillParams, parse_kv_transfer_params
from kvxfer.engine.block_manager import BlockManager, engine_kv_cache_groups, group_windows
from kvxfer.engine.config import EngineConfig
from kvxfer.engine.executor import EngineDeadError, Executor, RankBrokenError
from kvxfer.engine.step import StepInput
from kvxfer.engine.request import KVTransferParams, Request, RequestIdInUse, RequestOutput
from kvxfer.engine.sampling_params import SamplingParams
from kvxfer.engine.scheduler import Scheduler


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from kvxfer.models import load_model_config

        self.config = config
        # Everything that can be checked without the workers is checked before spawning them.
        self.model_config = load_model_config(config.model_dir)
        self.model_config.validate_tp(config.tensor_parallel_size)
        _check_device(config)
        self.spec = self.model_config.kv_cache_spec(config.block_size, config.torch_dtype_name)
        self.kv_cache_groups = engine_kv_cache_groups(self.model_config, config)
        self.executor = Executor(config)
        # Stops the ranks even when the caller forgets shutdown() (collected, or at exit).
        self._finalizer = weakref.finalize(self, self.executor.shutdown)
        try:
            self.num_blocks: tuple[int, ...] = self.executor.num_blocks  # per KV cache group
            self.connector = None
            self.aggregator = None
            kv_config = config.kv_transfer_config
            if kv_config is not None:
                from kvxfer.connectors import create_scheduler_connector
                from kvxfer.connectors.base import KVOutputAggregator

                self.connector = create_scheduler_connector(kv_config, config, self.spec, self.kv_cache_groups)
                self.aggregator = KVOutputAggregator(config.tensor_parallel_size)
            self.block_manager = BlockManager(
                self.num_blocks, config.block_size, config.enable_prefix_caching, group_windows(self.kv_cache_groups)
            )
            self.scheduler = Scheduler(
                self.block_manager,
                config.max_num_seqs,
                config.max_num_batched_tokens,
                self.connector,
                getattr(kv_config, "failure_policy", "fail"),
            )
        except BaseException:
            self.executor.shutdown()
            raise
        max_positions = getattr(self.model_config.hf_config, "max_position_embeddings", None)
        # Full-attention pools bound a sequence's length; a sliding pool holds its window only.
        self.pool_blocks = min(
            (n for n, w in zip(self.num_blocks, group_windows(self.kv_cache_groups)) if w is None), default=None
        )
        pool_tokens = self.pool_blocks * config.block_size if self.pool_blocks is not None else 1 << 62
        self.max_model_len = min(pool_tokens, max_positions or 1 << 62)
        self._queue_lock = threading.Lock()
        self._step_lock = threading.RLock()
        self._new_requests: list[Request] = []
        self._aborts: list[Request] = []  # each names one request, never a later one of its id
        self._known: dict[str, Request] = {}  # unfinished requests by id
        self.last_step_num_tokens = 0
        self._closed = False
        self._dead: str | None = None

    # -------------------------------------------------------------------- input
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None = None,
        kv_transfer_params: KVTransferParams | dict[str, Any] | None = None,
    ) -> Request:
        """Queue a request and return it (for `end_request`); raises ValueError (RequestIdInUse
        for an id in use, KVParamsError for params this engine cannot serve) and keeps nothing
        when it cannot be served."""
        request = self.make_request(request_id, prompt_token_ids, sampling_params, kv_transfer_params)
        self.enqueue(request)
        return request

    def enqueue(self, request: Request) -> None:
        """Queue a request built by `make_request`; RequestIdInUse when its id is in use."""
        with self._queue_lock:
            # A finished request's id stays in use while it holds blocks: its remote reader,
            # its READs and its release all name it by id.
            if request.request_id in self._known or self.scheduler.holds(request.request_id):
                raise RequestIdInUse(f"request id {request.request_id!r} is already in use")
            self._known[request.request_id] = request
            self._new_requests.append(request)

    def make_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None = None,
        kv_transfer_params: KVTransferParams | dict[str, Any] | None = None,
    ) -> Request:
        """Validate one request without queuing it. `kv_transfer_params` come parsed (the HTTP
        server parses them once) or as a plain object, parsed here."""
        self._check_open()
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        sampling_params = sampling_params or SamplingParams()
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        tokens = list(prompt_token_ids) if prompt_token_ids is not None else []
        if not tokens:
            raise ValueError(f"request {request_id!r}: the prompt is empty")
        vocab = self.model_config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in tokens):
            raise ValueError(f"request {request_id!r}: prompt token ids must be integers in [0, {vocab})")
        if len(tokens) >= self.max_model_len:
            raise ValueError(
                f"request {request_id!r}: prompt of {len(tokens)} tokens is too long; this engine holds at most "
                f"{self.max_model_len} tokens per sequence (KV pool of {self.pool_blocks} blocks of "
                f"{self.config.block_size} tokens, max_position_embeddings "
                f"{getattr(self.model_config.hf_config, 'max_position_embeddings', None)})"
            )
        if not isinstance(kv_transfer_params, (RemotePrefillParams, RemoteDecodeParams, type(None))):
            kv_transfer_params = parse_kv_transfer_params(kv_transfer_params)
        if isinstance(kv_transfer_params, RemotePrefillParams) and kv_transfer_params.first_token_id >= vocab:
            raise KVParamsError(f"kv_transfer_params: first_token_id {kv_transfer_params.first_token_id} is out of "
                                f"range (vocab size {vocab})")
        if kv_transfer_params is not None and self.connector is None:
            raise ValueError(f"request {request_id!r}: kv_transfer_params given, but the engine has no kv_transfer_config")
        request = Request(request_id, tokens, sampling_params, kv_transfer_params, self.model_config.eos_token_ids)
        if self.connector is not None:
            self.connector.check_new_request(request)
        return request

    def abort_request(self, request_id: str, transfer_token: str | None = None) -> str:
        """End a request. Returns "aborted" (unfinished when called: its output, finish_reason
        "abort", comes with the next step; should it finish in a step already running, its hold
        for a remote reader is released instead, so the abort still frees its blocks),
        "released" (finished, its blocks held by the connector for a remote reader under
        `transfer_token`: the next step tells the ranks to stop holding them, and they are freed
        once every rank has) or "unknown" (nothing done: no such request, a held one whose
        token was not given, or one already released)."""
        self._check_open()
        with self._queue_lock:
            request = self._known.get(request_id)
            if request is not None:
                self._aborts.append(request)
                return "aborted"
        # The token check and the release change the connector's state: not during a step.
        with self._step_lock:
            return "released" if self.scheduler.release(request_id, transfer_token) else "unknown"

    def end_request(self, request: Request) -> None:
        """End `request` (as returned by `add_request`) for the caller who added it and no
        longer wants it: aborted if unfinished, its hold released if it finished and is held for
        a remote reader (the caller never saw the params, so nobody will read them). A later
        request that took the same id is never touched."""
        with self._queue_lock:
            self._aborts.append(request)

    def has_unfinished_requests(self) -> bool:
        with self._queue_lock:
            return bool(self._new_requests) or self.scheduler.has_unfinished()

    # --------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one step; EngineDeadError (also on every later call) once a rank died or its
        KV connector broke."""
        with self._step_lock:
            self._check_open()
            self._apply_queue()
            out = self.scheduler.schedule()
            self.last_step_num_tokens = out.num_scheduled_tokens
            advanced: list[Request] = []
            if out.scheduled or self.connector is not None:
                meta = None
                if self.connector is not None:
                    meta = self.connector.build_connector_meta(out)
                    self.aggregator.expect(meta)
                step = StepInput.from_scheduler_output(out, self.config.block_size, len(self.kv_cache_groups), meta)
                try:
                    results, error = self.executor.collective_rpc_each("execute_step", step)
                except EngineDeadError as e:
                    self._dead = str(e)
                    raise
                if self.connector is not None:
                    # The ranks that finished the step report their transfers even when another
                    # rank failed: their connectors have handed these over and will not again.
                    kv_outs = [r[1] if r is not None else None for r in results]
                    self.scheduler.update_connector_output(self.aggregator.aggregate(kv_outs))
                if isinstance(error, RankBrokenError):
                    self._dead = f"{error} (the engine stopped: restart it)"
                    raise EngineDeadError(self._dead) from error
                if error is not None:
                    self.scheduler.fail_scheduled(out, f"model step failed: {error}")
                else:
                    sampled_iter = iter(results[0][0])
                    sampled = [next(sampled_iter) if s.samples else None for s in out.scheduled]
                    advanced = self.scheduler.update_from_output(out, sampled)
            advanced += self.scheduler.pop_finished()
            return [self._output(r) for r in advanced]

    def _apply_queue(self) -> None:
        with self._queue_lock:
            new, self._new_requests = self._new_requests, []
            aborts, self._aborts = self._aborts, []
        for request in new:
            self.scheduler.add(request)
        for request in aborts:
            self.scheduler.end(request)

    def _output(self, request: Request) -> RequestOutput:
        new_ids = request.output_token_ids[request.num_new_tokens_emitted :]
        request.num_new_tokens_emitted = len(request.output_token_ids)
        finished = request.is_finished
        if finished:
            with self._queue_lock:
                if self._known.get(request.request_id) is request:
                    del self._known[request.request_id]
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=list(request.output_token_ids),
            new_token_ids=new_ids,
            finished=finished,
            finish_reason=request.finish_reason if finished else None,
            logprobs=list(request.logprobs) if request.sampling_params.logprobs is not None else None,
            error=request.error,
            error_kind=request.error_kind,
            kv_transfer_params=request.output_kv_transfer_params,
            kv_transfer_stats=request.kv_transfer_stats,
            num_cached_tokens=request.num_cached_tokens,
        )

    # ---------------------------------------------------------------- utilities
    def collective_rpc(self, method: str, *args: Any) -> list:
        """Call a worker method on every rank; results in rank order."""
        with self._step_lock:
            self._check_open()
            return self.executor.collective_rpc(method, *args)

    def stats(self) -> dict[str, Any]:
        bm, sched = self.block_manager, self.scheduler
        stats = {
            "num_blocks": bm.num_blocks,
            "num_free_blocks": bm.num_free_blocks,
            "num_used_blocks": bm.num_blocks - bm.num_free_blocks,
            "block_usage": 1.0 - bm.num_free_blocks / bm.num_blocks,
            "num_cached_blocks": bm.num_cached_blocks,
            "prefix_query_tokens": bm.prefix_query_tokens,
            "prefix_hit_tokens": bm.prefix_hit_tokens,
            "prefix_hit_blocks": bm.prefix_hit_blocks,
            "prefix_hit_rate": bm.prefix_hit_tokens / bm.prefix_query_tokens if bm.prefix_query_tokens else 0.0,
            "num_preemptions": sched.num_preemptions,
            "num_running": len(sched.running),
            "num_waiting": len(sched.waiting),
            "num_waiting_for_remote_kv": len(sched.remote),
            "num_pending_free": len(sched.pending_free),
            "num_aborted_loads": len(sched.aborted_loads),
        }
        if self.connector is not None:
            stats["connector"] = {**self.connector.stats(), "recomputed": sched.num_recomputed}
        return stats

    def worker_pids(self) -> list[int]:
        return self.executor.worker_pids()

    def shutdown(self) -> None:
        with self._step_lock:
            if self._closed:
                return
            self._closed = True
            if self.connector is not None:
                self.connector.shutdown()
            self._finalizer()

    @property
    def dead(self) -> str | None:
        """Why the engine cannot go on (a rank died or its KV connector broke), else None."""
        return self._dead

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the engine is shut down")
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _check_device(config: EngineConfig) -> None:
    if config.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch.cuda.is_available() is false")
    config.check_cuda_devices(torch.cuda.device_count())
