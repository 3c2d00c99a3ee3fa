"""Reads the parts of an engine `RequestOutput` the API returns in JSON."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from kvxfer.engine.request import RequestOutput


def as_dict(value: Any) -> dict | None:
    """kv_transfer_params / kv_transfer_stats as a JSON-ready dict (None when absent)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, msgspec.Struct):
        return msgspec.to_builtins(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def logprob_entries(output: RequestOutput, top_k: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """Per generated token: (token id, its log-prob, up to `top_k` alternatives best first).

    The engine reports a {token id: log-prob} map per position: the chosen token and the
    top-k tokens the request asked for (with k = 0 the chosen token alone).
    """
    entries = []
    for token_id, per_token in zip(output.output_token_ids, output.logprobs or ()):
        ranked = sorted(((int(i), float(v)) for i, v in per_token.items()), key=lambda x: -x[1])
        entries.append((int(token_id), float(per_token[token_id]), ranked[:top_k]))
    return entries
