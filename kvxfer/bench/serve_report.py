"""The text report of `kvxfer bench serve`: the per-endpoint table and the ratios against the
first endpoint."""

from __future__ import annotations

from kvxfer.bench.serve_metrics import SLO

# Summary fields compared across endpoints: (section, key); ratio = endpoint / first endpoint.
RATIO_FIELDS = (("ttft", "mean_ms"), ("ttft", "p50_ms"), ("ttft", "p99_ms"), ("tpot", "p50_ms"), ("tpot", "p99_ms"),
                ("itl", "p99_ms"), ("e2e", "p50_ms"), ("e2e", "p99_ms"), (None, "request_throughput"),
                (None, "output_token_throughput"), (None, "goodput"))



def ratios(endpoints: dict) -> dict:
    """Each endpoint's RATIO_FIELDS divided by the first endpoint's (None where undefined)."""
    names = list(endpoints)
    base = endpoints[names[0]]["summary"]
    out = {}
    for name in names[1:]:
        s = endpoints[name]["summary"]
        out[f"{name}/{names[0]}"] = {
            _label(sec, key): _div(_get(s, sec, key), _get(base, sec, key)) for sec, key in RATIO_FIELDS}
    return out


def _get(summary: dict, section: str | None, key: str):
    return summary[key] if section is None else summary[section][key]


def _div(a, b):
    return a / b if a is not None and b else None


def _label(section: str | None, key: str) -> str:
    return key if section is None else f"{section}_{key}"


# ---------------------------------------------------------------- report


def report(result: dict, slo: SLO) -> str:
    eps = result["endpoints"]
    names = list(eps)
    rows = [("completed / requests", lambda s: f"{s['completed']}/{s['requests']}"),
            ("errors", lambda s: ",".join(f"{k}:{v}" for k, v in s["errors"].items()) or "-"),
            ("duration s", lambda s: f"{s['duration_s']:.2f}"),
            ("requests/s", lambda s: f"{s['request_throughput']:.2f}"),
            ("output tokens/s", lambda s: f"{s['output_token_throughput']:.1f}"),
            (f"goodput req/s ({_slo_text(slo)})", lambda s: f"{s['goodput']:.2f}"),
            ("prefill cache hit rate", lambda s: _fmt(s.get("prefill_cache_hit_rate"), ".3f"))]
    for sec in ("ttft", "tpot", "itl", "e2e"):
        for key in ("mean_ms", "p50_ms", "p90_ms", "p99_ms"):
            rows.append((f"{sec.upper()} {key[:-3]} ms", lambda s, sec=sec, key=key: _fmt(s[sec][key])))
    lines = []
    width = max(len(r[0]) for r in rows) + 2
    lines.append(" " * width + "".join(f"{n:>14}" for n in names))
    for label, fmt in rows:
        line = f"{label:<{width}}" + "".join(f"{fmt(eps[n]['summary']):>14}" for n in names)
        lines.append(line)
    if len(names) > 1:
        lines.append("ratios (endpoint / " + names[0] + "):")
        for pair, vals in result["ratios"].items():
            lines.append(f"  {pair}: " + ", ".join(f"{k}={_fmt(v, '.3f')}" for k, v in vals.items()))
    for n in names:
        for klass, s in eps[n]["classes"].items():
            lines.append(f"{n} [{klass}] n={s['completed']}: TTFT p50/p99 {_fmt(s['ttft']['p50_ms'])}/"
                         f"{_fmt(s['ttft']['p99_ms'])} ms, TPOT p50/p99 {_fmt(s['tpot']['p50_ms'])}/"
                         f"{_fmt(s['tpot']['p99_ms'])} ms, goodput {s['goodput']:.2f} req/s")
    return "\n".join(lines)


def _slo_text(slo: SLO) -> str:
    parts = [f"{name} <= {v:g} ms" for name, v in (("TTFT", slo.ttft_ms), ("TPOT", slo.tpot_ms)) if v is not None]
    return ", ".join(parts) or "no SLO"


def _fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)
