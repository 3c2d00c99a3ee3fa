"""The arithmetic of `kvxfer bench serve`, each against an independent computation:
percentiles (statistics.quantiles), TPOT and goodput (by hand), Poisson arrivals (moments of
the exponential distribution), class mix shares, workload reproducibility, argument errors."""

from __future__ import annotations

import argparse
import itertools
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvxfer.bench.serve_metrics import SLO, RequestRecord, percentile, summarize
from kvxfer.bench.serve_workload import LengthRange, RequestClass, WorkloadSpec, length_range, request_class


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), min_size=2, max_size=60),
       st.sampled_from([1, 10, 50, 90, 99]))
def test_percentile_matches_statistics_inclusive(xs, p):
    # statistics.quantiles(method="inclusive") is the same linear interpolation between ranks.
    expected = statistics.quantiles(xs, n=100, method="inclusive")[p - 1]
    assert percentile(xs, p) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_percentile_edges():
    assert percentile([7.0], 99) == 7.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)


def _rec(i, ttft_ms, e2e_ms, n_out, error=None):
    return RequestRecord(i, "all", 0, 0.0, 10, n_out, output_tokens=n_out, ttft_s=ttft_ms / 1e3,
                         e2e_s=e2e_ms / 1e3, error=error)


def test_tpot_and_goodput_by_hand():
    records = [
        _rec(0, 50, 50 + 9 * 10, 10),   # TTFT 50, TPOT 10: meets both
        _rec(1, 150, 150 + 9 * 5, 10),  # TTFT over 100
        _rec(2, 20, 20 + 4 * 30, 5),    # TPOT 30 over 20
        _rec(3, 80, 80, 1),             # one token: no TPOT, TTFT ok -> good
        _rec(4, 10, 20, 2, error="http_500"),
    ]
    assert records[0].tpot_s == pytest.approx(0.010)
    assert records[2].tpot_s == pytest.approx(0.030)
    assert records[3].tpot_s is None and records[4].tpot_s is None
    s = summarize(records, duration_s=2.0, slo=SLO(ttft_ms=100, tpot_ms=20))
    assert (s["requests"], s["completed"], s["errors"]) == (5, 4, {"http_500": 1})
    assert s["good_requests"] == 2 and s["goodput"] == pytest.approx(1.0)
    assert s["request_throughput"] == pytest.approx(2.0)
    assert s["output_tokens"] == 26 and s["output_token_throughput"] == pytest.approx(13.0)
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["ttft"]["p50_ms"] == pytest.approx(statistics.median([50, 150, 20, 80]))
    assert s["tpot"]["count"] == 3  # the one-token request has none
    # No SLO given: every success is good.
    assert summarize(records, 2.0, SLO())["good_requests"] == 4


def test_poisson_arrivals_have_exponential_gaps():
    spec = WorkloadSpec((RequestClass("all", 1, LengthRange(4, 4), LengthRange(1, 1)),), "ids",
                        LengthRange(1, 9), request_rate=20.0, seed=3)
    times = [r.arrival_s for r in itertools.islice(spec.requests(0), 5000)]
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    assert all(g >= 0 for g in gaps)
    # Exponential with rate 20: mean 0.05 and standard deviation 0.05 (standard error ~1.4% at n=5000).
    assert statistics.fmean(gaps) == pytest.approx(0.05, rel=0.06)
    assert statistics.pstdev(gaps) == pytest.approx(0.05, rel=0.1)
    closed = WorkloadSpec(spec.classes, "ids", LengthRange(1, 9), request_rate=None, seed=3)
    assert {r.arrival_s for r in itertools.islice(closed.requests(0), 50)} == {0.0}


def test_mix_shares_lengths_and_reproducibility():
    classes = (RequestClass("chat", 3, LengthRange(8, 16), LengthRange(4, 6)),
               RequestClass("long", 1, LengthRange(300, 400), LengthRange(2, 2)))
    spec = WorkloadSpec(classes, "ids", LengthRange(20, 30), None, seed=1)
    reqs = list(itertools.islice(spec.requests(0), 4000))
    share = sum(r.klass == "long" for r in reqs) / len(reqs)
    assert share == pytest.approx(0.25, abs=0.03)
    for r in reqs[:200]:
        c = classes[0] if r.klass == "chat" else classes[1]
        assert c.input_len.lo <= len(r.prompt) <= c.input_len.hi and len(r.prompt) == r.prompt_len
        assert c.output_len.lo <= r.max_tokens <= c.output_len.hi
        assert all(20 <= t <= 30 for t in r.prompt)
    again = list(itertools.islice(spec.requests(0), 50))
    assert again == reqs[:50]
    other = list(itertools.islice(spec.requests(1), 50))
    assert [r.prompt for r in other] != [r.prompt for r in again]
    text = WorkloadSpec(classes, "text", LengthRange(20, 30), None, seed=1)
    first = next(text.requests(0))
    assert isinstance(first.prompt, str) and len(first.prompt.split()) == first.prompt_len


@pytest.mark.parametrize("parse,text,needle", [
    (length_range, "0", "1 <= LO <= HI"), (length_range, "9-3", "1 <= LO <= HI"), (length_range, "x", "N or LO-HI"),
    (request_class, "chat:1:8", "NAME:WEIGHT:INPUT:OUTPUT"), (request_class, "chat:-1:8:8", "WEIGHT must be > 0"),
    (request_class, "chat:w:8:8", "WEIGHT must be a number"),
])
def test_bad_arguments_name_the_field(parse, text, needle):
    with pytest.raises(argparse.ArgumentTypeError, match=needle):
        parse(text)


@pytest.mark.parametrize("argv,needle", [
    (["--duration", "5"], "--duration needs --request-rate"),
    (["--sequential", "--concurrency", "2"], "--sequential excludes"),
    (["--num-requests", "4", "--duration", "5", "--concurrency", "1"], "not both"),
    (["--endpoint", "b=http://127.0.0.1:2", "--num-requests", "2", "--rounds", "3"], "--rounds 3 exceeds"),
    (["--endpoint", "a=http://127.0.0.1:2"], "names must be distinct"),
    (["--mix", "a:1:8:8", "--mix", "a:2:9:9"], "class names must be distinct"),
])
def test_inconsistent_options_are_refused_by_name(argv, needle):
    from kvxfer.bench.serve import add_arguments, plan

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit, match=needle):
        plan(parser.parse_args(["--endpoint", "a=http://127.0.0.1:1", *argv]))


def test_shared_prefix_workload_and_cache_hit_rate():
    from kvxfer.bench.serve_metrics import CacheCounters, hit_rate, parse_cache_counters
    from kvxfer.bench.serve_workload import SharedPrefix, shared_prefix

    spec = WorkloadSpec((RequestClass("turn", 1.0, LengthRange(8, 16), LengthRange(4, 4)),), "ids",
                        LengthRange(16, 500), 5.0, 3, SharedPrefix(4, LengthRange(40, 60)))
    prefixes = spec.prefixes(0, salt=0)
    assert len(prefixes) == 4 and all(40 <= len(p) <= 60 for p in prefixes)
    reqs = list(itertools.islice(spec.requests(0, salt=0), 200))
    used = set()
    for r in reqs:
        (k,) = [i for i, p in enumerate(prefixes) if r.prompt[:len(p)] == p]
        used.add(k)
        assert 8 <= len(r.prompt) - len(prefixes[k]) <= 16 and r.prompt_len == len(r.prompt)
    assert used == {0, 1, 2, 3}
    # Another endpoint (salt): same lengths and arrivals, other system prompts' ids.
    other = list(itertools.islice(spec.requests(0, salt=1), 200))
    assert [r.prompt_len for r in other] == [r.prompt_len for r in reqs]
    assert [r.arrival_s for r in other] == [r.arrival_s for r in reqs]
    assert [len(p) for p in spec.prefixes(0, 1)] == [len(p) for p in prefixes]
    assert not set(map(tuple, spec.prefixes(0, 1))) & set(map(tuple, prefixes))
    assert shared_prefix("8:512-1024") == SharedPrefix(8, LengthRange(512, 1024))
    for bad in ("8", "0:10", "x:10", "8:0"):
        with pytest.raises(argparse.ArgumentTypeError):
            shared_prefix(bad)
    page = "# HELP x\nkvxfer_prefix_cache_hit_blocks_total 30.0\nkvxfer_prompt_tokens_total 960.0\n"
    c = parse_cache_counters(page)
    assert c == CacheCounters(30.0, 960.0)
    assert hit_rate(c - CacheCounters(10.0, 320.0), 16) == pytest.approx(20 * 16 / 640)
    assert hit_rate(CacheCounters(), 16) is None
