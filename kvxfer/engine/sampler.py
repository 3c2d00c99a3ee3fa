"""Token sampling from the last-position logits: greedy, temperature, top-p, per-request seeds.

Greedy rows take the argmax; random rows draw from their own `torch.Generator` when the
request has a seed (so a seeded request gives the same tokens whatever it is batched with)
and from the worker's generator otherwise. Log-probs are those of the model's distribution
(before temperature and top-p) at the chosen token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingInfo:
    """What rank 0 needs to sample one sequence's next token."""

    request_id: str
    temperature: float
    top_p: float
    seed: int | None
    logprobs: bool


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._request_generators.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, infos: list[SamplingInfo]) -> list[tuple[int, float | None]]:
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        for row, info in enumerate(infos):
            if info.temperature > 0.0:
                tokens[row] = self._draw(logits[row], info)
        want_logprobs = [row for row, info in enumerate(infos) if info.logprobs]
        chosen_logprobs: dict[int, float] = {}
        if want_logprobs:
            rows = torch.tensor(want_logprobs, device=logits.device)
            logprobs = torch.log_softmax(logits[rows], dim=-1).gather(1, tokens[rows].unsqueeze(1)).squeeze(1)
            chosen_logprobs = dict(zip(want_logprobs, logprobs.tolist()))
        return [(token, chosen_logprobs.get(row)) for row, token in enumerate(tokens.tolist())]

    def _draw(self, logits: torch.Tensor, info: SamplingInfo) -> torch.Tensor:
        probs = torch.softmax(logits / info.temperature, dim=-1)
        if info.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = sorted_probs.cumsum(0) - sorted_probs >= info.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=self._generator(info)).squeeze(0)

    def _generator(self, info: SamplingInfo) -> torch.Generator:
        if info.seed is None:
            return self.generator
        gen = self._request_generators.get(info.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(info.seed)
            self._request_generators[info.request_id] = gen
        return gen
