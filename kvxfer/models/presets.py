"""`kvxfer make-model`: deterministic random-weight checkpoints in the HF format.

Weights use the original HF checkpoint names (per-expert MoE tensors for DeepSeek) and are
scaled so that logits spread over several units: greedy decoding is then decided by clear
margins, not by float rounding. Tiny presets are split over several safetensors shards so
that sharded loading is always exercised.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from kvxfer.models.tiny_tokenizer import build_tokenizer


@dataclass(frozen=True)
class Preset:
    architecture: str
    config: dict
    dtype: torch.dtype = torch.float32
    tokenizer_vocab: int = 512
    shard_bytes: int = 0  # 0: shards of at most half the weights each
    notes: str = ""


_TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, rms_norm_eps=1e-6, max_position_embeddings=4096)
_DEEPSEEK_MLA = dict(
    _TINY,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=8,
    kv_lora_rank=64,
    qk_rope_head_dim=16,
    qk_nope_head_dim=32,
    v_head_dim=32,
    moe_intermediate_size=64,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    tie_word_embeddings=False,
)

PRESETS: dict[str, Preset] = {
    "tiny-qwen3": Preset(
        "Qwen3ForCausalLM",
        dict(
            _TINY,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=32,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        notes="GQA 8q/4kv heads, q/k norm, tied embeddings",
    ),
    "tiny-llama-gqa2": Preset(
        "LlamaForCausalLM",
        dict(
            _TINY,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=16,
            attention_bias=True,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        notes="2 kv heads (TP 4 replicates them), attention bias, untied LM head",
    ),
    "tiny-deepseek-mla": Preset(
        "DeepseekV2ForCausalLM",
        dict(
            _DEEPSEEK_MLA,
            q_lora_rank=None,
            topk_method="greedy",
            routed_scaling_factor=1.0,
            norm_topk_prob=False,
            # DeepSeek-V2-Lite's yarn scaling, shrunk.
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 1024,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
            },
        ),
        notes="DeepSeek-V2-Lite shape: MLA without q LoRA, yarn rope, 1 dense + 2 MoE layers (8 experts, top 2)",
    ),
    "tiny-deepseek-v3": Preset(
        "DeepseekV3ForCausalLM",
        dict(
            _DEEPSEEK_MLA,
            q_lora_rank=48,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            rope_interleave=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        notes="DeepSeek-V3 shape: MLA with q LoRA, sigmoid group-limited routing with score bias",
    ),
    # Hybrid attention: windows of 6 tokens (not a multiple of the tests' block sizes), shorter
    # than the prompts the tests use.
    "tiny-mistral-swa": Preset(
        "MistralForCausalLM",
        dict(
            _TINY,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=16,
            sliding_window=6,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        notes="Mistral: sliding window of 6 tokens on every layer, 8q/4kv heads",
    ),
    "tiny-qwen3-hybrid": Preset(
        "Qwen3ForCausalLM",
        dict(
            _TINY,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=32,
            use_sliding_window=True,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        notes="Qwen3 with mixed layer_types (3 sliding layers of 6 tokens, 1 full), 8q/4kv heads",
    ),
    "tiny-gemma3": Preset(
        "Gemma3ForCausalLM",
        dict(
            _TINY,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=24,
            sliding_window=6,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            final_logit_softcapping=30.0,
            tie_word_embeddings=True,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
        notes="Gemma 3 text: local (window 6) / global layers with their own rope, sandwich norms, "
        "gelu-tanh MLP, query_pre_attn_scalar, logit soft-capping, 4q/2kv heads",
    ),
    "qwen3-0.6b-shape": Preset(
        "Qwen3ForCausalLM",
        dict(
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            rms_norm_eps=1e-6,
            max_position_embeddings=40960,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        dtype=torch.bfloat16,
        shard_bytes=1 << 29,
        notes="Qwen3-0.6B dimensions, bfloat16, random weights (benchmarks)",
    ),
}


def weight_shapes(arch: str, c: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, in HF's original naming."""
    h, v = c["hidden_size"], c["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        if arch == "Gemma3ForCausalLM":
            shapes[f"{p}.pre_feedforward_layernorm.weight"] = (h,)
            shapes[f"{p}.post_feedforward_layernorm.weight"] = (h,)
        if arch.startswith("Deepseek"):
            shapes.update(_mla_shapes(f"{p}.self_attn", c))
            if i < c["first_k_dense_replace"]:
                shapes.update(_mlp_shapes(f"{p}.mlp", h, c["intermediate_size"]))
            else:
                shapes.update(_moe_shapes(f"{p}.mlp", arch, c))
        else:
            shapes.update(_gqa_shapes(f"{p}.self_attn", arch, c))
            shapes.update(_mlp_shapes(f"{p}.mlp", h, c["intermediate_size"]))
    return shapes


def _gqa_shapes(p: str, arch: str, c: dict) -> dict:
    h, d, hq, hkv = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    out = {f"{p}.q_proj.weight": (hq * d, h), f"{p}.k_proj.weight": (hkv * d, h), f"{p}.v_proj.weight": (hkv * d, h)}
    out[f"{p}.o_proj.weight"] = (h, hq * d)
    if c.get("attention_bias"):
        out.update({f"{p}.q_proj.bias": (hq * d,), f"{p}.k_proj.bias": (hkv * d,), f"{p}.v_proj.bias": (hkv * d,)})
        out[f"{p}.o_proj.bias"] = (h,)
    if arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"):
        out.update({f"{p}.q_norm.weight": (d,), f"{p}.k_norm.weight": (d,)})
    return out


def _mla_shapes(p: str, c: dict) -> dict:
    h, heads, lora = c["hidden_size"], c["num_attention_heads"], c["kv_lora_rank"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    out = {}
    if c["q_lora_rank"] is None:
        out[f"{p}.q_proj.weight"] = (heads * qk, h)
    else:
        out[f"{p}.q_a_proj.weight"] = (c["q_lora_rank"], h)
        out[f"{p}.q_a_layernorm.weight"] = (c["q_lora_rank"],)
        out[f"{p}.q_b_proj.weight"] = (heads * qk, c["q_lora_rank"])
    out[f"{p}.kv_a_proj_with_mqa.weight"] = (lora + c["qk_rope_head_dim"], h)
    out[f"{p}.kv_a_layernorm.weight"] = (lora,)
    out[f"{p}.kv_b_proj.weight"] = (heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), lora)
    out[f"{p}.o_proj.weight"] = (h, heads * c["v_head_dim"])
    return out


def _mlp_shapes(p: str, h: int, inter: int) -> dict:
    return {f"{p}.gate_proj.weight": (inter, h), f"{p}.up_proj.weight": (inter, h), f"{p}.down_proj.weight": (h, inter)}


def _moe_shapes(p: str, arch: str, c: dict) -> dict:
    h, experts, inter = c["hidden_size"], c["n_routed_experts"], c["moe_intermediate_size"]
    out = {f"{p}.gate.weight": (experts, h)}
    if arch == "DeepseekV3ForCausalLM":
        out[f"{p}.gate.e_score_correction_bias"] = (experts,)
    for e in range(experts):
        out.update(_mlp_shapes(f"{p}.experts.{e}", h, inter))
    out.update(_mlp_shapes(f"{p}.shared_experts", h, inter * c["n_shared_experts"]))
    return out


EMBED_STD = 0.1  # small next to the layers' outputs, so the residual stream is not the input token
LOGIT_STD = 4.0


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, config: dict, arch: str) -> torch.Tensor:
    """Scaled so each layer's output has unit-order variance and logits spread by a few units."""
    x = _effective_tensor(name, shape, gen, config)
    if arch != "Gemma3ForCausalLM":
        return x
    # Gemma multiplies norms by `1 + weight` and embeddings by sqrt(hidden): store the weights
    # that give the same effective scales as the other families.
    root = math.sqrt(config["hidden_size"])
    if name == "model.embed_tokens.weight":
        return x / root
    if name == "model.norm.weight" and config["tie_word_embeddings"]:
        x = x * root  # the tied LM head reads the stored (unscaled) embedding
    return x - 1.0 if name.endswith("norm.weight") else x


def _effective_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, config: dict) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    if name == "model.norm.weight" and config["tie_word_embeddings"]:
        # The tied LM head has the embedding's small scale; the final norm brings logits up.
        return (1.0 + 0.1 * x) * LOGIT_STD / (EMBED_STD * math.sqrt(shape[0]))
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * x
    if name.endswith("bias"):
        return 0.1 * x
    if name == "model.embed_tokens.weight":
        return EMBED_STD * x
    if name == "lm_head.weight":
        return x * (LOGIT_STD / math.sqrt(shape[1]))
    if name.endswith("mlp.gate.weight"):  # router: decisive expert choice
        return x * (3.0 / math.sqrt(shape[1]))
    return x / math.sqrt(shape[1])


# HF model_type of each architecture a preset uses.
MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3_text",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}


def make_model(preset_name: str, out_dir: str, seed: int = 0) -> str:
    """Write config, generation config, sharded safetensors and tokenizer; return `out_dir`."""
    from transformers import AutoConfig

    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[preset_name]
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer(preset.tokenizer_vocab)
    eos = tokenizer.eos_token_id
    config = AutoConfig.for_model(
        MODEL_TYPES[preset.architecture],
        architectures=[preset.architecture],
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=eos,
        dtype=str(preset.dtype).removeprefix("torch."),
        **preset.config,
    )
    config.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos, "pad_token_id": eos, "do_sample": False}, f, indent=2)
    tokenizer.save_pretrained(out_dir)
    _write_weights(weight_shapes(preset.architecture, preset.config), preset, out_dir, seed)
    return out_dir


def _write_weights(shapes: dict, preset: Preset, out_dir: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    item = torch.tensor([], dtype=preset.dtype).element_size()
    total = sum(math.prod(s) for s in shapes.values()) * item
    limit = preset.shard_bytes or (total + 1) // 2
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * item
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {
            n: random_tensor(n, shapes[n], gen, preset.config, preset.architecture).to(preset.dtype).contiguous()
            for n in names
        }
        save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    lines = [f"{name}: {p.notes}" for name, p in PRESETS.items()]
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="; ".join(lines))
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")


def main(args: argparse.Namespace) -> int:
    out = make_model(args.preset, args.out, args.seed)
    print(f"wrote {args.preset} to {out}")
    return 0
