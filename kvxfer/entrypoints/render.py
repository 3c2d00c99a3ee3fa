"""Text <-> token ids for the API server: prompts, chat templates, incremental detokenization
(the one detokenizer: the engine works in token ids; `LLM` decodes finished outputs whole)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from transformers import AutoTokenizer

from kvxfer.entrypoints.protocol import BadRequest, ChatMessage

# Used when the tokenizer config has no chat template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class Renderer:
    def __init__(self, model_dir: str):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.vocab_size: int = config["vocab_size"]
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise BadRequest("prompt: encodes to zero tokens")
            return ids
        bad = [t for t in prompt if t >= self.vocab_size]
        if bad:
            raise BadRequest(f"prompt: token id {bad[0]} is out of range (vocab size {self.vocab_size})")
        return list(prompt)

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        try:
            plain = [{"role": m.role, "content": m.text()} for m in messages]
        except ValueError as exc:
            raise BadRequest(f"messages: {exc}") from None
        template = None if self.has_chat_template else DEFAULT_CHAT_TEMPLATE
        text = self.tokenizer.apply_chat_template(
            plain, chat_template=template, add_generation_prompt=True, tokenize=False
        )
        return self.encode_prompt_text_raw(text)

    def encode_prompt_text_raw(self, text: str) -> list[int]:
        # The template already placed any special tokens it wants.
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise BadRequest("messages: render to zero tokens")
        return ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


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


class IncrementalText:
    """Text deltas for streaming one output (`text_delta`: a short window per token, a trailing
    incomplete UTF-8 sequence held back until the next token completes it)."""

    def __init__(self, renderer: Renderer):
        self.renderer = renderer
        self.offsets: Offsets = (0, 0)

    def delta(self, token_ids: list[int], final: bool) -> str:
        new, self.offsets = text_delta(self.renderer.decode, token_ids, self.offsets, final)
        return new

    def held_back(self, token_ids: list[int]) -> str:
        """What a final delta would flush now (an incomplete character as U+FFFD); the state stays."""
        return text_delta(self.renderer.decode, token_ids, self.offsets, final=True)[0]
