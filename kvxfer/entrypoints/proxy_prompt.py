"""What the proxy's routing knows of a request's prompt: its block hashes and its length in tokens.

A prompt given as token ids is used as is. A text prompt (or chat messages) is tokenized with
the model's HF tokenizer when the proxy has one (`--tokenizer`); without one its characters are
hashed in blocks of `block_size * CHARS_PER_TOKEN` and its length estimated at
`CHARS_PER_TOKEN` characters a token: the same prompt still gets the same hashes, so routing by
prefix works, only the colocation threshold is an estimate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

from kvxfer.entrypoints.prefix_index import block_hashes

CHARS_PER_TOKEN = 4  # an English-text average; only used without a tokenizer


@dataclass(frozen=True)
class PromptKey:
    hashes: tuple[int, ...]  # chained hashes of the prompt's full blocks
    num_tokens: int  # the prompt's length in tokens (estimated without a tokenizer)
    block_tokens: int  # tokens a hash covers (the servers' block size)


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, messages: list, **kwargs) -> str: ...


def load_tokenizer(name_or_path: str) -> Tokenizer:
    # Imported only with --tokenizer: the proxy otherwise starts without transformers.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def prompt_key(body: dict, block_size: int, tokenizer: Tokenizer | None) -> PromptKey | None:
    """The key of a completions or chat request body; None when it has no single prompt the
    index can name (a batch of prompts, or a malformed one: the server answers those)."""
    prompt, messages = body.get("prompt"), body.get("messages")
    ids: list[int] | None = None
    text: str | None = None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = prompt
    elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        text = prompt[0]
    elif isinstance(prompt, str):
        text = prompt
    elif isinstance(messages, list) and messages:
        if tokenizer is not None:
            try:  # rendered as text, then encoded: the return type of tokenize=True varies by version
                rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception:  # noqa: BLE001 - a template that cannot render these messages: use the text
                rendered = None
            if isinstance(rendered, str):
                ids = tokenizer.encode(rendered, add_special_tokens=False)
        if ids is None:
            text = json.dumps(messages, sort_keys=True, separators=(",", ":"))
    else:
        return None
    if ids is None and tokenizer is not None and text is not None:
        ids = tokenizer.encode(text, add_special_tokens=True)
    if ids is not None:
        return PromptKey(tuple(block_hashes(ids, block_size)), len(ids), block_size)
    chars = block_size * CHARS_PER_TOKEN
    return PromptKey(tuple(block_hashes(text, chars)), len(text) // CHARS_PER_TOKEN, block_size)
