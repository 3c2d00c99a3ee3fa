"""Request bodies of the OpenAI-compatible API, validated strictly.

Validation happens before anything reaches the engine, so a bad request is rejected with a
clear message and changes nothing. Unknown top-level fields are ignored (OpenAI clients send
extras). `kv_transfer_params` is only required to be an object here: its shape has one parser,
`kvxfer.connectors.metadata.parse_kv_transfer_params`, which the server calls.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_TOP_LOGPROBS = 20

NonNegInt = Annotated[int, Field(ge=0)]


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
    kv_transfer_params: dict | None = None


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


class AbortRequest(BaseModel):
    """Optional body of /v1/abort/{request_id}: the token of the hold to release."""

    model_config = ConfigDict(strict=True, extra="forbid")

    transfer_token: Annotated[str, Field(min_length=1, max_length=256)] | None = None


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
