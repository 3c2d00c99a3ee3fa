"""The proxy's routing decisions, pure functions of the candidates' state (no I/O, no clock but
the `now` given): which prefill server, which decode server, and whether to disaggregate.

- `round_robin`, `least_loaded` (fewest requests in flight from this proxy): as before, on both
  pools.
- `prefix_aware`: prefill by the longest prefix match in the server's index, unless that server
  has more than `balance` requests in flight above the least-loaded candidate (then the best
  match among those within it; SGLang's router balances the same way); no match anywhere: the
  least loaded, ties to the one whose index holds least (most room for a new prefix). Decode by
  KV room and running requests from the servers' /metrics (`LoadReport`, read in the background;
  a report older than `max_age_s` is not used): fewest requests (running + waiting as reported,
  plus what this proxy sent since), then most free blocks; without a fresh report, by in-flight
  count alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvxfer.entrypoints.proxy_pool import Backend
from kvxfer.entrypoints.proxy_prompt import PromptKey

POLICIES = ("round_robin", "least_loaded", "prefix_aware")
DEFAULT_BALANCE = 4  # in-flight requests a prefix match may be above the least-loaded server
DEFAULT_MAX_AGE_S = 10.0  # a load report older than this is not used (--load-max-age)


@dataclass(frozen=True)
class Choice:
    backend: Backend
    matched_blocks: int  # leading prompt blocks the backend's index holds (0 without a key)


def by_prefix(live: Sequence[Backend], key: PromptKey | None, balance: int) -> Choice:
    """Longest prefix match within `balance` in-flight requests of the least-loaded server."""
    least = min(b.in_flight for b in live)
    within = [b for b in live if b.in_flight <= least + balance]
    matches = [(b.index.match(key.hashes) if key is not None else 0, b) for b in within]
    best = max(m for m, _ in matches)
    if best == 0:  # nobody has it: spread new prefixes by load, then by index room
        return Choice(min(within, key=lambda b: (b.in_flight, len(b.index))), 0)
    tied = [b for m, b in matches if m == best]
    return Choice(min(tied, key=lambda b: b.in_flight), best)


def by_kv_room(live: Sequence[Backend], now: float, max_age_s: float) -> Backend:
    """Fewest requests (reported + sent since the report), then most free KV blocks; a stale or
    missing report counts the proxy's own in-flight requests only."""
    def score(b: Backend) -> tuple[float, float]:
        report = b.load
        if report is None or now - report.at > max_age_s:
            return (b.in_flight, 0.0)
        return (report.load.running + report.load.waiting + b.sent_since_report, -report.load.free_blocks)

    return min(live, key=score)


def uncached_tokens(key: PromptKey, matched_blocks: int) -> int:
    """Prompt tokens a server holding `matched_blocks` of the prompt still has to compute."""
    return max(0, key.num_tokens - matched_blocks * key.block_tokens)


def colocate(key: PromptKey | None, decode_matched_blocks: int, threshold_tokens: int) -> bool:
    """Serve on the decode server alone: what it would compute itself is under the threshold
    (a short prompt, or one whose prefix it already holds), so a prefill hop and a KV pull would
    cost more than they save. No key (unknown prompt) or threshold 0: disaggregate."""
    return threshold_tokens > 0 and key is not None and uncached_tokens(key, decode_matched_blocks) < threshold_tokens


@dataclass
class Pool:
    """One role's servers and how one is chosen (`policy`, see the module docstring)."""
    role: str
    backends: list[Backend]
    policy: str
    balance: int = DEFAULT_BALANCE
    max_age_s: float = DEFAULT_MAX_AGE_S
    _turn: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")

    def live(self, exclude: set[str] = frozenset()) -> list[Backend]:
        return [b for b in self.backends if b.healthy and b.url not in exclude]

    def choose(self, exclude: set[str], key: PromptKey | None = None, now: float = 0.0,
               by_prefix_match: bool | None = None) -> Choice | None:
        """The backend for a request (None when no healthy one is left): by the pool's policy;
        under `prefix_aware` by prefix match when `by_prefix_match` (default: the prefill pool),
        else by KV room."""
        live = self.live(exclude)
        if not live:
            return None
        if self.policy == "least_loaded":
            return Choice(min(live, key=lambda b: b.in_flight), 0)
        if self.policy == "round_robin":
            return Choice(live[next(self._turn) % len(live)], 0)
        if by_prefix_match if by_prefix_match is not None else self.role == "prefill":
            return by_prefix(live, key, self.balance)
        return Choice(by_kv_room(live, now, self.max_age_s), 0)

    def pick(self, exclude: set[str]) -> Backend | None:
        choice = self.choose(exclude)
        return choice.backend if choice is not None else None

    def find(self, url: str) -> Backend | None:
        return next((b for b in self.backends if b.url == url), None)

    def describe(self) -> str:
        return "; ".join(f"{b.url}: {b.problem}" for b in self.backends) or "no servers"
