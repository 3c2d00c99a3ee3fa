"""kvxfer: disaggregated prefill/decode serving with heterogeneous-TP KV transfer over NIXL."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "KVTransferConfig"]


def __getattr__(name: str):
    # Lazy, so that `kvxfer.specs` stays importable without torch.
    if name == "LLM":
        from kvxfer.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from kvxfer.engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "KVTransferConfig":
        from kvxfer.connectors.config import KVTransferConfig

        return KVTransferConfig
    raise AttributeError(f"module 'kvxfer' has no attribute {name!r}")
