"""Engine test helpers: prompts, preset availability, and the HF greedy reference."""

from __future__ import annotations

import importlib.util

import torch

BLOCK_SIZE = 16
# Shorter than a block, exact multiples of the block size, and in between.
PROMPT_LENGTHS = (3, 16, 32, 37)


def prompts_of(lengths=PROMPT_LENGTHS, vocab=512, offset=0):
    gen = torch.Generator().manual_seed(1234 + offset)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def preset_available(preset: str) -> bool:
    if preset == "tiny-deepseek-mla":
        return importlib.util.find_spec("kvxfer.models.deepseek") is not None
    return True


class HFReference:
    """Greedy continuations and first-token log-probs from HF transformers on the CPU."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self._cache: dict[tuple, tuple[list[int], list[float]]] = {}

    @torch.inference_mode()
    def greedy(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        """(tokens, log-prob of each chosen token), EOS ignored."""
        key = (tuple(prompt), max_tokens)
        if key not in self._cache:
            out = self.model(torch.tensor([prompt]), use_cache=True)
            tokens, logprobs = [], []
            for _ in range(max_tokens):
                logits = out.logits[0, -1].float()
                token = int(logits.argmax())
                tokens.append(token)
                logprobs.append(float(torch.log_softmax(logits, -1)[token]))
                out = self.model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            self._cache[key] = (tokens, logprobs)
        return self._cache[key]
