"""Incremental detokenization against the tokenizer's own full decode, on text whose
characters span several byte-level tokens."""

from kvxfer.entrypoints.render import text_delta
from kvxfer.models.presets import make_model

TEXT = "Prefill → décode: 日本語 KV 🙂 caches, done."


def test_streamed_deltas_add_up_to_the_full_decode_and_never_emit_a_broken_character(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_model("tiny-qwen3", str(tmp_path)))
    ids = tok.encode(TEXT)
    assert len(ids) > len(TEXT) // 2  # byte-level pieces: some characters take several tokens
    pieces, offsets, windows = [], (0, 0), []

    def decode(window):
        windows.append(len(window))
        return tok.decode(window)

    for n in range(1, len(ids) + 1):
        delta, offsets = text_delta(decode, ids[:n], offsets, final=n == len(ids))
        assert "\ufffd" not in delta
        pieces.append(delta)
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert max(windows) < 8  # a short window each step, never the whole output
