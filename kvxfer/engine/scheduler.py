"""Continuous-batching scheduler: chunked prefill under a token budget, preemption by
recompute, requests waiting for remote KV, and the scheduler-side connector hooks.

Each step the running requests are served first (one decode token, or the next prefill
chunk), preempting the most recently admitted ones when blocks run out; then waiting
requests are admitted in arrival order while the budget, `max_num_seqs` and the pool allow.
A request whose prompt KV arrives from a remote engine holds its blocks in
`WAITING_FOR_REMOTE_KV`, outside the batch, until every rank has received it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvxfer.connectors.base import KVConnectorOutput, KVConnectorScheduler
from kvxfer.engine.block_manager import BlockManager
from kvxfer.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens, so a token is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    # Requests finished since the previous step: workers drop their per-request state.
    finished_ids: list[str] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        connector: KVConnectorScheduler | None = None,
        failure_policy: str = "fail",
    ) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.connector = connector
        self.failure_policy = failure_policy
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.remote: dict[str, Request] = {}  # WAITING_FOR_REMOTE_KV
        self.pending_free: dict[str, Request] = {}  # finished; the connector holds the blocks
        self.aborted_loads: dict[str, Request] = {}  # aborted while their KV was arriving
        self.requests: dict[str, Request] = {}  # unfinished, by id
        self._finished_since_step: list[str] = []
        self.finished: list[Request] = []  # finished outside a model step, to report next
        self.num_preemptions = 0
        self.num_recomputed = 0  # loads that failed and fell back to local prefill

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        if request.finish_reason is not None:
            # The prefill's first token already ends it: nothing is loaded, and the answer says
            # so, so that a router releases the prefill's hold at once.
            request.kv_transfer_stats = {
                "unread": True, "reason": f"the first token finished the request ({request.finish_reason})",
                "bytes": 0, "descriptors": 0, "seconds": 0.0, "gbps": 0.0,
            }
            self._finish(request, request.finish_reason)
            self.finished.append(request)
            return
        self.waiting.append(request)

    def holds(self, request_id: str) -> bool:
        """Whether a finished request of this id still holds blocks (for a remote reader, or
        while its own READs may land): the id may not be reused yet. Safe from any thread."""
        return request_id in self.pending_free or request_id in self.aborted_loads

    def release(self, request_id: str, transfer_token: str | None) -> bool:
        """Ask the connector to stop holding a finished request's blocks for its remote reader;
        they are freed once every rank has. False (nothing changes) unless the connector holds
        the request under that token."""
        held = request_id in self.pending_free and self.connector is not None
        return held and self.connector.release_request(request_id, transfer_token)

    def abort(self, request_id: str) -> bool:
        """End an unfinished request; False when there is none of this id."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        if request.status == RequestStatus.WAITING_FOR_REMOTE_KV:
            # READs may still be writing into its blocks: they are freed once every rank has
            # reported the receive finished or failed.
            self.remote.pop(request_id, None)
            self.aborted_loads[request_id] = request
        elif request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, "abort")
        return True

    def end(self, request: Request) -> None:
        """End exactly `request`, asked while it was unfinished: aborted if it still is; if it
        finished meanwhile and is held for a remote reader, the hold is released under the
        token issued for it (the asker never saw that token, and nobody else may read the
        blocks either). Nothing happens to a later request that took its id."""
        request_id = request.request_id
        if self.requests.get(request_id) is request:
            self.abort(request_id)
        elif self.pending_free.get(request_id) is request and self.connector is not None:
            token = (request.output_kv_transfer_params or {}).get("transfer_token")
            self.connector.release_request(request_id, token)

    # ----------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._grow_or_preempt(request, n, i, out):
                break
            out.scheduled.append(ScheduledRequest(request, n))
            budget -= n
            i += 1
        if not out.preempted_ids:
            self._admit_waiting(budget, out)
        if out.scheduled or self.connector is not None:  # otherwise no step reaches the ranks
            out.finished_ids, self._finished_since_step = self._finished_since_step, []
        return out

    def _grow_or_preempt(self, request: Request, n: int, index: int, out: SchedulerOutput) -> bool:
        while not self.bm.allocate(request, request.num_computed_tokens + n):
            if len(self.running) - 1 > index:
                self._preempt(self.running.pop(), out)
                continue
            self.running.pop(index)
            if self._holds_whole_pool(request):
                request.error = (
                    f"sequence of {request.num_tokens} tokens does not fit in the KV pool "
                    f"({self.bm.num_blocks} blocks of {self.bm.block_size} tokens)"
                )
                self._finish(request, "error")
            else:
                self._preempt(request, out)
            return False
        return True

    def _holds_whole_pool(self, request: Request) -> bool:
        others = len(self.running) + len(self.remote) + len(self.pending_free) + len(self.aborted_loads)
        others += sum(1 for r in self.waiting if r.block_ids)
        return others == 0 and self.bm.alone_in_pools(request)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.bm.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        # Behind the waiting requests that already hold blocks (loaded remote KV): they need
        # few new blocks, and letting them run is what frees the pool.
        i = 0
        while i < len(self.waiting) and self.waiting[i].block_ids:
            i += 1
        self.waiting.insert(i, request)
        out.preempted_ids.append(request.request_id)

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            fresh = not request.block_ids  # not back from a remote load
            cached_ids, cached_hashes = self.bm.match_prefix(request) if fresh else ([], [])
            num_local = len(cached_hashes) * self.bm.block_size if fresh else request.num_computed_tokens
            ask_connector = self.connector is not None and not request.remote_kv_checked
            num_external = self.connector.get_num_new_matched_tokens(request, num_local) if ask_connector else 0
            if num_external > 0:
                received = num_local + num_external
                if not self.bm.allocate(request, received, cached_ids, cached_hashes, num_received=received):
                    break
                self.waiting.popleft()
                request.status = RequestStatus.WAITING_FOR_REMOTE_KV
                request.num_external_tokens = num_external
                self._note_admitted(request, num_local)
                self.remote[request.request_id] = request
                continue
            n = min(request.num_tokens - num_local, budget)
            if not self.bm.allocate(request, num_local + n, cached_ids, cached_hashes):
                break
            self.waiting.popleft()
            if fresh:
                self._note_admitted(request, num_local)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, n))
            budget -= n

    def _note_admitted(self, request: Request, num_local: int) -> None:
        request.num_computed_tokens = num_local
        if request.num_preemptions == 0:
            request.num_cached_tokens = num_local
        if self.connector is not None and not request.remote_kv_checked:
            request.remote_kv_checked = True
            self.connector.update_state_after_alloc(
                request, [list(t) for t in request.block_tables], num_local, request.num_external_tokens
            )

    # ------------------------------------------------------------------ results
    def update_from_output(
        self, out: SchedulerOutput, sampled: list[tuple[int, dict[int, float] | None] | None]
    ) -> list[Request]:
        """Advance the scheduled requests by the step's results; returns the requests with
        a new token or finished in this step."""
        touched: list[Request] = []
        for sched, sample in zip(out.scheduled, sampled):
            request = sched.request
            if request.is_finished:
                continue
            request.num_computed_tokens += sched.num_new_tokens
            self.bm.cache_computed_blocks(request)
            if request.num_computed_tokens < request.num_tokens:
                continue  # a prefill chunk that does not reach the end yet
            assert sample is not None, f"{request.request_id}: no token sampled"
            request.append_token(*sample)
            touched.append(request)
            if request.finish_reason is not None:
                self.running.remove(request)
                self._finish(request, request.finish_reason)
        return touched

    def fail_scheduled(self, out: SchedulerOutput, message: str) -> None:
        """The step failed: its requests end with an error (reported by `pop_finished`), the
        engine goes on."""
        for sched in out.scheduled:
            request = sched.request
            if request.is_finished or request not in self.running:
                continue
            self.running.remove(request)
            request.error = message
            self._finish(request, "error")

    def pop_finished(self) -> list[Request]:
        """Requests ended outside the model step (abort, error) since the last call."""
        finished, self.finished = self.finished, []
        return finished

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        # A load's report (every rank finished or failed it) is applied at once: a request is
        # in `remote` exactly while its READs may still land, so an abort that comes later
        # finds it already loaded (freed by the normal path) and never waits for a report
        # that already came.
        for request_id, stats in output.recv_stats.items():
            request = self.requests.get(request_id)  # also a running one's notify-only load
            if request is not None:
                request.kv_transfer_stats = stats.as_dict()
        for request_id in sorted(output.finished_recving | output.failed_recving.keys()):
            aborted = self.aborted_loads.pop(request_id, None)
            if aborted is not None:
                self.bm.free(aborted)
                continue
            request = self.remote.pop(request_id, None)
            if request is None:
                continue
            if request_id in output.finished_recving:
                self._load_done(request)
            else:
                kind = output.failure_kinds.get(request_id, "transfer")
                self._load_failed(request, output.failed_recving[request_id], kind)
        for request_id in output.finished_sending:
            request = self.pending_free.pop(request_id, None)
            if request is not None:
                self.bm.free(request)
        self.connector.update_connector_output(output)

    def _load_done(self, request: Request) -> None:
        # The newest token (the prefill's first one) is always computed here: its logits give
        # the next token.
        total = request.num_computed_tokens + request.num_external_tokens
        request.num_computed_tokens = min(total, request.num_tokens - 1)
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def _load_failed(self, request: Request, reason: str, kind: str) -> None:
        request.num_external_tokens = 0
        if self.failure_policy == "recompute":
            # Said in the output and counted, so a broken transfer path never passes as healthy.
            self.num_recomputed += 1
            request.kv_transfer_stats = {
                "recomputed": True, "error_kind": kind, "reason": reason,
                "bytes": 0, "descriptors": 0, "seconds": 0.0, "gbps": 0.0,
            }
            request.status = RequestStatus.WAITING
            self.waiting.appendleft(request)
        else:
            request.error = f"KV transfer failed: {reason}"
            request.error_kind = kind
            self._finish(request, "error")

    def _finish(self, request: Request, reason: str) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.requests.pop(request.request_id, None)
        self._finished_since_step.append(request.request_id)
        if reason in ("abort", "error"):
            self.finished.append(request)
        delay = False
        if self.connector is not None:
            delay, request.output_kv_transfer_params = self.connector.request_finished(
                request, [list(t) for t in request.block_tables]
            )
        if request.request_id in self.aborted_loads:
            return
        if delay and request.block_ids:
            self.pending_free[request.request_id] = request
        else:
            self.bm.free(request)
