"""Token sampling from the last-position logits: greedy, temperature, top-p, per-request seeds.

Greedy rows take the argmax. Random rows are sampled together: temperature, top-p and the
draw run on all of them at once (exponential race: the argmax of `probs / E`, `E ~ Exp(1)`
per token, is a draw from `probs`), and one host transfer returns every row's token. Only
the noise is drawn per row where the request has a seed: the n-th output token's noise comes
from a generator seeded by (seed, n), so a seeded request gives the same tokens whatever it
is batched with, after a preemption, and wherever a token was drawn (a decode engine that
continues from a prefill engine's first token draws the second as a colocated one would);
the other rows share one draw from the worker's generator. Log-probs are those of the
model's distribution (before temperature and top-p): per sampled row that asks for them, a
{token id: log-prob} map of the chosen token and the row's top-k tokens, from one log_softmax
and one topk over the rows that ask.
"""

from __future__ import annotations

import hashlib
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
    n: int = 0  # the index of the output token drawn (seeded rows draw from (seed, n))


def draw_seed(seed: int, n: int) -> int:
    """The generator seed of a seeded request's n-th output token (64 bits of a hash, so that no
    two (seed, n) pairs are related the way `seed + n` would relate them)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{n}".encode(), digest_size=8).digest(), "little")


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._seeded = torch.Generator(device=device)  # reseeded per seeded draw

    def __call__(self, logits: torch.Tensor, infos: list[SamplingInfo]) -> list[tuple[int, dict[int, float] | None]]:
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        random_rows = [row for row, info in enumerate(infos) if info.temperature > 0.0]
        if random_rows:
            index = torch.tensor(random_rows, device=logits.device)
            tokens.index_copy_(0, index, self._draw(logits.index_select(0, index), [infos[r] for r in random_rows]))
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

    def _draw(self, logits: torch.Tensor, infos: list[SamplingInfo]) -> torch.Tensor:
        """One token per row of `logits` `[R, vocab]`, by each row's temperature and top-p."""
        temperatures = torch.tensor([info.temperature for info in infos], device=logits.device)
        probs = torch.softmax(logits / temperatures[:, None], dim=-1)
        top_p = [info.top_p for info in infos]
        if min(top_p) < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            limit = torch.tensor(top_p, device=logits.device)[:, None]
            sorted_probs.masked_fill_(sorted_probs.cumsum(-1) - sorted_probs >= limit, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self.generator)
        for row, info in enumerate(infos):
            if info.seed is not None:
                noise[row].exponential_(generator=self._seeded.manual_seed(draw_seed(info.seed, info.n)))
        # An exact zero draw would turn a removed token's 0 / 0 into NaN, which argmax picks.
        return (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
