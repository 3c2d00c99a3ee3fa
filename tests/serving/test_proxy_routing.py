"""Routing decisions of the proxy on crafted prefix sets and loads (no servers, no timing): the
prefix index's chained block hashes and LRU eviction, prefix-aware prefill selection and its
balance threshold, decode selection by KV room with bounded staleness, the colocation rule, the
prompt key of token-id / text / chat prompts, and the fleet dropping a dead server."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from kvxfer.entrypoints.prefix_index import PrefixIndex, block_hashes
from kvxfer.entrypoints.proxy_fleet import Fleet, FleetConfig
from kvxfer.entrypoints.proxy_policy import Pool, by_kv_room, by_prefix, colocate, uncached_tokens
from kvxfer.entrypoints.proxy_load import Load
from kvxfer.entrypoints.proxy_pool import Backend, LoadReport
from kvxfer.entrypoints.proxy_prompt import CHARS_PER_TOKEN, PromptKey, prompt_key
from kvxfer.ports import free_ports

BS = 4


def key(tokens: list[int]) -> PromptKey:
    return PromptKey(tuple(block_hashes(tokens, BS)), len(tokens), BS)


def backend(name: str, in_flight: int = 0, has: list[list[int]] = (), capacity: int = 1000) -> Backend:
    b = Backend(f"http://{name}", True, in_flight, index=PrefixIndex(capacity))
    for tokens in has:
        b.index.insert(key(tokens).hashes)
    return b


SYS_A = list(range(100, 132))  # 8 blocks
SYS_B = list(range(200, 232))


def test_block_hashes_chain_and_skip_the_partial_block():
    a = block_hashes(SYS_A + [1, 2, 3, 4, 5], BS)
    assert len(a) == 9  # 37 tokens: 9 full blocks, the partial one has no hash
    b = block_hashes(SYS_A + [9, 9, 9, 9], BS)
    assert a[:8] == b[:8] and a[8] != b[8]
    # The same block after a different prefix is a different hash (the chain), as in the engine.
    c = block_hashes([0, 0, 0, 0] + SYS_A[4:8], BS)
    assert c[1] != a[1]
    assert block_hashes([1, 2, 3], BS) == []
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1], 0)


def test_index_matches_a_chain_and_evicts_least_recently_used():
    index = PrefixIndex(capacity_blocks=12)
    index.insert(key(SYS_A).hashes)  # 8 blocks
    assert index.match(key(SYS_A + [7] * 8).hashes) == 8
    index.insert(key(SYS_B[:16]).hashes)  # 4 more: full
    assert len(index) == 12
    index.insert(key(SYS_A[:8]).hashes)  # touch A's first 2 blocks
    index.insert(key(SYS_B[16:32]).hashes)  # 4 new blocks evict the 4 least recent: A's blocks 3..6
    assert len(index) == 12
    assert index.match(key(SYS_A).hashes) == 2  # the chain stops at the first evicted block
    index.resize(4)
    assert len(index) == 4
    index.clear()
    assert index.match(key(SYS_A).hashes) == 0


def test_prefix_aware_picks_longest_match_within_the_balance():
    a, b, c = backend("a", has=[SYS_A]), backend("b", has=[SYS_B]), backend("c", has=[SYS_A[:8]])
    choice = by_prefix([a, b, c], key(SYS_A + [1, 2, 3, 4]), balance=4)
    assert (choice.backend.url, choice.matched_blocks) == ("http://a", 8)
    assert by_prefix([a, b, c], key(SYS_B), balance=4).backend is b
    # a is 5 requests above the least loaded (balance 4): the best match among the others, c
    a.in_flight = 5
    choice = by_prefix([a, b, c], key(SYS_A), balance=4)
    assert (choice.backend, choice.matched_blocks) == (c, 2)
    a.in_flight = 4  # exactly at the threshold: still a
    assert by_prefix([a, b, c], key(SYS_A), balance=4).backend is a


def test_prefix_aware_without_a_match_spreads_by_load_then_index_room():
    a, b, c = backend("a", 1, has=[SYS_A]), backend("b", 0, has=[SYS_B]), backend("c", 0)
    assert by_prefix([a, b, c], key([5] * 16), balance=4).backend is c  # tie on load: emptier index
    assert by_prefix([a, b], key([5] * 16), balance=4).backend is b
    assert by_prefix([a, b, c], None, balance=4).backend is c  # no key: the same rule
    # two equal matches: the less loaded
    d = backend("d", 2, has=[SYS_A])
    assert by_prefix([d, a], key(SYS_A), balance=4).backend is a


def test_decode_by_kv_room_uses_fresh_reports_only():
    now = 1000.0
    a, b = backend("a", in_flight=0), backend("b", in_flight=3)
    a.load = LoadReport(now - 1, Load(running=6, waiting=0, free_blocks=10, num_blocks=100, prefix_hit_blocks=0))
    b.load = LoadReport(now - 1, Load(running=2, waiting=1, free_blocks=50, num_blocks=100, prefix_hit_blocks=0))
    assert by_kv_room([a, b], now, max_age_s=5) is b  # 3 requests against 6
    b.sent_since_report = 4  # sent since its report: 7 now
    assert by_kv_room([a, b], now, max_age_s=5) is a
    b.sent_since_report = 3  # 6 each: the one with more free blocks
    assert by_kv_room([a, b], now, max_age_s=5) is b
    # stale reports are not used: the proxy's own in-flight counts decide
    assert by_kv_room([a, b], now + 10, max_age_s=5) is a
    a.load = None
    assert by_kv_room([a, b], now, max_age_s=5) is a  # 0 in flight, no report, beats b's 6


def test_colocation_by_uncached_tokens():
    k = key(SYS_A + [1, 2])  # 34 tokens, 8 full blocks
    assert uncached_tokens(k, 0) == 34 and uncached_tokens(k, 8) == 2
    assert not colocate(k, 0, threshold_tokens=32)
    assert colocate(k, 0, threshold_tokens=35)
    assert colocate(k, 8, threshold_tokens=32)  # the decode server holds the prefix
    assert not colocate(k, 8, threshold_tokens=0)  # off
    assert not colocate(None, 0, threshold_tokens=1000)  # unknown prompt: disaggregate


def test_pool_policies():
    a, b = backend("a", 2, has=[SYS_A]), backend("b", 0)
    rr = Pool("prefill", [a, b], "round_robin")
    assert [rr.choose(set(), key(SYS_A)).backend.url for _ in range(3)] == ["http://a", "http://b", "http://a"]
    assert Pool("prefill", [a, b], "least_loaded").choose(set(), key(SYS_A)).backend is b
    pa = Pool("prefill", [a, b], "prefix_aware")
    assert pa.choose(set(), key(SYS_A)).backend is a
    assert pa.choose({"http://a"}, key(SYS_A)).backend is b
    b.healthy = False
    assert pa.choose({"http://a"}, key(SYS_A)) is None
    with pytest.raises(ValueError, match="policy"):
        Pool("prefill", [], "random")


def test_prompt_key_token_ids_text_and_chat(tiny_qwen3):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    ids = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    k = prompt_key({"prompt": ids}, 4, None)
    assert k == PromptKey(tuple(block_hashes(ids, 4)), 9, 4)
    text = "the cache is split into blocks of sixteen tokens and shared by requests"
    expected = tok.encode(text, add_special_tokens=True)
    assert prompt_key({"prompt": text}, 4, tok) == PromptKey(tuple(block_hashes(expected, 4)), len(expected), 4)
    assert prompt_key({"prompt": [text]}, 4, tok) == prompt_key({"prompt": text}, 4, tok)
    # Without a tokenizer: characters in blocks, the length estimated.
    plain = prompt_key({"prompt": text}, 4, None)
    assert plain.num_tokens == len(text) // CHARS_PER_TOKEN
    assert len(plain.hashes) == len(text) // (4 * CHARS_PER_TOKEN)
    longer = prompt_key({"prompt": text + " and more"}, 4, None)
    assert longer.hashes[:len(plain.hashes)] == plain.hashes
    chat = [{"role": "user", "content": text}]
    rendered = tok(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    assert prompt_key({"messages": chat}, 4, tok) == PromptKey(tuple(block_hashes(rendered, 4)), len(rendered), 4)
    assert prompt_key({"prompt": ["a", "b"]}, 4, tok) is None  # a batch: no single key
    assert prompt_key({}, 4, tok) is None


def test_fleet_drops_a_dead_server_and_forgets_its_index():
    (port,) = free_ports(1)  # nothing listens there: connections are refused
    dead = f"http://127.0.0.1:{port}"

    async def run() -> None:
        async with httpx.AsyncClient() as client:
            fleet = Fleet([dead], [], FleetConfig("prefix_aware", 1.0, 5.0, drop_after_s=60.0), client)
            b = fleet.prefill.backends[0]
            b.healthy, b.problem = True, "ok"
            b.index.insert(key(SYS_A).hashes)
            await fleet.check_round()
            assert not b.healthy and len(b.index) == 0 and fleet.prefill.backends == [b]
            b.down_since -= 61.0  # down longer than drop_after_s (the clock is not waited on)
            await fleet.check_round()
            assert fleet.prefill.backends == [] and fleet.dropped == 1
            with pytest.raises(ValueError, match="url"):
                await fleet.add("prefill", "127.0.0.1:1")
            with pytest.raises(ValueError, match="role"):
                await fleet.add("router", dead)
            added = await fleet.add("prefill", dead + "/")
            assert fleet.prefill.backends == [added] and added.url == dead and not added.healthy
            assert fleet.remove("prefill", dead) and fleet.prefill.backends == []

    asyncio.run(run())
