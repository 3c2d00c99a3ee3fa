"""Inference engine: requests, paged KV block manager, scheduler, TP workers, model runner, sampler."""

from kvxfer.engine.config import EngineConfig
from kvxfer.engine.engine import LLMEngine
from kvxfer.engine.executor import EngineDeadError, RankBrokenError, WorkerError
from kvxfer.engine.llm import LLM
from kvxfer.engine.request import RequestIdInUse, RequestOutput, RequestStatus
from kvxfer.engine.sampling_params import SamplingParams

__all__ = [
    "EngineConfig",
    "EngineDeadError",
    "LLMEngine",
    "LLM",
    "RankBrokenError",
    "RequestIdInUse",
    "RequestOutput",
    "RequestStatus",
    "SamplingParams",
    "WorkerError",
]
