"""Per-request records of `kvxfer bench serve` and what is computed from them: latency
percentiles, throughput, goodput under SLOs, and the PNG of CDFs and latency over time.

Definitions (the same as vLLM's `benchmark_serving`, so figures compare):
- TTFT: request sent -> first chunk that carries a token.
- TPOT: (end-to-end - TTFT) / (output tokens - 1); undefined for one-token outputs.
- ITL: gaps between consecutive token-bearing chunks (a chunk with several tokens is one gap).
- Goodput: successful requests per second that meet every given SLO (TTFT <= --slo-ttft-ms,
  TPOT <= --slo-tpot-ms; a one-token output has no TPOT and meets the TPOT SLO).
- Duration: first request sent -> last request finished, summed over rounds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    index: int
    klass: str
    round: int
    start_s: float  # when it was sent, from the start of the run (for latency-over-time plots)
    prompt_tokens: int
    max_tokens: int
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None  # error kind; None: success
    error_detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def as_json(self) -> dict:
        return asdict(self) | {"tpot_s": self.tpot_s}


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def met(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        if self.ttft_ms is not None and r.ttft_s * 1e3 > self.ttft_ms:
            return False
        tpot = r.tpot_s
        return self.tpot_ms is None or tpot is None or tpot * 1e3 <= self.tpot_ms


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def latency_stats(values_s: list[float]) -> dict:
    """mean and percentiles in milliseconds (NaN-free: None when there are no values)."""
    if not values_s:
        return {"count": 0, "mean_ms": None} | {f"p{p}_ms": None for p in PERCENTILES}
    ms = [v * 1e3 for v in values_s]
    return ({"count": len(ms), "mean_ms": sum(ms) / len(ms)}
            | {f"p{p}_ms": percentile(ms, p) for p in PERCENTILES})


def summarize(records: list[RequestRecord], duration_s: float, slo: SLO) -> dict:
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    good = sum(1 for r in ok if slo.met(r))
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    return {
        "requests": len(records),
        "completed": len(ok),
        "errors": errors,
        "duration_s": duration_s,
        "prompt_tokens": in_tokens,
        "output_tokens": out_tokens,
        "request_throughput": per_s(len(ok)),
        "output_token_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(in_tokens + out_tokens),
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "good_requests": good,
        "goodput": per_s(good),
        "slo_attainment": good / len(records) if records else 0.0,
        "ttft": latency_stats([r.ttft_s for r in ok]),
        "tpot": latency_stats([t for r in ok if (t := r.tpot_s) is not None]),
        "itl": latency_stats([g for r in ok for g in r.itl_s]),
        "e2e": latency_stats([r.e2e_s for r in ok]),
    }


def write_plot(path: str, runs: dict[str, list[RequestRecord]]) -> None:
    """Top row: CDFs of TTFT, TPOT and ITL per endpoint; bottom row: TTFT, TPOT and
    end-to-end latency of each request against when it was sent."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe when another backend was preselected
    import matplotlib.pyplot as plt

    metrics = (("TTFT", lambda r: [r.ttft_s]), ("TPOT", lambda r: [r.tpot_s] if r.tpot_s is not None else []),
               ("ITL", lambda r: r.itl_s))
    over_time = (("TTFT", lambda r: r.ttft_s), ("TPOT", lambda r: r.tpot_s), ("end-to-end", lambda r: r.e2e_s))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    for name, records in runs.items():
        ok = [r for r in records if r.ok]
        for ax, (label, get) in zip(axes[0], metrics):
            xs = sorted(v * 1e3 for r in ok for v in get(r))
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=name)
            ax.set(title=f"{label} CDF", xlabel="ms", ylabel="fraction of requests" if label != "ITL" else "fraction")
        for ax, (label, get) in zip(axes[1], over_time):
            pts = [(r.start_s, get(r) * 1e3) for r in ok if get(r) is not None]
            if pts:
                ax.scatter(*zip(*pts), s=8, label=name)
            ax.set(title=f"{label} over time", xlabel="request sent (s from start)", ylabel="ms")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)


HIT_BLOCKS = "kvxfer_prefix_cache_hit_blocks_total"
PROMPT_TOKENS = "kvxfer_prompt_tokens_total"


@dataclass(frozen=True)
class CacheCounters:
    """Prefix-cache hit blocks and prompt tokens, summed over the servers read (`--cache-metrics`)."""
    hit_blocks: float = 0.0
    prompt_tokens: float = 0.0

    def __sub__(self, other: CacheCounters) -> CacheCounters:
        return CacheCounters(self.hit_blocks - other.hit_blocks, self.prompt_tokens - other.prompt_tokens)

    def __add__(self, other: CacheCounters) -> CacheCounters:
        return CacheCounters(self.hit_blocks + other.hit_blocks, self.prompt_tokens + other.prompt_tokens)


def parse_cache_counters(page: str) -> CacheCounters:
    """The two counters of one kvxfer server's /metrics page (0 where absent)."""
    values = {HIT_BLOCKS: 0.0, PROMPT_TOKENS: 0.0}
    for line in page.splitlines():
        name, _, value = line.partition(" ")
        if name in values:
            values[name] = float(value)
    return CacheCounters(values[HIT_BLOCKS], values[PROMPT_TOKENS])


def hit_rate(delta: CacheCounters, block_size: int) -> float | None:
    """Share of the prompt tokens the servers computed that came from their prefix caches."""
    return delta.hit_blocks * block_size / delta.prompt_tokens if delta.prompt_tokens > 0 else None
