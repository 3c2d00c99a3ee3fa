"""Incremental detokenization: the text a growing list of token ids adds, decoding only a
short window per step (not the whole output), shared by the engine and the API server."""

from __future__ import annotations

from typing import Callable

Offsets = tuple[int, int]  # (window start, end of the tokens whose text was already emitted)


def text_delta(
    decode: Callable[[list[int]], str], token_ids: list[int], offsets: Offsets, final: bool = False
) -> tuple[str, Offsets]:
    """The new text of `token_ids` since `offsets`, and the offsets to pass next time.

    Decodes the window from the start offset twice, without and with the new tokens (so a
    tokenizer that merges or spaces tokens by context sees them in context), and emits what
    the second adds. While that ends in an incomplete UTF-8 sequence (U+FFFD) nothing is
    emitted and the offsets stay, so the next token completes it; `final` emits it anyway.
    """
    start, read = offsets
    before = decode(token_ids[start:read])
    after = decode(token_ids[start:])
    if len(after) > len(before) and (final or not after.endswith("\ufffd")):
        return after[len(before) :], (read, len(token_ids))
    return "", offsets
