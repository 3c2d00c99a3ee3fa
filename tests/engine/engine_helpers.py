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
    """Greedy continuations, their log-probs and top-3 log-probs from HF transformers on the CPU."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self._cache: dict[tuple, tuple[list[int], list[float], list[dict[int, float]]]] = {}

    def greedy(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        """(tokens, log-prob of each chosen token), EOS ignored."""
        return self._run(prompt, max_tokens)[:2]

    def top3(self, prompt: list[int], max_tokens: int) -> list[dict[int, float]]:
        """Per greedy position: {token id: log-prob} of the three most likely tokens, best first."""
        return self._run(prompt, max_tokens)[2]

    @torch.inference_mode()
    def _run(self, prompt: list[int], max_tokens: int):
        key = (tuple(prompt), max_tokens)
        if key not in self._cache:
            out = self.model(torch.tensor([prompt]), use_cache=True)
            tokens, logprobs, tops = [], [], []
            for _ in range(max_tokens):
                lp = torch.log_softmax(out.logits[0, -1].float(), -1)
                token = int(lp.argmax())
                tokens.append(token)
                logprobs.append(float(lp[token]))
                values, ids = lp.topk(3)
                tops.append(dict(zip(ids.tolist(), values.tolist())))
                out = self.model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            self._cache[key] = (tokens, logprobs, tops)
        return self._cache[key]
