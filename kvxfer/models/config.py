"""Model configuration: read an HF checkpoint's config, check what kvxfer supports, and derive
the numbers the engine needs (KV cache spec, TP validity, EOS ids, each layer's sliding window)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, PretrainedConfig

# HF architecture name -> kvxfer model family.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "Gemma3ForCausalLM": "gemma3",
    "DeepseekV2ForCausalLM": "deepseek",
    "DeepseekV3ForCausalLM": "deepseek",
}
# Rope types whose frequencies do not depend on the sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Architectures whose HF config lists each layer's attention kind in `layer_types`.
LAYER_TYPED = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM")
# The MLP activation each family's HF code reads, and the config field it reads it from.
ACTIVATIONS = {"llama": ("hidden_act", "silu"), "deepseek": ("hidden_act", "silu"),
               "gemma3": ("hidden_activation", "gelu_pytorch_tanh")}


@dataclass(frozen=True)
class ModelConfig:
    """What the engine needs to know about a checkpoint; `hf_config` holds the rest."""

    model_dir: str
    hf_config: PretrainedConfig = field(repr=False)
    architecture: str
    family: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int  # total; 1 for MLA (the latent is shared by all heads)
    head_size: int  # per KV head; the latent size kv_lora_rank + qk_rope_head_dim for MLA
    hidden_size: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    is_mla: bool
    checkpoint_dtype: str | None  # the dtype the checkpoint says it was saved in, e.g. "bfloat16"
    # Per layer: the sliding window W (the layer's token at p sees keys in (p - W, p]), or None
    # for full attention.
    sliding_windows: tuple[int | None, ...]

    def kv_cache_spec(self, block_size: int, dtype: torch.dtype | str):
        """The KV cache spec of this model (`kvxfer.specs`), dtype as a string such as "float32"."""
        from kvxfer.specs import FullAttentionSpec, MLAAttentionSpec

        dtype_name = str(dtype).removeprefix("torch.")
        spec_cls = MLAAttentionSpec if self.is_mla else FullAttentionSpec
        return spec_cls(
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            num_layers=self.num_layers,
            block_size=block_size,
            dtype=dtype_name,
        )

    def kv_cache_groups(self, block_size: int, dtype: torch.dtype | str):
        """The KV cache groups (`kvxfer.specs.KVCacheGroup`) the engine caches this model in: a
        model without sliding layers is one group under `kv_cache_spec` (full attention or MLA),
        a sliding-window model one group per attention kind (`group_layers`)."""
        from kvxfer.specs import KVCacheGroup, group_layers

        if not any(self.sliding_windows):
            return (KVCacheGroup(tuple(range(self.num_layers)), self.kv_cache_spec(block_size, dtype)),)
        dtype_name = str(dtype).removeprefix("torch.")
        return group_layers(self.sliding_windows, self.num_kv_heads, self.head_size, block_size, dtype_name)

    def validate_tp(self, tp: int) -> None:
        """Raise ValueError naming every size that `tp` ranks cannot split."""
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
        hf = self.hf_config
        problems = []
        if self.num_attention_heads % tp:
            problems.append(f"num_attention_heads={self.num_attention_heads} is not divisible by {tp}")
        if not self.is_mla and self.num_kv_heads % tp and tp % self.num_kv_heads:
            problems.append(
                f"num_key_value_heads={self.num_kv_heads}: neither divides the other with {tp} ranks "
                "(heads split over ranks or replicated on tp // heads ranks)"
            )
        sizes = {"intermediate_size": hf.intermediate_size, "vocab_size": self.vocab_size}
        if self.is_mla:
            sizes["moe_intermediate_size"] = hf.moe_intermediate_size
        for name, size in sizes.items():
            if size % tp:
                problems.append(f"{name}={size} is not divisible by {tp}")
        if problems:
            raise ValueError(
                f"tensor_parallel_size={tp} does not fit model {self.model_dir}: " + "; ".join(problems)
            )


def load_model_config(model_dir: str | os.PathLike) -> ModelConfig:
    """Read `config.json` of an HF checkpoint directory; reject what kvxfer cannot run."""
    model_dir = str(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"model directory {model_dir!r} has no config.json")
    try:
        hf = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"cannot read the model config in {model_dir!r}: {exc}") from exc
    archs = [a for a in (getattr(hf, "architectures", None) or []) if a in ARCHITECTURES]
    if not archs:
        raise ValueError(
            f"unsupported architecture {getattr(hf, 'architectures', None)!r} (model_type {hf.model_type!r}) "
            f"in {model_dir!r}; kvxfer supports {sorted(ARCHITECTURES)}"
        )
    arch = archs[0]
    family = ARCHITECTURES[arch]
    _check_supported(hf, family, model_dir)
    sliding_windows = _sliding_windows(hf, arch, model_dir)
    is_mla = family == "deepseek"
    if is_mla:
        num_kv_heads, head_size = 1, hf.kv_lora_rank + hf.qk_rope_head_dim
    else:
        num_kv_heads = hf.num_key_value_heads or hf.num_attention_heads
        head_size = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    dtype = getattr(hf, "dtype", None)
    return ModelConfig(
        model_dir=model_dir,
        hf_config=hf,
        architecture=arch,
        family=family,
        num_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        hidden_size=hf.hidden_size,
        vocab_size=hf.vocab_size,
        eos_token_ids=_eos_token_ids(hf, model_dir),
        is_mla=is_mla,
        checkpoint_dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
        sliding_windows=sliding_windows,
    )


def _check_supported(hf: PretrainedConfig, family: str, model_dir: str) -> None:
    if getattr(hf, "quantization_config", None):
        method = dict(hf.quantization_config).get("quant_method", "?")
        raise NotImplementedError(f"quantized checkpoints ({method!r} in {model_dir!r}) are not supported")
    act_field, act = ACTIVATIONS[family]
    if getattr(hf, act_field) != act:
        raise ValueError(f"{act_field} {getattr(hf, act_field)!r} in {model_dir!r} is not supported (only {act!r})")
    rope = getattr(hf, "rope_parameters", None) or {}
    # Gemma 3 nests one rope dict per layer type (global and local bases differ).
    for params in rope.values() if family == "gemma3" else [rope]:
        rope_type = params.get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise NotImplementedError(
                f"rope type {rope_type!r} in {model_dir!r} is not supported; supported: {STATIC_ROPE_TYPES}"
            )
    if family == "deepseek" and getattr(hf, "mlp_bias", False):
        raise NotImplementedError(f"DeepSeek MLP biases ({model_dir!r}) are not supported")
    if family == "gemma3":
        if hf.attn_logit_softcapping is not None:
            raise NotImplementedError(f"attn_logit_softcapping in {model_dir!r} is not supported")
        if hf.use_bidirectional_attention:
            raise NotImplementedError(f"use_bidirectional_attention in {model_dir!r} is not supported")


def _sliding_windows(hf: PretrainedConfig, arch: str, model_dir: str) -> tuple[int | None, ...]:
    """Each layer's window, as transformers reads the config: Mistral slides `sliding_window` over
    every layer (ignoring `layer_types`); Qwen2/Qwen3/Gemma 3 slide it over the layers that
    `layer_types` marks "sliding_attention" (Qwen derives those from `use_sliding_window` and
    `max_window_layers` when `layer_types` is absent, and drops the window without
    `use_sliding_window`); other architectures attend fully."""
    window = getattr(hf, "sliding_window", None)
    if arch == "MistralForCausalLM":
        layer_types = ["full_attention" if window is None else "sliding_attention"] * hf.num_hidden_layers
    elif arch in LAYER_TYPED:
        layer_types = list(hf.layer_types)
    else:
        return (None,) * hf.num_hidden_layers
    if len(layer_types) != hf.num_hidden_layers:
        raise ValueError(
            f"layer_types in {model_dir!r} has {len(layer_types)} entries for {hf.num_hidden_layers} layers"
        )
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise NotImplementedError(
            f"layer_types {unknown} in {model_dir!r} are not supported (only full_attention, sliding_attention)"
        )
    if "sliding_attention" in layer_types and (type(window) is not int or window < 1):
        # transformers cannot build these layers' mask either.
        hint = " (Qwen configs need use_sliding_window: true)" if arch.startswith("Qwen") else ""
        raise ValueError(f"sliding_window is {window!r} in {model_dir!r}, not a positive integer{hint}")
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


def _eos_token_ids(hf: PretrainedConfig, model_dir: str) -> tuple[int, ...]:
    """EOS ids from config.json and generation_config.json (the latter often lists several)."""
    ids: list[int] = []
    sources = [hf.eos_token_id]
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            sources.append(json.load(f).get("eos_token_id"))
    for value in sources:
        for token in value if isinstance(value, list) else [value]:
            if token is not None and token not in ids:
                ids.append(int(token))
    return tuple(ids)
