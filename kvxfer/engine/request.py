"""Request state inside the engine, and the output handed back to callers."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from kvxfer.connectors.metadata import RemoteDecodeParams, RemotePrefillParams
from kvxfer.engine.sampling_params import SamplingParams

# The parsed `kv_transfer_params` a request carries (parsed once, where it enters).
KVTransferParams = RemotePrefillParams | RemoteDecodeParams


class RequestIdInUse(ValueError):
    """The id names a request that is still unfinished, or finished but still holding KV
    blocks (for a remote reader, or while its own READs may land): ids are never shared."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class Request:
    """One sequence: its tokens, the KV blocks holding them, and how far they are computed."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        kv_transfer_params: KVTransferParams | None = None,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.kv_transfer_params = kv_transfer_params
        self.eos_token_ids = () if sampling_params.ignore_eos else tuple(eos_token_ids)
        # A prefill leg of a disaggregated request stops after its first token.
        self.max_tokens = 1 if isinstance(kv_transfer_params, RemoteDecodeParams) else sampling_params.max_tokens
        self.output_token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] = []  # per output token, when asked
        self.finish_reason: str | None = None
        if isinstance(kv_transfer_params, RemotePrefillParams):
            # The prefill sampled the first token (t1): this side continues from it, and t1 may
            # already end the request (EOS, or max_tokens 1: it counts).
            entry = kv_transfer_params.first_token_logprobs
            wants = sampling_params.logprobs is not None and entry is not None
            self.append_token(kv_transfer_params.first_token_id, dict(entry) if wants else None)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        # One block table per KV cache group (BlockManager), [] while the request holds none.
        self.block_tables: list[list[int]] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks cached so far
        self.num_cached_tokens = 0  # prompt tokens served from the local prefix cache
        self.num_external_tokens = 0  # prompt tokens arriving from a remote engine
        self.remote_kv_checked = False  # the connector was asked once; recompute never asks again
        self.num_preemptions = 0
        self.error: str | None = None
        self.error_kind: str | None = None  # a failed KV transfer's KVTransferError.kind
        self.output_kv_transfer_params: dict[str, Any] | None = None
        self.kv_transfer_stats: dict[str, Any] | None = None
        self.num_new_tokens_emitted = 0  # output tokens already reported in a RequestOutput

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) without concatenating the whole sequence (decode steps)."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def block_ids(self) -> list[int]:
        """The first group's block table (the only one for a model without sliding layers)."""
        return self.block_tables[0] if self.block_tables else []

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_token(self, token_id: int, logprobs: dict[int, float] | None) -> None:
        self.output_token_ids.append(token_id)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        if token_id in self.eos_token_ids:
            self.finish_reason = "stop"
        elif len(self.output_token_ids) >= self.max_tokens:
            self.finish_reason = "length"

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})"
        )


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    new_token_ids: list[int]
    text: str = ""  # the whole output's text, set by `LLM.generate` (the engine works in token ids)
    finished: bool = False
    finish_reason: str | None = None
    # Per output token: {token id: log-prob} of the chosen token and the top-k alternatives.
    logprobs: list[dict[int, float]] | None = None
    error: str | None = None
    # "params" | "peer" | "transfer" when a KV transfer failed (kvxfer.connectors.base
    # KVTransferError kinds: the request's kv_transfer_params, the peer, other); else None.
    error_kind: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    kv_transfer_stats: dict[str, Any] | None = None
    num_cached_tokens: int = 0
