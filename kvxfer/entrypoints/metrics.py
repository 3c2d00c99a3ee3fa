"""Prometheus metrics of one server (request counters kept here, engine gauges read at scrape)
and of the proxy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from kvxfer.engine.request import RequestOutput

# engine.stats() key -> (metric name, help, kind); keys the engine does not report are skipped.
ENGINE_STATS = {
    "num_free_blocks": ("kvxfer_kv_free_blocks", "Free KV cache blocks", "gauge"),
    "num_blocks": ("kvxfer_kv_blocks", "KV cache blocks in the pool", "gauge"),
    "num_running": ("kvxfer_running_requests", "Requests being computed", "gauge"),
    "num_waiting": ("kvxfer_waiting_requests", "Requests waiting to be scheduled", "gauge"),
    "num_aborted_loads": ("kvxfer_aborted_loads_requests", "Aborted requests whose KV pull is still in flight", "gauge"),
    "num_waiting_for_remote_kv": ("kvxfer_waiting_for_remote_kv_requests", "Requests waiting for remote KV", "gauge"),
    "kv_held_requests": ("kvxfer_kv_held_requests", "Finished prefill requests whose blocks wait for a decode engine", "gauge"),
    "kv_failures": ("kvxfer_kv_transfer_failures", "KV pulls that failed", "counter"),
    "kv_expired_leases": ("kvxfer_kv_expired_leases", "Held prefill blocks freed by lease expiry", "counter"),
    "kv_released": ("kvxfer_kv_released", "Held prefill blocks released early (no decode side will read them)", "counter"),
    "kv_sends_completed": ("kvxfer_kv_sends_completed", "Held prefill blocks freed after their decode side read them", "counter"),
    "kv_refused_checks": ("kvxfer_kv_refused_checks", "Side-channel hold checks refused (wrong token, blocks, instance, or no longer held)", "counter"),
    "kv_refused_releases": ("kvxfer_kv_refused_releases", "Releases of a held request refused (wrong, stale or missing transfer token)", "counter"),
    "kv_refused_notifications": ("kvxfer_kv_refused_notifications", "ReadDone notifications refused for a wrong transfer token (summed over TP ranks)", "counter"),
    "kv_handshakes": ("kvxfer_kv_handshakes", "KV peer handshakes of this engine's ranks (summed over TP ranks)", "counter"),
    "kv_recomputed": ("kvxfer_kv_recomputed", "Requests whose KV pull failed and were prefilled locally instead", "counter"),
    "num_preemptions": ("kvxfer_preemptions", "Requests preempted for lack of blocks", "counter"),
    "prefix_hit_blocks": ("kvxfer_prefix_cache_hit_blocks", "Blocks served from the prefix cache", "counter"),
}


class _EngineStatsCollector:
    def __init__(self):
        self.stats: dict[str, Any] = {}

    def collect(self):
        for key, (name, help_text, kind) in ENGINE_STATS.items():
            value = self.stats.get(key)
            if isinstance(value, (int, float)):
                family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                yield family(name, help_text, value=value)


class ServerMetrics:
    def __init__(self):
        disable_created_metrics()  # `*_created` series only add noise here
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvxfer_requests", "Finished requests", ["finish_reason"], registry=r)
        self.rejected = Counter("kvxfer_rejected_requests", "Requests rejected before the engine", ["status"], registry=r)
        self.prompt_tokens = Counter("kvxfer_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("kvxfer_generation_tokens", "Generated tokens", registry=r)
        self.transfers = Counter("kvxfer_kv_transfers", "Requests whose KV was pulled from a prefill engine", registry=r)
        self.transfer_bytes = Counter("kvxfer_kv_transfer_bytes", "Bytes pulled from prefill engines", registry=r)
        self.transfer_seconds = Counter("kvxfer_kv_transfer_seconds", "Seconds spent pulling KV", registry=r)
        self.transfer_descriptors = Counter("kvxfer_kv_transfer_descriptors", "NIXL descriptors posted", registry=r)
        self._engine = _EngineStatsCollector()
        r.register(self._engine)

    def record_finished(self, output: RequestOutput) -> None:
        self.requests.labels(output.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(len(output.output_token_ids))
        stats = output.kv_transfer_stats
        if stats and not stats.get("recomputed"):  # a recompute moved nothing (counted by the engine)
            self.transfers.inc()
            self.transfer_bytes.inc(stats.get("bytes", 0))
            self.transfer_seconds.inc(stats.get("seconds", 0.0))
            self.transfer_descriptors.inc(stats.get("descriptors", 0))

    def render(self, engine_stats: dict[str, Any]) -> bytes:
        self._engine.stats = engine_stats
        return generate_latest(self.registry)


class ProxyMetrics:
    """Counters of the P/D proxy: answers by status, decode answers that recomputed their KV
    locally (a broken transfer path must show), prefill aborts sent (by token or id), prefill legs
    recomputed elsewhere after their server dropped the connection, the path
    each request took, and how much of the prompts the chosen servers' prefix indexes held."""

    def __init__(self):
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvxfer_proxy_requests", "Requests answered by the proxy", ["status"], registry=r)
        self.recomputed = Counter("kvxfer_proxy_kv_recomputed",
                                  "Decode answers whose KV was recomputed locally, not pulled", registry=r)
        self.prefill_aborts = Counter("kvxfer_proxy_prefill_aborts", "Aborts sent to prefill servers", ["by"],
                                      registry=r)
        self.paths = Counter("kvxfer_proxy_routed", "Requests routed, by path: disaggregated (prefill then decode) "
                             "or colocated (the decode server alone)", ["path"], registry=r)
        self.prefill_retries = Counter("kvxfer_proxy_prefill_retries",
                                       "Prefill legs recomputed on another server after theirs dropped the connection",
                                       registry=r)
        self.prompt_blocks = Counter("kvxfer_proxy_prompt_blocks",
                                     "Full prompt blocks of routed requests (the proxy's index keys)", registry=r)
        self.matched_blocks = Counter("kvxfer_proxy_matched_blocks",
                                      "Prompt blocks the chosen server's prefix index held", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
