"""A small byte-level BPE tokenizer trained offline on an embedded corpus, saved in the
HF format (`tokenizer.json`, `tokenizer_config.json`) for the random-weight presets."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = """
A prefill engine reads the whole prompt at once and writes the key and value cache for every layer.
A decode engine pulls that cache over the network and then produces one token at a time.
The cache is split into blocks of sixteen tokens, and every block holds all layers of a few heads.
When two requests share the same beginning, the second one can reuse the blocks of the first.
The scheduler mixes new prompts with running sequences so that the accelerator stays busy.
Tensor parallel ranks each hold a slice of the attention heads and of the feed forward layers.
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.
Once upon a time there was a small village by the sea where fishermen told long stories at night.
The river flows to the ocean, the clouds carry the rain back to the mountains, and the cycle goes on.
Numbers such as 1, 2, 3, 10, 42, 100 and 2024 appear in tables, dates, prices and measurements.
Questions: what is the capital of France? How many days are in a week? Why is the sky blue?
Answers: Paris is the capital of France. A week has seven days. Sunlight scatters in the air.
def add(a, b): return a + b  # a tiny function in a programming language with colons and brackets
{"name": "kvxfer", "blocks": [1, 2, 3], "ok": true} is a small piece of structured data.
Hello, world! Good morning. Thank you very much. Please write a short poem about the moon.
The teacher asked the students to explain why the model repeats itself when it is not trained.
"""


def build_tokenizer(vocab_size: int):
    """A trained `PreTrainedTokenizerFast` with at most `vocab_size` tokens, EOS and a chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in CORPUS.strip().splitlines() if line]
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )
