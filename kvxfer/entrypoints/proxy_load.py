"""A server's load from its Prometheus /metrics page, as the proxy's decode choice uses it:
requests running and waiting, free and total KV blocks, prefix-cache hit blocks. Two dialects:

- kvxfer's unlabelled gauges (`kvxfer_running_requests`, `kvxfer_kv_free_blocks`, ...);
- vLLM's (`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`,
  `gpu_cache_usage_perc` in vLLM before 0.10, and `vllm:cache_config_info`, whose labels carry
  `num_gpu_blocks` and `block_size`), labelled per model and engine: counts are summed over
  engines, the pool's free blocks are `num_gpu_blocks * (1 - usage)` per engine, summed, and
  `vllm:prefix_cache_hits_total` (tokens) is turned into blocks by `block_size`.

A page in neither dialect (or one missing a field) gives None: routing then counts the proxy's
own in-flight requests only. Pure parsing, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

KVXFER_METRICS = {"kvxfer_running_requests": "running", "kvxfer_waiting_requests": "waiting",
                  "kvxfer_kv_free_blocks": "free_blocks", "kvxfer_kv_blocks": "num_blocks",
                  "kvxfer_prefix_cache_hit_blocks_total": "prefix_hit_blocks"}
VLLM_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # a fraction (0-1) despite the name


@dataclass(frozen=True)
class Load:
    running: int
    waiting: int
    free_blocks: int
    num_blocks: int
    prefix_hit_blocks: int


def _kvxfer(samples: list) -> Load | None:
    values = {KVXFER_METRICS[s.name]: s.value for s in samples if s.name in KVXFER_METRICS and not s.labels}
    if not {"running", "waiting", "free_blocks", "num_blocks"} <= values.keys():
        return None
    return Load(int(values["running"]), int(values["waiting"]), int(values["free_blocks"]), int(values["num_blocks"]),
                int(values.get("prefix_hit_blocks", 0)))


def _vllm(samples: list) -> Load | None:
    def per_engine(name: str) -> dict[str, float]:
        return {s.labels.get("engine", ""): s.value for s in samples if s.name == name}

    running, waiting = per_engine("vllm:num_requests_running"), per_engine("vllm:num_requests_waiting")
    usage = next((u for u in map(per_engine, VLLM_USAGE) if u), {})
    info = {s.labels.get("engine", ""): s.labels for s in samples if s.name == "vllm:cache_config_info"}
    try:
        blocks = {e: int(labels["num_gpu_blocks"]) for e, labels in info.items()}
        block_size = max((int(labels["block_size"]) for labels in info.values()), default=0)
    except (KeyError, ValueError):  # "None" before the engine has sized its pool
        return None
    if not running or not waiting or not usage or not blocks or set(usage) - set(blocks):
        return None
    free = sum(round(blocks[e] * (1.0 - min(max(u, 0.0), 1.0))) for e, u in usage.items())
    hit_tokens = sum(per_engine("vllm:prefix_cache_hits_total").values())
    return Load(int(sum(running.values())), int(sum(waiting.values())), free, sum(blocks.values()),
                int(hit_tokens // block_size) if block_size > 0 else 0)


def parse_load(text: str) -> Load | None:
    """The load a /metrics page reports (kvxfer's gauges, else vLLM's), None if it reports none;
    raises ValueError on a page that is not Prometheus text."""
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return _kvxfer(samples) or _vllm(samples)
