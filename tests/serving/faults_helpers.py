"""Load generator of the fault and abuse suite: one request through the proxy with a planned
behaviour (plain, streamed, client leaving at a random point, aborted, sharing its id with
another request), and the tally of how each ended."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from dataclasses import dataclass, field

import httpx

CLIENT_TIMEOUT_S = 120.0  # a request still open after this has hung: the suite fails


@dataclass(frozen=True)
class Plan:
    index: int
    prompt: list[int]
    max_tokens: int
    stream: bool
    kind: str  # "plain" | "leave" | "abort" | "duplicate"
    request_id: str
    leave_after_s: float = 0.0  # "leave": the client disconnects after this long


@dataclass
class Tally:
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    outputs: dict[int, list[int]] = field(default_factory=dict)  # plan index -> generated token ids
    hung: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, plan: Plan, outcome: str, tokens: list[int] | None = None) -> None:
        self.outcomes[f"{plan.kind}:{outcome}"] += 1
        if tokens is not None:
            self.outputs[plan.index] = tokens


def make_plans(n: int, seed: int, kinds: dict[str, float], max_prompt: int = 100) -> list[Plan]:
    rng = random.Random(seed)
    names, weights = zip(*kinds.items())
    plans: list[Plan] = []
    while len(plans) < n:
        kind = rng.choices(names, weights)[0]
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(1, max_prompt))]
        base = dict(prompt=prompt, max_tokens=rng.randint(1, 32), stream=rng.random() < 0.5, kind=kind,
                    request_id=f"soak-{seed}-{len(plans)}", leave_after_s=rng.uniform(0.0, 0.4))
        plans.append(Plan(index=len(plans), **base))
        if kind == "duplicate" and len(plans) < n:  # a second client, same id, its own prompt
            other = [rng.randrange(3, 500) for _ in range(rng.randint(1, max_prompt))]
            plans.append(Plan(index=len(plans), **(base | {"prompt": other})))
    return plans


def body_of(plan: Plan) -> dict:
    return {"prompt": plan.prompt, "max_tokens": plan.max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": plan.stream, "return_token_ids": True}


async def complete(client: httpx.AsyncClient, url: str, plan: Plan) -> tuple[str, list[int] | None]:
    headers = {"X-Request-Id": plan.request_id}
    if not plan.stream:
        r = await client.post(f"{url}/v1/completions", json=body_of(plan), headers=headers)
        if r.status_code != 200:
            return str(r.status_code), None
        return _ended(r.json()["choices"][0])
    tokens: list[int] = []
    async with client.stream("POST", f"{url}/v1/completions", json=body_of(plan), headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            return str(r.status_code), None
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                # With the first-token handoff the client's stream starts with the prefill's
                # token, so a refusal of the decode leg (409: a concurrent request uses the id)
                # arrives as an error event carrying its status.
                if event["error"].get("code") == 409:
                    return "409", None
                return "stream-error", None
            choice = event["choices"][0]
            tokens += choice.get("token_ids", [])
            if choice["finish_reason"] is not None:
                return _ended(choice | {"token_ids": tokens})
    return "stream-cut", None


def _ended(choice: dict) -> tuple[str, list[int] | None]:
    """A finished choice: completed ("200" and its tokens) only when it ran to max_tokens
    (ignore_eos); an aborted request is also a 200, with finish_reason "abort" and the tokens
    it had so far, never a completed output."""
    if choice["finish_reason"] == "length":
        return "200", choice["token_ids"]
    return choice["finish_reason"], None


async def run_one(client: httpx.AsyncClient, proxy_url: str, decode_urls: list[str], plan: Plan,
                  tally: Tally) -> None:
    task = asyncio.ensure_future(complete(client, proxy_url, plan))
    try:
        if plan.kind == "leave":
            done, _ = await asyncio.wait({task}, timeout=plan.leave_after_s)
            if not done:
                task.cancel()  # the client goes away mid-request (either leg)
                tally.add(plan, "left")
                return
        elif plan.kind == "abort":
            await asyncio.sleep(plan.leave_after_s)
            for url in decode_urls:  # an operator's abort of that id, wherever it runs
                await client.post(f"{url}/v1/abort/{plan.request_id}")
        outcome, tokens = await asyncio.wait_for(task, CLIENT_TIMEOUT_S)
        tally.add(plan, outcome, tokens)
    except asyncio.TimeoutError:
        tally.hung.append(plan.index)
        tally.add(plan, "hung")
    except httpx.HTTPError as exc:
        tally.add(plan, type(exc).__name__)
    finally:
        if not task.done():
            task.cancel()


async def drive(proxy_url: str, decode_urls: list[str], plans: list[Plan], concurrency: int,
                tally: Tally | None = None) -> Tally:
    tally = tally or Tally()
    limit = asyncio.Semaphore(concurrency)
    timeout = httpx.Timeout(CLIENT_TIMEOUT_S, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=4 * concurrency)) as client:
        async def one(plan: Plan) -> None:
            async with limit:
                await run_one(client, proxy_url, decode_urls, plan, tally)

        start = time.monotonic()
        # Both requests of a duplicate pair start together (adjacent indices, same semaphore).
        await asyncio.gather(*(one(p) for p in plans))
        tally.seconds = time.monotonic() - start
    return tally


def reference_outputs(url: str, plans: list[Plan]) -> dict[int, list[int]]:
    """Greedy outputs of a colocated server for every plan's prompt (ids not shared)."""
    async def go() -> dict[int, list[int]]:
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
            limit = asyncio.Semaphore(16)

            async def one(plan: Plan) -> tuple[int, list[int]]:
                async with limit:
                    r = await client.post(f"{url}/v1/completions", json=body_of(plan) | {"stream": False})
                    r.raise_for_status()
                    return plan.index, r.json()["choices"][0]["token_ids"]

            return dict(await asyncio.gather(*(one(p) for p in plans)))

    return asyncio.run(go())


# A difference in greedy output passes only where the colocated server's top-1/top-2 log-prob
# gap at the first differing token is below this (a rounding tie between batch shapes), as in
# integration/accuracy_check.py; anything else is another request's KV or a real bug.
NEAR_TIE = 1e-3


def near_tie(url: str, plan: Plan, got: list[int], ref: list[int]) -> tuple[bool, str]:
    """Whether `got` leaves `ref` at a near-tie of the colocated server; and why."""
    pos = next(i for i, (a, b) in enumerate(zip(got + [-1], ref + [-2])) if a != b)
    if pos >= min(len(got), len(ref)):
        return False, f"lengths {len(got)} != {len(ref)}"
    body = {"prompt": plan.prompt + ref[:pos], "max_tokens": 1, "temperature": 0.0, "ignore_eos": True,
            "logprobs": 2, "return_token_ids": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S)
    r.raise_for_status()
    top = r.json()["choices"][0]["logprobs"]["top_token_logprobs"][0]
    (first, lp1), (second, lp2) = [(e["token_id"], e["logprob"]) for e in top[:2]]
    gap = lp1 - lp2
    tie = gap < NEAR_TIE and {got[pos], ref[pos]} == {first, second}
    return tie, f"position {pos}: {got[pos]} vs {ref[pos]}, colocated top-2 gap {gap:.2e}"

