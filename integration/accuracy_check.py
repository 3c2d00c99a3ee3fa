#!/usr/bin/env python3
"""Disaggregated vs colocated greedy outputs, prompt by prompt.

Sends the same token-id prompts (lengths from a few tokens to several blocks, exact block
multiples, groups sharing block-aligned and unaligned prefixes) through the P/D proxy and
through a colocated server, concurrently, greedy, and compares the generated token ids.
A difference passes only where the colocated run's top-1/top-2 log-prob gap at the first
differing token is below --tie-threshold (a rounding tie); such cases are counted and
printed. Every disaggregated request must report KV bytes pulled on the decode side, so a
path that silently recomputes the prompt fails. Exit status 0 only when all of this holds.

With --vllm the servers are vLLM's (integration/vllm/run_accuracy_test.sh): its answers carry no
per-request transfer stats, so the evidence is the decode servers' own counter of prompt tokens by
source (vllm:prompt_tokens_by_source): over the disaggregated run, at most one prompt token per
request may be computed locally (the rest came over the connector or from the decode's prefix
cache), and every prefill's and decode's KV cache must be unused again afterwards
(vllm:kv_cache_usage_perc 0: no block left held for a transfer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Result:
    token_ids: list[int]
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per position, best first
    stats: dict | None = None


def build_prompts(num: int, block_size: int, vocab_size: int, avoid: set[int], seed: int) -> list[list[int]]:
    """Unique prompts, each at least 2 tokens, so every one needs some KV from the prefill side."""
    rng = random.Random(seed)
    pool = [t for t in range(vocab_size) if t not in avoid]

    def tokens(n: int) -> list[int]:
        return [rng.choice(pool) for _ in range(n)]

    b = block_size
    lengths = [2, 3, 5, b - 1, b, b + 1, 2 * b - 1, 2 * b, 2 * b + 1, 3 * b, 4 * b + 3, 5 * b, 6 * b + 7, 8 * b]
    prompts = [tokens(max(2, n)) for n in lengths]
    # Shared prefixes: block-aligned (decode may hit its cache for whole blocks) and not.
    # Suffixes of >= 2 tokens keep at least one token to pull from the prefill side.
    for prefix_len in (b, 2 * b, 2 * b + b // 2, 3 * b + 1):
        prefix = tokens(prefix_len)
        for suffix_len in (2, 3, b // 2 + 1, b, 2 * b + 5):
            prompts.append(prefix + tokens(suffix_len))
    while len(prompts) < num:
        n = rng.choice([rng.randint(2, b), rng.randint(b, 8 * b), rng.randint(1, 6) * b])
        prompts.append(tokens(max(2, n)))
    unique = list({tuple(p): p for p in prompts}.values())
    return unique[:num] if len(unique) >= num else unique


async def complete(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int, stream: bool,
                   top_logprobs: int) -> Result:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True, "stream": stream}
    if top_logprobs:
        body["logprobs"] = top_logprobs
    if not stream:
        r = await client.post(f"{url}/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{url} returned {r.status_code}: {r.text[:300]}")
        data = r.json()
        choice = data["choices"][0]
        return Result(choice["token_ids"], _top(choice.get("logprobs")), data.get("kv_transfer_stats"))
    result = Result([])
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url} returned {r.status_code}: {(await r.aread())[:300]!r}")
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            choice = event["choices"][0]
            result.token_ids += choice.get("token_ids", [])
            result.top += _top(choice.get("logprobs"))
            if event.get("kv_transfer_stats"):
                result.stats = event["kv_transfer_stats"]
        if not done:
            raise RuntimeError("stream ended without [DONE]")
    return result


def _top(logprobs: dict | None) -> list[list[tuple[int, float]]]:
    if not logprobs:
        return []
    if "top_token_logprobs" in logprobs:  # kvxfer's server
        return [[(e["token_id"], e["logprob"]) for e in pos] for pos in logprobs["top_token_logprobs"]]
    # vLLM's: {token text: log-prob} per position; only the gap is used, so no ids (-1).
    return [[(-1, v) for v in sorted(pos.values(), reverse=True)] for pos in logprobs["top_logprobs"] if pos]


async def run_all(url: str, prompts: list[list[int]], max_tokens: int, concurrency: int, top_logprobs: int,
                  timeout_s: float) -> list[Result | Exception]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0)) as client:

        async def one(i: int, prompt: list[int]) -> Result | Exception:
            async with sem:
                try:
                    # Every fourth request streams, to compare the SSE path too.
                    return await complete(client, url, prompt, max_tokens, i % 4 == 3, top_logprobs)
                except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as exc:
                    return exc

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def top2_gap(ref: Result, position: int) -> float | None:
    """The colocated run's top-1/top-2 log-prob gap at one output position (None if it
    returned no top-2 there, which cannot judge a tie)."""
    if position < len(ref.top) and len(ref.top[position]) >= 2:
        (_, a), (_, b) = ref.top[position][:2]
        return a - b
    return None


def metric_values(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text page, by name."""
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#") and "{" not in parts[0]:
            values[parts[0]] = float(parts[1])
    return values


async def leaked_blocks(urls: list[str], timeout_s: float) -> list[str]:
    """Servers whose KV pool is not entirely free again once every request has ended (a
    prefill frees held blocks when its decode side notifies, so this waits a little)."""
    deadline = time.monotonic() + timeout_s
    pending = list(urls)
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            still = []
            for url in pending:
                try:
                    m = metric_values((await client.get(f"{url}/metrics")).text)
                    free, total = m.get("kvxfer_kv_free_blocks"), m.get("kvxfer_kv_blocks")
                    if free is None or free < total:
                        still.append(f"{url}: {free} of {total} blocks free")
                except httpx.HTTPError as exc:
                    still.append(f"{url}: /metrics failed: {exc!r}")
            if not still or time.monotonic() > deadline:
                return still
            pending = [line.split(": ")[0] for line in still]
            await asyncio.sleep(0.5)


def labelled_sums(text: str, name: str, label: str) -> dict[str, float]:
    """A Prometheus text page's samples of NAME, summed by the value of LABEL (over the others)."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            key = next((kv.split("=", 1)[1].strip('"') for kv in labels.split(",") if kv.startswith(label + "=")), "")
            sums[key] = sums.get(key, 0.0) + float(value)
    return sums


async def vllm_prompt_sources(urls: list[str]) -> dict[str, float]:
    """vllm:prompt_tokens_by_source summed over URLS, by source (local_compute, local_cache_hit,
    external_kv_transfer)."""
    total: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=10.0) as client:
        for url in urls:
            page = (await client.get(f"{url}/metrics")).text
            for source, v in labelled_sums(page, "vllm:prompt_tokens_by_source_total", "source").items():
                total[source] = total.get(source, 0.0) + v
    return total


async def vllm_busy(urls: list[str], timeout_s: float) -> list[str]:
    """vLLM servers whose KV cache is still in use once every request has ended (a prefill
    frees the blocks it holds for a transfer when the decode side is done, so this waits a little)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            still = []
            for url in urls:
                try:
                    usage = labelled_sums((await client.get(f"{url}/metrics")).text, "vllm:kv_cache_usage_perc", "")
                    if sum(usage.values()) > 0:
                        still.append(f"{url}: KV cache usage {sum(usage.values()):.4f}")
                except httpx.HTTPError as exc:
                    still.append(f"{url}: /metrics failed: {exc!r}")
            if not still or time.monotonic() > deadline:
                return still
            await asyncio.sleep(0.5)


def compare(prompts, pd_results, ref_results, threshold: float) -> dict:
    report = {"prompts": len(prompts), "exact": 0, "near_ties": [], "mismatches": [], "errors": [],
              "no_transfer": [], "bytes": 0, "descriptors": 0, "transfer_s": 0.0}
    for i, (prompt, pd, ref) in enumerate(zip(prompts, pd_results, ref_results)):
        if isinstance(pd, Exception) or isinstance(ref, Exception):
            which = "disaggregated" if isinstance(pd, Exception) else "colocated"
            report["errors"].append(f"#{i} ({len(prompt)} tokens) {which}: {pd if which == 'disaggregated' else ref}")
            continue
        stats = pd.stats or {}
        report["bytes"] += stats.get("bytes", 0)
        report["descriptors"] += stats.get("descriptors", 0)
        report["transfer_s"] += stats.get("seconds", 0.0)
        if not stats.get("bytes", 0) > 0:
            report["no_transfer"].append(f"#{i} ({len(prompt)} tokens): kv_transfer_stats={pd.stats}")
        if pd.token_ids == ref.token_ids:
            report["exact"] += 1
            continue
        pos = next((k for k, (a, b) in enumerate(zip(pd.token_ids, ref.token_ids)) if a != b),
                   min(len(pd.token_ids), len(ref.token_ids)))
        gap = top2_gap(ref, pos)
        line = (f"#{i} ({len(prompt)} tokens) first difference at output token {pos}: "
                f"disaggregated {pd.token_ids[pos:pos + 3]} vs colocated {ref.token_ids[pos:pos + 3]}, "
                + (f"top-1/top-2 gap {gap:.2e}" if gap is not None else "no top-2 log-probs from the colocated run"))
        (report["near_ties"] if gap is not None and gap < threshold else report["mismatches"]).append(line)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", required=True, help="P/D proxy base URL")
    parser.add_argument("--reference", required=True, help="colocated (--role both) server base URL")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tie-threshold", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    parser.add_argument("--servers", nargs="*", default=[],
                        help="prefill/decode server URLs whose KV pools must be free again afterwards")
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--vllm", action="store_true",
                        help="vLLM servers: check the transfer by the --decode servers' counters (module docstring)")
    parser.add_argument("--decode", nargs="*", default=[], help="with --vllm: the decode servers' URLs")
    args = parser.parse_args()
    if args.vllm and not args.decode:
        parser.error("--vllm needs --decode URL...")

    config = json.loads((Path(args.model_dir) / "config.json").read_text())
    eos = config.get("eos_token_id")
    avoid = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    prompts = build_prompts(args.num_prompts, args.block_size, config["vocab_size"], avoid, args.seed)

    start = time.perf_counter()
    # The colocated run also gives the top-2 log-probs that judge near-ties.
    ref = asyncio.run(run_all(args.reference, prompts, args.max_tokens, args.concurrency, 2, args.timeout))
    ref_s = time.perf_counter() - start
    before = asyncio.run(vllm_prompt_sources(args.decode)) if args.vllm else {}
    start = time.perf_counter()
    pd = asyncio.run(run_all(args.proxy, prompts, args.max_tokens, args.concurrency, 0, args.timeout))
    pd_s = time.perf_counter() - start

    report = compare(prompts, pd, ref, args.tie_threshold)
    report |= {"colocated_s": round(ref_s, 2), "disaggregated_s": round(pd_s, 2)}
    if args.vllm:
        after = asyncio.run(vllm_prompt_sources(args.decode))
        sources = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        report["decode_prompt_tokens_by_source"] = sources
        # vLLM answers carry no per-request stats: the decode's own count of locally computed
        # prompt tokens replaces them (at most the one token per request a connector may leave).
        report["no_transfer"] = [] if sources.get("local_compute", 0) <= len(prompts) and sources.get(
            "external_kv_transfer", 0) > 0 else [f"decode servers' prompt tokens by source over the run: {sources}"
                                                 f" (at most {len(prompts)} computed locally expected)"]
        report["leaked"] = asyncio.run(vllm_busy(args.servers, 30.0))
    else:
        report["leaked"] = asyncio.run(leaked_blocks(args.servers, 30.0))
    ok = len(prompts) >= min(args.num_prompts, 100) and not (
        report["errors"] or report["mismatches"] or report["no_transfer"] or report["leaked"])
    report["passed"] = ok
    _print(report, args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


def _print(r: dict, args) -> None:
    for key, title in (("errors", "ERRORS"), ("mismatches", "MISMATCHES"), ("no_transfer", "NO KV TRANSFER"),
                       ("leaked", "KV BLOCKS NOT FREED"), ("near_ties", "near-ties (allowed)")):
        if r[key]:
            print(f"{title} ({len(r[key])}):")
            for line in r[key][:20]:
                print(f"  {line}")
    gbps = r["bytes"] / r["transfer_s"] / 1e9 if r["transfer_s"] > 0 else 0.0
    print(f"prompts {r['prompts']} | exact {r['exact']} | near-ties {len(r['near_ties'])} | "
          f"mismatches {len(r['mismatches'])} | errors {len(r['errors'])} | without transfer {len(r['no_transfer'])}")
    print(f"decode pulled {r['bytes']} bytes in {r['descriptors']} descriptors ({gbps:.3f} GB/s over summed transfer time) | "
          f"colocated {r['colocated_s']}s, disaggregated {r['disaggregated_s']}s "
          f"(max_tokens {args.max_tokens}, concurrency {args.concurrency})")
    print("ACCURACY CHECK PASSED" if r["passed"] else "ACCURACY CHECK FAILED")


if __name__ == "__main__":
    sys.exit(main())
