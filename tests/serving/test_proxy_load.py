"""The proxy's load reading (`proxy_load.parse_load`) for decode selection, on /metrics pages in
the two dialects it reads: kvxfer's gauges and vLLM's (the text as vLLM's prometheus_client
writes it: HELP/TYPE lines, a sample per engine labelled engine and model_name, the cache
config as an info gauge). Expected numbers are worked out by hand from the page."""

from __future__ import annotations

import time

import pytest

from kvxfer.entrypoints.proxy_load import Load, parse_load
from kvxfer.entrypoints.proxy_policy import by_kv_room
from kvxfer.entrypoints.proxy_pool import Backend, LoadReport

LABELS = 'engine="{e}",model_name="tiny-qwen3"'


def vllm_page(engines: dict[str, tuple[int, int, float, int, int]], usage_name: str = "vllm:kv_cache_usage_perc",
              num_gpu_blocks: str | None = None) -> str:
    """engines: engine -> (running, waiting, usage fraction, num_gpu_blocks, prefix-hit tokens)."""
    lines = ["# HELP vllm:num_requests_running Number of requests in model execution batches.",
             "# TYPE vllm:num_requests_running gauge"]
    lines += [f"vllm:num_requests_running{{{LABELS.format(e=e)}}} {r:.1f}" for e, (r, *_) in engines.items()]
    lines += ["# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
              "# TYPE vllm:num_requests_waiting gauge"]
    lines += [f"vllm:num_requests_waiting{{{LABELS.format(e=e)}}} {w:.1f}" for e, (_, w, *_) in engines.items()]
    lines += [f"# HELP {usage_name} KV-cache usage. 1 means 100 percent usage.", f"# TYPE {usage_name} gauge"]
    lines += [f"{usage_name}{{{LABELS.format(e=e)}}} {u}" for e, (_, _, u, *_) in engines.items()]
    lines += ["# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.",
              "# TYPE vllm:prefix_cache_hits_total counter"]
    lines += [f"vllm:prefix_cache_hits_total{{{LABELS.format(e=e)}}} {h:.1f}" for e, (*_, h) in engines.items()]
    lines += ["# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
              "# TYPE vllm:cache_config_info gauge"]
    for e, (_, _, _, blocks, _) in engines.items():
        lines.append(f'vllm:cache_config_info{{block_size="32",cache_dtype="auto",engine="{e}",'
                     f'num_gpu_blocks="{num_gpu_blocks or blocks}",prefix_caching_hash_algo="sha256"}} 1.0')
    return "\n".join(lines) + "\n"


def test_kvxfer_gauges():
    page = ("# TYPE kvxfer_running_requests gauge\nkvxfer_running_requests 3.0\n"
            "# TYPE kvxfer_waiting_requests gauge\nkvxfer_waiting_requests 1.0\n"
            "# TYPE kvxfer_kv_free_blocks gauge\nkvxfer_kv_free_blocks 200.0\n"
            "# TYPE kvxfer_kv_blocks gauge\nkvxfer_kv_blocks 256.0\n"
            "# TYPE kvxfer_prefix_cache_hit_blocks counter\nkvxfer_prefix_cache_hit_blocks_total 17.0\n")
    assert parse_load(page) == Load(running=3, waiting=1, free_blocks=200, num_blocks=256, prefix_hit_blocks=17)


def test_vllm_metrics_one_engine():
    # 1000 blocks, 25% used: 750 free; 640 hit tokens in 32-token blocks: 20 blocks.
    assert parse_load(vllm_page({"0": (2, 5, 0.25, 1000, 640)})) == Load(2, 5, 750, 1000, 20)


def test_vllm_metrics_summed_over_engines_and_the_old_usage_name():
    page = vllm_page({"0": (1, 0, 0.5, 400, 64), "1": (3, 2, 0.1, 400, 0)}, usage_name="vllm:gpu_cache_usage_perc")
    assert parse_load(page) == Load(4, 2, 200 + 360, 800, 2)


@pytest.mark.parametrize("page", [
    "",  # no metrics at all
    "# TYPE other_gauge gauge\nother_gauge 1.0\n",  # another server's page
    vllm_page({"0": (1, 0, 0.5, 400, 0)}, num_gpu_blocks="None"),  # pool not sized yet
    "\n".join(line for line in vllm_page({"0": (1, 0, 0.5, 400, 0)}).splitlines()
              if "kv_cache_usage" not in line) + "\n",  # no usage gauge
])
def test_pages_without_a_full_load_give_none(page):
    assert parse_load(page) is None


def test_decode_choice_on_vllm_loads():
    # Same request count: the one with more free blocks wins; fewer requests beat more room.
    def backend(name: str, page: str) -> Backend:
        return Backend(name, healthy=True, load=LoadReport(0.0, parse_load(page)))

    full = backend("full", vllm_page({"0": (2, 0, 0.9, 1000, 0)}))
    roomy = backend("roomy", vllm_page({"0": (1, 1, 0.2, 1000, 0)}))
    idle = backend("idle", vllm_page({"0": (0, 1, 0.95, 1000, 0)}))
    assert by_kv_room([full, roomy], now=1.0, max_age_s=10.0) is roomy
    assert by_kv_room([full, roomy, idle], now=1.0, max_age_s=10.0) is idle


def test_health_view_shows_the_last_report_with_its_age():
    import httpx

    from kvxfer.entrypoints.proxy_fleet import Fleet, FleetConfig

    fleet = Fleet([], ["http://decode:1"], FleetConfig("prefix_aware", 1.0, 5.0), httpx.AsyncClient())
    (backend,) = fleet.decode.backends
    assert fleet.view()["decode"][0]["load"] is None  # never read
    backend.load = LoadReport(time.monotonic() - 3.0, parse_load(vllm_page({"0": (2, 5, 0.25, 1000, 640)})))
    load = fleet.view()["decode"][0]["load"]
    assert load.pop("age_s") >= 3.0
    assert load == {"running": 2, "waiting": 5, "free_blocks": 750, "num_blocks": 1000, "prefix_hit_blocks": 20}
