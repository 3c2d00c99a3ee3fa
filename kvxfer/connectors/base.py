"""Connector API shared by the engine and the connectors.

The scheduler side (engine process) decides which requests load or send KV and tells the
worker side (every TP rank) through `ConnectorMetadata` each step; the workers answer with a
`KVConnectorOutput` per rank, which `KVOutputAggregator` turns into one agreed outcome.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import msgspec


class KVTransferError(RuntimeError):
    """A KV transfer failed; `kind` says whose fault it is and travels with the failure."""

    kind = "transfer"


class KVParamsError(KVTransferError, ValueError):
    """The request's kv_transfer_params are malformed, forged or do not fit (bad block ids,
    wrong model, unknown engine, another prompt length): the client's fault."""

    kind = "params"


class KVPeerError(KVTransferError):
    """The peer failed: dead or unreachable, a READ error, a time-out."""

    kind = "peer"


class TransferStats(msgspec.Struct, frozen=True):
    """One request's pull: summed over ranks, `seconds` is the slowest rank's."""

    bytes: int
    descriptors: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"bytes": self.bytes, "descriptors": self.descriptors, "seconds": self.seconds, "gbps": self.gbps}


class RecvRequest(msgspec.Struct, frozen=True):
    """A decode-side load: read `remote_block_ids[i]` into `local_block_ids[i]`, once the
    prefill side has confirmed (and pinned) its hold of `held_block_ids` under `transfer_token`.

    Empty block lists mean nothing is read (full local prefix hit) but the prefill side is
    still notified so that it frees its blocks.
    """

    request_id: str
    remote_request_id: str
    remote_engine_id: str
    remote_instance_id: str
    remote_host: str
    remote_port: int
    remote_tp_size: int
    transfer_token: str
    held_block_ids: list[int]  # every block the params name (the hold check compares them exactly)
    local_block_ids: list[int]
    remote_block_ids: list[int]  # the sub-range of held_block_ids this engine reads


class SendRequest(msgspec.Struct, frozen=True):
    """A prefill-side request whose blocks every rank holds until its readers notify (with
    `transfer_token`) or the scheduler side ends it (`ConnectorMetadata.release` / `expire`)."""

    request_id: str
    transfer_token: str


class ConnectorMetadata(msgspec.Struct):
    recv: list[RecvRequest] = []
    send: list[SendRequest] = []
    release: list[str] = []  # held requests to stop holding now (nobody will read them)
    expire: list[str] = []  # held requests whose lease ran out (decided once, by the scheduler side)


class KVConnectorOutput(msgspec.Struct):
    """What a rank (or, aggregated, the engine) finished since the last step."""

    finished_sending: set[str] = set()
    expired_sending: set[str] = set()  # subset of finished_sending: freed by lease expiry
    released_sending: set[str] = set()  # subset of finished_sending: released early on request
    finished_recving: set[str] = set()
    failed_recving: dict[str, str] = {}  # request id -> reason
    failure_kinds: dict[str, str] = {}  # request id -> the kind of its KVTransferError
    recv_stats: dict[str, TransferStats] = {}

    def is_empty(self) -> bool:
        return not (self.finished_sending or self.finished_recving or self.failed_recving)


class KVOutputAggregator:
    """Combines the ranks' outputs: a request is reported once every rank has reported it.

    Waiting for every rank also on failure matters: a rank whose READ is still in flight may
    not see its destination blocks reused by a recompute or by another request.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._recv: dict[str, list] = {}  # request id -> [ranks seen, reasons, stats, failure kinds]
        self._send: dict[str, list] = {}  # request id -> [ranks seen, expired, released]

    def aggregate(self, outputs: list[KVConnectorOutput]) -> KVConnectorOutput:
        result = KVConnectorOutput()
        for out in outputs:
            for req_id in out.finished_recving | out.failed_recving.keys():
                entry = self._recv.setdefault(req_id, [0, [], [], set()])
                entry[0] += 1
                if req_id in out.failed_recving:
                    entry[1].append(out.failed_recving[req_id])
                    entry[3].add(out.failure_kinds.get(req_id, KVTransferError.kind))
                if req_id in out.recv_stats:
                    entry[2].append(out.recv_stats[req_id])
            for req_id in out.finished_sending:
                entry = self._send.setdefault(req_id, [0, False, False])
                entry[0] += 1
                entry[1] |= req_id in out.expired_sending
                entry[2] |= req_id in out.released_sending
        for req_id, (seen, reasons, stats, kinds) in list(self._recv.items()):
            if seen < self.world_size:
                continue
            del self._recv[req_id]
            if reasons:
                result.failed_recving[req_id] = "; ".join(dict.fromkeys(reasons))
                # A params fault on any rank is the request's fault, whatever else failed.
                result.failure_kinds[req_id] = next(k for k in ("params", "peer", "transfer") if k in kinds)
            else:
                result.finished_recving.add(req_id)
                if stats:
                    result.recv_stats[req_id] = TransferStats(
                        bytes=sum(s.bytes for s in stats),
                        descriptors=sum(s.descriptors for s in stats),
                        seconds=max(s.seconds for s in stats),
                    )
        for req_id, (seen, expired, released) in list(self._send.items()):
            if seen < self.world_size:
                continue
            del self._send[req_id]
            result.finished_sending.add(req_id)
            if released:  # the caller gave it up, whatever else some rank saw
                result.released_sending.add(req_id)
            elif expired:
                result.expired_sending.add(req_id)
        return result


class KVConnectorScheduler(ABC):
    """Scheduler side, in the engine process."""

    @abstractmethod
    def check_new_request(self, request: Any) -> None:
        """Raise KVParamsError when this engine cannot take the request's parsed
        `kv_transfer_params` (called by `add_request`, before anything is queued)."""

    @abstractmethod
    def get_num_new_matched_tokens(self, request: Any, num_local_computed_tokens: int) -> int:
        """Prompt tokens that will arrive remotely (the request then waits holding its blocks)."""

    @abstractmethod
    def update_state_after_alloc(
        self, request: Any, block_ids: list[int], num_local_computed_tokens: int, num_external_tokens: int
    ) -> None: ...

    @abstractmethod
    def build_connector_meta(self, scheduler_output: Any) -> ConnectorMetadata: ...

    @abstractmethod
    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        """(delay freeing the blocks?, kv_transfer_params for the output)."""

    @abstractmethod
    def release_request(self, request_id: str, transfer_token: str | None) -> bool:
        """Stop holding a finished request's blocks for a remote reader (through the next
        metadata); False (and counted as refused) unless it holds it under `transfer_token`."""

    @abstractmethod
    def update_connector_output(self, output: KVConnectorOutput) -> None: ...

    @abstractmethod
    def stats(self) -> dict[str, float]: ...

    def shutdown(self) -> None:
        """Stop what the scheduler side serves (e.g. a side channel)."""


class KVConnectorWorker(ABC):
    """Worker side, in every TP rank."""

    @abstractmethod
    def register_kv_cache(self, kv_cache: Any) -> None: ...

    @abstractmethod
    def start_load_kv(self, meta: ConnectorMetadata) -> None: ...

    @abstractmethod
    def get_finished(self) -> KVConnectorOutput: ...

    @abstractmethod
    def shutdown(self) -> None: ...
