"""`kvxfer bench serve`: a load generator for OpenAI-compatible endpoints (the kvxfer proxy, a
colocated kvxfer server, vLLM), reporting TTFT/TPOT/ITL/end-to-end percentiles, throughput and
goodput; with several `--endpoint NAME=URL` it runs the same workload against each, in
alternating rounds, and prints ratios against the first.

Every request is a streamed `/v1/completions` (`ignore_eos`, `max_tokens`, greedy); tokens are
counted from each chunk's `token_ids` (`return_token_ids`) and the final `usage` where the
server sends them, else one per non-empty text chunk. A failed request is recorded with its
error kind and the run goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass

import httpx

from kvxfer.bench.serve_metrics import SLO, CacheCounters, RequestRecord, hit_rate, parse_cache_counters, summarize, write_plot
from kvxfer.bench.serve_report import ratios, report
from kvxfer.bench.serve_workload import (
    BenchRequest,
    LengthRange,
    RequestClass,
    WorkloadSpec,
    length_range,
    request_class,
    shared_prefix,
)

WARMUP_STREAM = -1
@dataclass(frozen=True)
class Endpoint:
    name: str
    url: str


def endpoint(text: str) -> Endpoint:
    name, sep, url = text.partition("=")
    if not sep:
        name, url = text, text
    if not name or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"--endpoint expects NAME=http://HOST:PORT or a URL, got {text!r}")
    return Endpoint(name, url.rstrip("/"))


def _positive(kind, allow_zero: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not (value >= 0 if allow_zero else value > 0):
            raise argparse.ArgumentTypeError(f"expected a number {'>=' if allow_zero else '>'} 0, got {text!r}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", type=endpoint, action="append", required=True, metavar="NAME=URL",
                        help="base URL of an OpenAI-compatible server; repeat to compare (ratios vs the first)")
    parser.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    parser.add_argument("--prompt-format", choices=["ids", "text"], default="ids",
                        help="ids: random token ids (exact lengths); text: random words")
    parser.add_argument("--token-ids", type=length_range, default=LengthRange(16, 500),
                        help="LO-HI range prompt token ids are drawn from (keep it inside every model's vocabulary)")
    parser.add_argument("--input-len", type=length_range, default=LengthRange(128, 128),
                        help="N or LO-HI prompt length (tokens for ids, words for text)")
    parser.add_argument("--output-len", type=length_range, default=LengthRange(32, 32), help="N or LO-HI max_tokens")
    parser.add_argument("--mix", type=request_class, action="append", metavar="NAME:WEIGHT:INPUT:OUTPUT",
                        help="a request class of a mix (repeat), e.g. --mix chat:0.8:16-64:32 --mix long:0.2:1024:8; "
                             "replaces --input-len/--output-len")
    parser.add_argument("--shared-prefix", type=shared_prefix, default=None, metavar="N:LO-HI",
                        help="prefix every prompt with one of N system prompts of LO-HI tokens (ids prompts; the "
                             "user turn is --input-len), fresh ids per round and endpoint (serve_workload)")
    parser.add_argument("--cache-metrics", action="append", default=[], metavar="URL",
                        help="a kvxfer server whose /metrics give the prefix-cache hit rate per endpoint (repeat: "
                             "the prefill servers); endpoints run one at a time, so each one's share is exact")
    parser.add_argument("--cache-block-size", type=_positive(int), default=16,
                        help="block size of the --cache-metrics servers (hit blocks -> tokens)")
    parser.add_argument("--num-requests", type=_positive(int), default=None,
                        help="measured requests per endpoint (default 64 unless --duration)")
    parser.add_argument("--duration", type=_positive(float), default=None,
                        help="instead of a count: send requests for this many seconds per endpoint")
    parser.add_argument("--request-rate", type=_positive(float), default=None,
                        help="Poisson arrivals per second (default: all at once, limited by --concurrency)")
    parser.add_argument("--concurrency", type=_positive(int), default=None, help="most requests in flight")
    parser.add_argument("--sequential", action="store_true",
                        help="one request at a time (concurrency 1, no rate): the TTFT protocol's medians")
    parser.add_argument("--warmup", type=_positive(int, allow_zero=True), default=2, help="unmeasured requests per endpoint, one at a time")
    parser.add_argument("--rounds", type=_positive(int), default=None,
                        help="split the run into rounds, endpoints alternating within each (default 1; 3 when "
                             "comparing; with --sequential up to the request count, one request per endpoint each)")
    parser.add_argument("--slo-ttft-ms", type=_positive(float), default=None)
    parser.add_argument("--slo-tpot-ms", type=_positive(float), default=None)
    parser.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--request-timeout", type=_positive(float), default=600.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here (and the plot beside it)")
    parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    parser.add_argument("--no-progress", action="store_true")


@dataclass(frozen=True)
class RunPlan:
    endpoints: tuple[Endpoint, ...]
    workload: WorkloadSpec
    num_requests: int | None
    duration_s: float | None
    concurrency: int | None
    rounds: int
    warmup: int
    body: dict  # fields every request carries
    timeout_s: float
    slo: SLO
    cache_metrics: tuple[str, ...] = ()
    cache_block_size: int = 16


def plan(args: argparse.Namespace) -> RunPlan:
    if args.sequential and (args.concurrency is not None or args.request_rate is not None):
        raise SystemExit("error: --sequential excludes --concurrency and --request-rate")
    if args.num_requests is not None and args.duration is not None:
        raise SystemExit("error: give --num-requests or --duration, not both")
    if args.duration is not None and not (args.request_rate or args.concurrency or args.sequential):
        raise SystemExit("error: --duration needs --request-rate, --concurrency or --sequential "
                         "(else every request would be sent at once, without end)")
    if args.shared_prefix is not None and args.prompt_format != "ids":
        raise SystemExit("error: --shared-prefix needs --prompt-format ids")
    names = [e.name for e in args.endpoint]
    if len(set(names)) != len(names):
        raise SystemExit(f"error: --endpoint names must be distinct, got {names}")
    classes = tuple(args.mix) if args.mix else (RequestClass("all", 1.0, args.input_len, args.output_len),)
    if len({c.name for c in classes}) != len(classes):
        raise SystemExit("error: --mix class names must be distinct")
    num = args.num_requests if args.num_requests is not None or args.duration is not None else 64
    if args.rounds is not None:
        rounds = args.rounds
    elif len(args.endpoint) == 1:
        rounds = 1
    elif args.sequential and num is not None:
        rounds = num  # alternate request by request
    else:
        rounds = 3
    if num is not None and rounds > num:
        raise SystemExit(f"error: --rounds {rounds} exceeds --num-requests {num}")
    body = {"stream": True, "temperature": args.temperature, "ignore_eos": not args.no_ignore_eos,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    return RunPlan(
        endpoints=tuple(args.endpoint),
        workload=WorkloadSpec(classes, args.prompt_format, args.token_ids, args.request_rate, args.seed,
                              args.shared_prefix),
        num_requests=num, duration_s=args.duration, concurrency=1 if args.sequential else args.concurrency,
        rounds=rounds, warmup=args.warmup, body=body, timeout_s=args.request_timeout,
        slo=SLO(args.slo_ttft_ms, args.slo_tpot_ms),
        cache_metrics=tuple(u.rstrip("/") for u in args.cache_metrics), cache_block_size=args.cache_block_size,
    )


# ---------------------------------------------------------------- one request


async def send(client: httpx.AsyncClient, url: str, body: dict, req: BenchRequest, round_: int,
               origin: float, timeout_s: float) -> RequestRecord:
    """Stream one completion within `timeout_s` in all (httpx's own timeout bounds each read,
    not the whole stream); never raises: errors become the record's kind and detail."""
    start = time.perf_counter()
    rec = RequestRecord(req.index, req.klass, round_, start - origin,
                        len(req.prompt) if isinstance(req.prompt, list) else req.prompt_len, req.max_tokens)
    payload = body | {"prompt": req.prompt, "max_tokens": req.max_tokens}
    try:
        async with asyncio.timeout(timeout_s), client.stream("POST", f"{url}/v1/completions", json=payload) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return _fail(rec, f"http_{resp.status_code}", text[:300])
            await _read_stream(resp, rec, start)
    except (httpx.TimeoutException, TimeoutError) as exc:
        return _fail(rec, "timeout", repr(exc))
    except httpx.ConnectError as exc:
        return _fail(rec, "connect", repr(exc))
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        return _fail(rec, "disconnected", repr(exc))
    except json.JSONDecodeError as exc:
        return _fail(rec, "bad_json", repr(exc))
    except Exception as exc:  # one broken request must not end the run
        return _fail(rec, type(exc).__name__, repr(exc))
    return rec


async def _read_stream(resp: httpx.Response, rec: RequestRecord, start: float) -> None:
    counted, usage, last, done = 0, None, None, False
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        obj = json.loads(data)
        if "error" in obj:
            err = obj["error"]
            _fail(rec, "stream_error", str(err.get("message", err) if isinstance(err, dict) else err)[:300])
            return
        usage = obj.get("usage") or usage
        tokens = 0
        for choice in obj.get("choices") or ():
            ids = choice.get("token_ids")
            tokens += len(ids) if ids is not None else int(bool(choice.get("text")))
        if tokens:
            now = time.perf_counter()
            if last is None:
                rec.ttft_s = now - start
            else:
                rec.itl_s.append(now - last)
            last = now
            counted += tokens
    rec.e2e_s = time.perf_counter() - start
    if usage:
        rec.output_tokens = int(usage.get("completion_tokens", counted))
        rec.prompt_tokens = int(usage.get("prompt_tokens", rec.prompt_tokens))
    else:
        rec.output_tokens = counted
    if not done:
        _fail(rec, "incomplete_stream", "the stream ended without [DONE]")
    elif rec.ttft_s is None:
        _fail(rec, "no_tokens", "the stream carried no token")


def _fail(rec: RequestRecord, kind: str, detail: str) -> RequestRecord:
    rec.error, rec.error_detail = kind, detail
    return rec


# ---------------------------------------------------------------- rounds


async def run_round(client: httpx.AsyncClient, url: str, body: dict, requests, round_: int,
                    concurrency: int | None, duration_s: float | None, origin: float, timeout_s: float,
                    on_done) -> tuple[list[RequestRecord], float]:
    """Send `requests` at their arrival offsets (at most `concurrency` in flight); with
    `duration_s`, stop sending once that much time has passed. Returns the records and the
    time from the first send to the last completion."""
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    tasks: list[asyncio.Task] = []
    t0 = time.perf_counter()

    async def one(req: BenchRequest) -> RequestRecord:
        try:
            rec = await send(client, url, body, req, round_, origin, timeout_s)
        finally:
            if sem is not None:
                sem.release()
        on_done(rec)
        return rec

    for req in requests:
        delay = t0 + req.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if sem is not None:
            await sem.acquire()
        if duration_s is not None and time.perf_counter() - t0 >= duration_s:
            if sem is not None:
                sem.release()
            break
        tasks.append(asyncio.create_task(one(req)))
    records = list(await asyncio.gather(*tasks))
    if not records:
        return [], 0.0
    end = max(origin + r.start_s + (r.e2e_s or 0.0) for r in records)
    return records, end - (origin + min(r.start_s for r in records))


def _round_requests(p: RunPlan, round_: int, salt: int):
    stream = p.workload.requests(round_, salt)
    if p.num_requests is None:
        return stream
    return itertools.islice(stream, p.num_requests // p.rounds + (round_ < p.num_requests % p.rounds))


async def _cache_counters(client: httpx.AsyncClient, urls: tuple[str, ...]) -> CacheCounters:
    """Summed over `urls`; counters only grow, and a server's requests of a round have all
    finished (their prompt tokens counted) by the time its round's last stream ended."""
    total = CacheCounters()
    for url in urls:
        resp = await client.get(f"{url}/metrics", timeout=30.0)
        total += parse_cache_counters(resp.text)
    return total


async def _model_name(client: httpx.AsyncClient, url: str, timeout_s: float) -> str | None:
    try:
        resp = await client.get(f"{url}/v1/models", timeout=min(10.0, timeout_s))
        return resp.json()["data"][0]["id"]
    except Exception:  # no model list: send no model name (kvxfer servers accept that)
        return None


async def run(p: RunPlan, model: str | None, progress: bool) -> tuple[dict, dict[str, list[RequestRecord]]]:
    from tqdm import tqdm

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=httpx.Timeout(p.timeout_s), limits=limits) as client:
        bodies = {}
        for ep in p.endpoints:
            name = model or await _model_name(client, ep.url, p.timeout_s)
            bodies[ep.name] = p.body | ({"model": name} if name else {})
        warmup_errors: dict[str, int] = {}
        for ep in p.endpoints:
            for req in itertools.islice(p.workload.requests(WARMUP_STREAM), p.warmup):
                rec = await send(client, ep.url, bodies[ep.name], req, -1, time.perf_counter(), p.timeout_s)
                warmup_errors[ep.name] = warmup_errors.get(ep.name, 0) + (not rec.ok)
        total = p.num_requests * len(p.endpoints) if p.num_requests is not None else None
        bar = tqdm(total=total, disable=not progress, unit="req", file=sys.stderr)
        records = {ep.name: [] for ep in p.endpoints}
        durations = {ep.name: 0.0 for ep in p.endpoints}
        cache = {ep.name: CacheCounters() for ep in p.endpoints}
        origin = time.perf_counter()
        for r in range(p.rounds):
            order = p.endpoints[r % len(p.endpoints):] + p.endpoints[:r % len(p.endpoints)]
            for ep in order:
                bar.set_postfix_str(f"round {r + 1}/{p.rounds} {ep.name}")
                before = await _cache_counters(client, p.cache_metrics)
                recs, dur = await run_round(client, ep.url, bodies[ep.name],
                                            _round_requests(p, r, p.endpoints.index(ep)), r,
                                            p.concurrency, p.duration_s / p.rounds if p.duration_s else None,
                                            origin, p.timeout_s, lambda _rec: bar.update(1))
                cache[ep.name] += await _cache_counters(client, p.cache_metrics) - before
                records[ep.name] += recs
                durations[ep.name] += dur
        bar.close()
    result = {"endpoints": {}}
    for ep in p.endpoints:
        recs = records[ep.name]
        summary = summarize(recs, durations[ep.name], p.slo)
        summary["prefill_cache_hit_rate"] = hit_rate(cache[ep.name], p.cache_block_size) if p.cache_metrics else None
        classes = sorted({r.klass for r in recs})
        per_class = ({k: summarize([r for r in recs if r.klass == k], durations[ep.name], p.slo) for k in classes}
                     if len(p.workload.classes) > 1 else {})
        result["endpoints"][ep.name] = {
            "url": ep.url, "model": bodies[ep.name].get("model"), "warmup_errors": warmup_errors.get(ep.name, 0),
            "summary": summary, "classes": per_class, "requests": [r.as_json() for r in recs],
        }
    result["ratios"] = ratios(result["endpoints"])
    return result, records


def main(args: argparse.Namespace) -> int:
    p = plan(args)
    load_before = os.getloadavg()  # the host's load: figures from a busy shared machine say so
    result, records = asyncio.run(run(p, args.model, progress=not args.no_progress))
    result["host"] = {"cpus": os.cpu_count(), "loadavg_1_5_15_before": load_before,
                      "loadavg_1_5_15_after": os.getloadavg()}
    result["config"] = {k: v for k, v in vars(args).items() if not k.startswith("_")} | {
        "endpoint": [f"{e.name}={e.url}" for e in p.endpoints], "rounds": p.rounds,
        "num_requests": p.num_requests, "concurrency": p.concurrency,
        "mix": [f"{c.name}:{c.weight}:{c.input_len}:{c.output_len}" for c in p.workload.classes],
        "input_len": str(args.input_len), "output_len": str(args.output_len), "token_ids": str(args.token_ids),
    }
    print(report(result, p.slo))
    print("host load average (1/5/15 min) before {:.2f}/{:.2f}/{:.2f}, after {:.2f}/{:.2f}/{:.2f}".format(
        *result["host"]["loadavg_1_5_15_before"], *result["host"]["loadavg_1_5_15_after"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    plot = args.plot or (args.out.rsplit(".", 1)[0] + ".png" if args.out else None)
    if plot:
        write_plot(plot, records)
        print(f"wrote {plot}")
    failed = sum(s["summary"]["completed"] == 0 for s in result["endpoints"].values())
    return 1 if failed else 0
