"""Connector API shared by the engine and the connectors.

The scheduler side (engine process) decides which requests load or send KV and tells the
worker side (every TP rank) through `ConnectorMetadata` each step; the workers answer with a
`KVConnectorOutput` per rank, which `KVOutputAggregator` turns into one agreed outcome.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
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


class KVConflictError(KVTransferError):
    """Another pull already claimed the transfer token: a token admits exactly one (HTTP 409)."""

    kind = "conflict"


class KVExpiredError(KVTransferError):
    """The prefill's lease ran out before the pull: a timing fault of the decode path, not a
    forgery (HTTP 504)."""

    kind = "expired"


# A failure kind's HTTP status, for the servers (any other kind: 502).
HTTP_STATUS_OF_KIND = {KVParamsError.kind: 400, KVConflictError.kind: 409, KVExpiredError.kind: 504}
# Which kind a request's failure takes when its ranks report several (the first present).
KIND_PRECEDENCE = ("params", "conflict", "expired", "peer", "transfer")


class KVConnectorBroken(RuntimeError):
    """A rank's worker-side connector raised (e.g. its registration with the side channel
    failed): its transfers can no longer be reported, so the engine stops (EngineDeadError)."""


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
    """A decode-side load: for each KV cache group `g`, read `remote_block_ids[g][i]` into
    `local_block_ids[g][i]`, once the prefill side has confirmed (and pinned) its hold of
    `held_block_ids` under `transfer_token`.

    No block in any group means nothing is read (full local prefix hit) but the prefill side is
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
    local_block_ids: list[list[int]]  # per group
    remote_block_ids: list[list[int]]  # per group: the held blocks of that group this engine reads
    # Drawn once per load where it is made (the scheduler side), so every rank's hold check
    # names the same claim and the prefill side admits this one load per token.
    claim: str = msgspec.field(default_factory=lambda: secrets.token_hex(12))


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
    refused_notifications: int = 0  # ReadDones refused for a wrong token since the last report
    handshakes: int = 0  # peer handshakes (metadata + NIXL agents) completed since the last report

    def is_empty(self) -> bool:
        return not (self.finished_sending or self.finished_recving or self.failed_recving
                    or self.refused_notifications or self.handshakes)


@dataclass
class _RecvReports:
    ranks: set[int] = field(default_factory=set)
    reasons: list[str] = field(default_factory=list)
    kinds: set[str] = field(default_factory=set)
    stats: list[TransferStats] = field(default_factory=list)


@dataclass
class _SendReports:
    ranks: set[int] = field(default_factory=set)
    expired: bool = False
    released: bool = False


class KVOutputAggregator:
    """Combines the ranks' outputs: a request is reported once every rank has reported it.

    Waiting for every rank also on failure matters: a rank whose READ is still in flight may
    not see its destination blocks reused by a recompute or by another request. Ranks are
    counted as a set (`outputs[i]` is rank i's), so a rank reporting twice cannot stand in
    for a rank that has not reported; and only the loads and holds announced by `expect` are
    counted, so a report repeated after its request completed cannot count towards a later
    request of the same id.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._recv: dict[str, _RecvReports] = {}
        self._send: dict[str, _SendReports] = {}

    def expect(self, meta: ConnectorMetadata) -> None:
        """Count reports for the loads and holds this metadata starts on the ranks."""
        for recv in meta.recv:
            self._recv[recv.request_id] = _RecvReports()
        for send in meta.send:
            self._send[send.request_id] = _SendReports()

    def aggregate(self, outputs: list[KVConnectorOutput | None]) -> KVConnectorOutput:
        """`outputs[rank]` is that rank's output, None for a rank that reported nothing this step."""
        result = KVConnectorOutput()
        for rank, out in enumerate(outputs):
            if out is None:
                continue
            result.refused_notifications += out.refused_notifications  # summed over ranks
            result.handshakes += out.handshakes
            for req_id in out.finished_recving | out.failed_recving.keys():
                recv = self._recv.get(req_id)
                if recv is None:  # not a load in flight: a repeated report
                    continue
                recv.ranks.add(rank)
                if req_id in out.failed_recving:
                    recv.reasons.append(out.failed_recving[req_id])
                    recv.kinds.add(out.failure_kinds.get(req_id, KVTransferError.kind))
                if req_id in out.recv_stats:
                    recv.stats.append(out.recv_stats[req_id])
            for req_id in out.finished_sending:
                send = self._send.get(req_id)
                if send is None:  # not a hold in force: a repeated report
                    continue
                send.ranks.add(rank)
                send.expired |= req_id in out.expired_sending
                send.released |= req_id in out.released_sending
        for req_id, recv in list(self._recv.items()):
            if len(recv.ranks) < self.world_size:
                continue
            del self._recv[req_id]
            if recv.reasons:
                result.failed_recving[req_id] = "; ".join(dict.fromkeys(recv.reasons))
                # A params fault on any rank is the request's fault, whatever else failed.
                result.failure_kinds[req_id] = next(
                    (k for k in KIND_PRECEDENCE if k in recv.kinds), KVTransferError.kind)
            else:
                result.finished_recving.add(req_id)
                if recv.stats:
                    result.recv_stats[req_id] = TransferStats(
                        bytes=sum(s.bytes for s in recv.stats),
                        descriptors=sum(s.descriptors for s in recv.stats),
                        seconds=max(s.seconds for s in recv.stats),
                    )
        for req_id, send in list(self._send.items()):
            if len(send.ranks) < self.world_size:
                continue
            del self._send[req_id]
            result.finished_sending.add(req_id)
            if send.released:  # the caller gave it up, whatever else some rank saw
                result.released_sending.add(req_id)
            elif send.expired:
                result.expired_sending.add(req_id)
        return result


class KVConnectorScheduler(ABC):
    """Scheduler side, in the engine process."""

    @abstractmethod
    def check_new_request(self, request: Any) -> None:
        """Raise KVParamsError (naming the field) unless this engine can serve the request's
        parsed `kv_transfer_params` (its role, the prompt length, the block count). Called
        synchronously when the engine accepts the request, so nothing is queued on error."""

    @abstractmethod
    def get_num_new_matched_tokens(self, request: Any, num_local_computed_tokens: int) -> int:
        """Prompt tokens that will arrive remotely (the request then waits holding its blocks)."""

    @abstractmethod
    def update_state_after_alloc(
        self, request: Any, block_tables: list[list[int]], num_local_computed_tokens: int, num_external_tokens: int
    ) -> None:
        """`block_tables`: the request's blocks per KV cache group."""

    @abstractmethod
    def build_connector_meta(self, scheduler_output: Any) -> ConnectorMetadata: ...

    @abstractmethod
    def request_finished(self, request: Any, block_tables: list[list[int]]) -> tuple[bool, dict | None]:
        """(delay freeing the blocks?, kv_transfer_params for the output); `block_tables` per group."""

    @abstractmethod
    def release_request(self, request_id: str, transfer_token: str | None) -> bool:
        """Stop holding a finished request's blocks for a remote reader (through the next
        metadata); False (counted as a refused release, nothing changes) unless the
        connector holds it and `transfer_token` is the token issued for it."""

    @abstractmethod
    def update_connector_output(self, output: KVConnectorOutput) -> None: ...

    @abstractmethod
    def stats(self) -> dict[str, float]: ...

    def shutdown(self) -> None:
        """Stop what the scheduler side serves (e.g. a side channel)."""


class KVConnectorWorker(ABC):
    """Worker side, in every TP rank."""

    @abstractmethod
    def register_kv_caches(self, kv_caches: list[Any]) -> None:
        """This rank's KV tensor of each KV cache group, in group order."""

    @abstractmethod
    def start_load_kv(self, meta: ConnectorMetadata) -> None: ...

    @abstractmethod
    def get_finished(self) -> KVConnectorOutput:
        """What finished since the last call. A request's failure is reported in the output;
        raising (here or in `start_load_kv`) means this rank's connector cannot go on."""

    @abstractmethod
    def shutdown(self) -> None: ...
