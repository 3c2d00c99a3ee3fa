"""Token sampling from the last-position logits: greedy, temperature, top-p, per-request seeds.

Greedy rows take the argmax; random rows draw from their own `torch.Generator` when the
request has a seed (so a seeded request gives the same tokens whatever it is batched with)
and from the worker's generator otherwise. Log-probs are those of the model's distribution
(before temperature and top-p): per sampled row that asks for them, a {token id: log-prob}
map of the chosen token and the row's top-k tokens, from one log_softmax and one topk over
the rows that ask.
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
    logprobs: int | None  # None: none; k: the chosen token and the top k


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._request_generators.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, infos: list[SamplingInfo]) -> list[tuple[int, dict[int, float] | None]]:
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        for row, info in enumerate(infos):
            if info.temperature > 0.0:
                tokens[row] = self._draw(logits[row], info)
        token_list = tokens.tolist()
        return list(zip(token_list, self._logprobs(logits, tokens, token_list, infos)))

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, tokens: torch.Tensor, token_list: list[int], infos: list[SamplingInfo]
    ) -> list[dict[int, float] | None]:
        result: list[dict[int, float] | None] = [None] * len(infos)
        rows = [row for row, info in enumerate(infos) if info.logprobs is not None]
        if not rows:
            return result
        index = torch.tensor(rows, device=logits.device)
        logprobs = torch.log_softmax(logits[index], dim=-1)
        chosen = logprobs.gather(1, tokens[index].unsqueeze(1)).squeeze(1).tolist()
        k = min(max(infos[row].logprobs for row in rows), logprobs.shape[-1])
        top_values, top_ids = [[] for _ in rows], [[] for _ in rows]
        if k:
            values, ids = logprobs.topk(k, dim=-1)
            top_values, top_ids = values.tolist(), ids.tolist()
        for i, row in enumerate(rows):
            n = infos[row].logprobs
            entry = dict(zip(top_ids[i][:n], top_values[i][:n]))  # best first
            entry.setdefault(token_list[row], chosen[i])
            result[row] = entry
        return result

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
