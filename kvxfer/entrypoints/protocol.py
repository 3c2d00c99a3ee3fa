"""Request bodies of the OpenAI-compatible API and of `kv_transfer_params`, validated strictly.

Validation happens before anything reaches the engine, so a bad request is rejected with a
clear message and changes nothing. Unknown top-level fields are ignored (OpenAI clients send
extras); unknown keys inside `kv_transfer_params` are rejected, since that dict drives reads
from another engine's memory.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_TOP_LOGPROBS = 20

NonNegInt = Annotated[int, Field(ge=0)]
Name = Annotated[str, Field(min_length=1, max_length=256)]


class KVTransferParams(BaseModel):
    """What a proxy passes between the legs; see docs/architecture.md, "Request flow"."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: Name | None = None
    remote_host: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:_\[\]-]+$")] | None = None
    remote_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    remote_block_ids: Annotated[list[NonNegInt], Field(min_length=1, max_length=1 << 20)] | None = None
    remote_request_id: Name | None = None
    remote_tp_size: Annotated[int, Field(ge=1, le=1024)] | None = None
    remote_num_tokens: Annotated[int, Field(ge=1)] | None = None
    remote_instance_id: Name | None = None
    transfer_token: Annotated[str, Field(min_length=32, max_length=128)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> KVTransferParams:
        remote = {k: v for k, v in self.model_dump().items() if k.startswith("remote_") or k == "transfer_token"}
        if self.do_remote_decode and self.do_remote_prefill:
            raise ValueError("do_remote_decode and do_remote_prefill are mutually exclusive")
        if self.do_remote_prefill:
            missing = [k for k, v in remote.items() if v is None]
            if missing:
                raise ValueError(f"do_remote_prefill needs {', '.join(missing)}")
            if len(set(self.remote_block_ids)) != len(self.remote_block_ids):
                raise ValueError("remote_block_ids contains duplicates")
        elif any(v is not None for v in remote.values()):
            raise ValueError("remote_* fields are only valid with do_remote_prefill=true")
        return self

    def to_engine(self) -> dict:
        # Only what is set: unset flags and fields stay absent, as the connector expects.
        return {k: v for k, v in self.model_dump().items() if v is not None and v is not False}


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    stream: bool = False
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    seed: int | None = None
    n: Literal[1] = 1
    ignore_eos: bool = False
    return_token_ids: bool = False
    kv_transfer_params: KVTransferParams | None = None


class CompletionRequest(_Sampling):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[NonNegInt], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: Literal[False] = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def token_limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class BadRequest(Exception):
    """A client error: becomes a 4xx with `message`, before any engine state changes."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


def parse_body(model: type[BaseModel], body: bytes) -> BaseModel:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise BadRequest(describe_errors(exc)) from None


def describe_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        # Drop pydantic's union-branch labels ("str", "list[int]") from locations.
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in {"str", "int"})))
        lines.append(f"{loc or 'body'}: {err['msg']}")
    return "; ".join(lines)


def parse_request_id(header: str | None) -> str | None:
    if header is None:
        return None
    if not REQUEST_ID_RE.match(header):
        raise BadRequest("X-Request-Id must be 1-128 characters of [A-Za-z0-9._:-]")
    return header
