"""The workload of `kvxfer bench serve`: request classes, prompts and arrival times.

A workload is a pure function of its spec and seed, so every endpoint of a comparison (and
every rerun) gets the same prompts at the same offsets. Prompts are random token ids (exact
lengths, no tokenizer needed) or random words (the server's `usage` gives the real length);
each prompt is drawn independently, so prefix caching cannot turn one request into a hit on
another, except with `--shared-prefix N:LO-HI`: then every prompt is one of N "system prompts"
(LO-HI tokens, lengths fixed by the seed) followed by a user turn of `--input-len`, the system
prompt drawn uniformly per request (a router that keeps each on one prefill server hits its
cache). The system prompts' token ids are drawn afresh for each (round, endpoint) (`salt`), so
an endpoint never finds the previous endpoint's prompts in a shared server's cache: every
endpoint sees the same shapes, lengths and arrivals, none a warm start.
"""

from __future__ import annotations

import argparse
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

# Words for text prompts; lowercase ASCII so any tokenizer splits them into a few tokens.
WORDS = ("the model reads every token of a long prompt before it writes the first word of its answer "
         "while short chats wait behind it in the same batch unless prefill runs on another machine").split()


@dataclass(frozen=True)
class LengthRange:
    lo: int
    hi: int

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.lo, self.hi)

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


@dataclass(frozen=True)
class RequestClass:
    """One kind of request in a mix: its share of requests and its length ranges."""

    name: str
    weight: float
    input_len: LengthRange
    output_len: LengthRange


@dataclass(frozen=True)
class BenchRequest:
    index: int
    klass: str
    prompt: list[int] | str
    prompt_len: int  # tokens for id prompts; words for text prompts (usage has the real count)
    max_tokens: int
    arrival_s: float  # offset from the start of its round; 0 for closed-loop runs


@dataclass(frozen=True)
class SharedPrefix:
    count: int
    length: LengthRange


@dataclass(frozen=True)
class WorkloadSpec:
    classes: tuple[RequestClass, ...]
    prompt_format: str  # "ids" | "text"
    token_ids: LengthRange  # prompt token ids are drawn uniformly from this inclusive range
    request_rate: float | None  # Poisson arrivals per second; None: all arrive at once
    seed: int
    shared_prefix: SharedPrefix | None = None

    def prefixes(self, stream: int, salt: int) -> list[list[int]]:
        """The system prompts of a stream: lengths by the seed, token ids by (stream, salt)."""
        if self.shared_prefix is None:
            return []
        sizes = random.Random(f"{self.seed}/prefix-lengths")
        lengths = [self.shared_prefix.length.draw(sizes) for _ in range(self.shared_prefix.count)]
        rng = random.Random(f"{self.seed}/{stream}/prefixes/{salt}")
        return [[rng.randint(self.token_ids.lo, self.token_ids.hi) for _ in range(n)] for n in lengths]

    def requests(self, stream: int, salt: int = 0) -> Iterator[BenchRequest]:
        """The requests of stream `stream`, endless (rounds and warm-up use distinct streams,
        so measured requests do not depend on how many warm-up requests ran); `salt` changes
        only the system prompts' token ids (see the module docstring)."""
        rng = random.Random(f"{self.seed}/{stream}")
        prefixes = self.prefixes(stream, salt)
        weights = [c.weight for c in self.classes]
        t = 0.0
        for i in itertools.count():
            klass = rng.choices(self.classes, weights)[0]
            n_in, n_out = klass.input_len.draw(rng), klass.output_len.draw(rng)
            if self.prompt_format == "ids":
                prompt: list[int] | str = [rng.randint(self.token_ids.lo, self.token_ids.hi) for _ in range(n_in)]
            else:
                prompt = " ".join(rng.choice(WORDS) for _ in range(n_in))
            if prefixes:
                prompt = rng.choice(prefixes) + prompt
                n_in = len(prompt)
            if self.request_rate is not None:
                t += rng.expovariate(self.request_rate)
            yield BenchRequest(i, klass.name, prompt, n_in, n_out, t)


def length_range(text: str) -> LengthRange:
    """`N` or `LO-HI` (inclusive, uniform)."""
    lo, _, hi = text.strip().partition("-")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI, got {text!r}") from None
    if not 1 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI with 1 <= LO <= HI, got {text!r}")
    return LengthRange(lo_i, hi_i)


def request_class(text: str) -> RequestClass:
    """`NAME:WEIGHT:INPUT:OUTPUT`, e.g. `chat:0.8:16-64:32-64` or `long:0.2:1024:16`."""
    parts = text.split(":")
    if len(parts) != 4 or not parts[0]:
        raise argparse.ArgumentTypeError(f"--mix expects NAME:WEIGHT:INPUT:OUTPUT, got {text!r}")
    try:
        weight = float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mix {text!r}: WEIGHT must be a number") from None
    if not weight > 0:
        raise argparse.ArgumentTypeError(f"--mix {text!r}: WEIGHT must be > 0")
    return RequestClass(parts[0], weight, length_range(parts[2]), length_range(parts[3]))



def shared_prefix(text: str) -> SharedPrefix:
    """`N:LO-HI` (N system prompts of LO-HI tokens), e.g. `8:512-1024`."""
    count, sep, length = text.partition(":")
    if not sep or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"--shared-prefix expects N:LO-HI with N >= 1, got {text!r}")
    return SharedPrefix(int(count), length_range(length))
