"""Health and stats read from an LLMEngine; both run on the engine thread."""

from __future__ import annotations

from typing import Any


def ranks_alive(engine: Any) -> bool:
    """Every TP rank answers a cheap call (a dead rank raises or times out)."""
    infos = engine.collective_rpc("kv_pool_info")
    return len(infos) == engine.config.tensor_parallel_size and all(i is not None for i in infos)


def engine_stats(engine: Any) -> dict:
    """engine.stats() flattened: the connector's counters appear as `kv_<name>`."""
    stats = dict(engine.stats())
    for key, value in (stats.pop("connector", None) or {}).items():
        stats[f"kv_{key}"] = value
    return stats
