"""Model families, checkpoint config and loading: `load_model_config`, then `build_model`."""

from __future__ import annotations

import torch
from torch import nn

from kvxfer.models.config import ModelConfig, load_model_config
from kvxfer.models.loader import CheckpointError

__all__ = ["ModelConfig", "CheckpointError", "load_model_config", "build_model"]


def build_model(
    model_config: ModelConfig,
    tp_rank: int = 0,
    tp_size: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> nn.Module:
    """This rank's shard of the model, weights uninitialised until `model.load_weights(model_dir)`."""
    from kvxfer.layers.parallel import TPInfo

    model_config.validate_tp(tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is outside tensor_parallel_size {tp_size}")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'float16'")
        dtype = getattr(torch, dtype)
    device = torch.device(device)
    tp = TPInfo(tp_rank, tp_size)
    if model_config.family == "llama":
        from kvxfer.models.llama import LlamaForCausalLM as cls
    elif model_config.family == "gemma3":
        from kvxfer.models.gemma3 import Gemma3ForCausalLM as cls
    else:
        from kvxfer.models.deepseek import DeepseekForCausalLM as cls
    return cls(model_config, tp, dtype, device).eval()
