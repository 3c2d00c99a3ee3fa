"""The proxy's relay payloads: reading a prefill's answer (its params, t1), the chunks the client's
stream is made of around t1, and errors as answers or events. Pure functions of the payloads;
the legs that send them are `proxy_router.Router`'s."""

from __future__ import annotations

import json

import httpx
from fastapi.responses import JSONResponse, Response

from kvxfer.entrypoints.proxy_pool import Backend

DONE_EVENT = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client disconnected while a leg was in progress."""


class UpstreamError(Exception):
    def __init__(self, status: int, message: str, backend: Backend | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.backend = backend  # set when the request may have reached it


def error_json(status: int, message: str, kind: str = "proxy_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)



async def ready(decode: Backend, resp: httpx.Response) -> tuple[Backend, httpx.Response]:
    return decode, resp


def prefill_answer(resp: httpx.Response) -> dict | None:
    """A prefill answer read to its end: its JSON object, or a streamed one's first event; None
    when it is neither."""
    content = resp.content
    try:
        if content.startswith(b"data: "):
            content = content[6:].split(b"\n\n", 1)[0]
        answer = json.loads(content)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def prefill_params(answer: dict | None) -> dict | None:
    """The `kv_transfer_params` object of a prefill answer, or None when there is none."""
    params = (answer or {}).get("kv_transfer_params")
    return params if isinstance(params, dict) else None


def completed_by_first_token(body: dict, answer: dict) -> bool:
    """Whether the prefill's token completes the client's request: the prefill stopped (EOS), or
    the client asked for one token."""
    choices = answer.get("choices")
    stopped = isinstance(choices, list) and bool(choices) and isinstance(choices[0], dict) \
        and choices[0].get("finish_reason") == "stop"
    return stopped or (body.get("max_completion_tokens") or body.get("max_tokens")) == 1


def continuing(event: dict) -> dict:
    """The prefill's (final) event as a chunk the stream continues after, as a colocated server
    sends it: no finish_reason and none of the final chunk's fields."""
    skip = ("usage", "kv_transfer_params", "kv_transfer_stats", "prompt_token_ids", "held_back_text")
    chunk = {k: v for k, v in event.items() if k not in skip}
    chunk["choices"] = [c | {"finish_reason": None} for c in event.get("choices") or ()]
    return chunk


def final_after(event: dict) -> dict:
    """The final chunk after the prefill's event when its token completed the request: no new
    tokens, the text the prefill held back (what a colocated server flushes at the end: an
    incomplete character as U+FFFD), the prefill's finish_reason and usage."""
    flushed = event.get("held_back_text") or ""
    choices = []
    for c in event.get("choices") or ():
        rest = {"delta": {"content": flushed}} if "delta" in c else {"text": flushed}
        if "token_ids" in c:
            rest["token_ids"] = []
        choices.append(c | {"logprobs": None} | rest)
    final = {k: v for k, v in event.items() if k != "held_back_text"}
    return final | {"choices": choices, "kv_transfer_params": None}


def sse_event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def error_event(status: int, message: str, kind: str = "proxy_error") -> bytes:
    return sse_event({"error": {"message": message, "type": kind, "code": status}})


def upstream_error(resp: httpx.Response, who: str) -> tuple[int, str, str]:
    """(status, message, type) of a backend's error answer: a 4xx (the client's request was bad)
    keeps the server's own status and message; a 504 (the prefill's lease ran out before the
    decode's pull: KV failure kind "expired") stays a 504."""
    try:
        detail = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        detail = resp.text[:500]
    if 400 <= resp.status_code < 500:
        return resp.status_code, detail, "invalid_request_error"
    if resp.status_code == 504:
        return 504, f"{who} returned 504: {detail}", "proxy_error"
    return 502, f"{who} returned {resp.status_code}: {detail}", "proxy_error"


def transfer_token_of(params: dict) -> str | None:
    token = params.get("transfer_token")
    return token if isinstance(token, str) else None


def passthrough_error(resp: httpx.Response, who: str) -> Response:
    if 400 <= resp.status_code < 500:  # the client's request was bad: pass the server's answer on
        return Response(resp.content, status_code=resp.status_code, media_type="application/json")
    status, message, kind = upstream_error(resp, who)
    return error_json(status, message, kind)
