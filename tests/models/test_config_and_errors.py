"""Config reading, TP validation and checkpoint errors: each bad input names what is wrong."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config

from kvxfer.layers.rotary import RotaryEmbedding
from kvxfer.models import CheckpointError, build_model, load_model_config
from kvxfer.models.deepseek import softmax_scale

from .conftest import TINY_PRESETS


def copy_preset(preset_dir, name, tmp_path):
    return shutil.copytree(preset_dir(name), tmp_path / name)


def rewrite_shard_holding(model_dir, tensor_name, change):
    """Apply `change(tensors)` to the safetensors shard that holds `tensor_name`."""
    with open(model_dir / "model.safetensors.index.json") as f:
        shard = model_dir / json.load(f)["weight_map"][tensor_name]
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def test_model_config_fields(preset_dir):
    qwen = load_model_config(preset_dir("tiny-qwen3"))
    assert (qwen.num_layers, qwen.num_kv_heads, qwen.head_size, qwen.vocab_size) == (3, 4, 32, 512)
    assert not qwen.is_mla and qwen.eos_token_ids == (0,)
    mla = load_model_config(preset_dir("tiny-deepseek-mla"))
    assert mla.is_mla and (mla.num_kv_heads, mla.head_size) == (1, 64 + 16)
    spec = mla.kv_cache_spec(16, torch.float32)
    assert spec.block_shape(4) == (1, 3, 1, 16, 80) and spec.dtype == "float32"
    assert qwen.kv_cache_spec(16, "bfloat16").block_shape(2) == (2, 3, 2, 16, 32)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_config(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model_config(tmp_path)


def test_unknown_architecture_is_rejected(tmp_path):
    GPT2Config(n_layer=1, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unsupported architecture \['GPT2LMHeadModel'\].*'gpt2'.*supports"):
        load_model_config(tmp_path)
    GPT2Config(n_layer=1).save_pretrained(tmp_path)  # no architectures at all
    with pytest.raises(ValueError, match=r"unsupported architecture None \(model_type 'gpt2'\)"):
        load_model_config(tmp_path)


def test_unknown_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model", "architectures": ["X"]}))
    with pytest.raises(ValueError, match="cannot read the model config"):
        load_model_config(tmp_path)


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_presets_allow_tp_1_2_4(preset_dir, name):
    config = load_model_config(preset_dir(name))
    for tp in (1, 2, 4):
        config.validate_tp(tp)


def test_tp_not_dividing_heads_is_rejected_naming_the_sizes(preset_dir):
    config = load_model_config(preset_dir("tiny-qwen3"))
    with pytest.raises(ValueError, match=r"num_attention_heads=8 is not divisible by 3.*num_key_value_heads=4"):
        config.validate_tp(3)
    with pytest.raises(ValueError, match="num_attention_heads=8 is not divisible by 3"):
        build_model(config, 0, 3)
    llama = load_model_config(preset_dir("tiny-llama-gqa2"))
    llama.validate_tp(8)  # 2 KV heads replicated 4 times
    with pytest.raises(ValueError, match=r"num_attention_heads=8 is not divisible by 16"):
        llama.validate_tp(16)
    mla = load_model_config(preset_dir("tiny-deepseek-mla"))
    with pytest.raises(ValueError, match=r"moe_intermediate_size=64 is not divisible by 128"):
        mla.validate_tp(128)


def test_missing_weight_is_named(preset_dir, tmp_path):
    model_dir = copy_preset(preset_dir, "tiny-qwen3", tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_shard_holding(model_dir, name, lambda t: t.pop(name))
    model = build_model(load_model_config(model_dir))
    with pytest.raises(CheckpointError, match=rf"weight '{name}' is missing"):
        model.load_weights(str(model_dir))


def test_wrong_shape_is_named_with_both_shapes(preset_dir, tmp_path):
    model_dir = copy_preset(preset_dir, "tiny-deepseek-mla", tmp_path)
    name = "model.layers.2.mlp.experts.3.down_proj.weight"
    rewrite_shard_holding(model_dir, name, lambda t: t.update({name: torch.zeros(128, 32)}))
    model = build_model(load_model_config(model_dir), 1, 2)
    with pytest.raises(CheckpointError, match=rf"'{name}'.* has shape \[128, 32\], the model expects \[128, 64\]"):
        model.load_weights(str(model_dir))


def test_directory_without_safetensors(preset_dir, tmp_path):
    model_dir = copy_preset(preset_dir, "tiny-llama-gqa2", tmp_path)
    for shard in model_dir.glob("*.safetensors"):
        shard.unlink()
    with pytest.raises(CheckpointError, match=r"no \*.safetensors files"):
        build_model(load_model_config(model_dir)).load_weights(str(model_dir))


def test_legacy_rope_scaling_config_gives_the_same_rope(preset_dir, tmp_path):
    """Real DeepSeek-V2-Lite configs say `rope_scaling` + `rope_theta`; both forms must agree."""
    model_dir = copy_preset(preset_dir, "tiny-deepseek-mla", tmp_path)
    new = load_model_config(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    raw["rope_scaling"] = params
    (model_dir / "config.json").write_text(json.dumps(raw))
    old = load_model_config(model_dir)
    rotaries = [RotaryEmbedding(c.hf_config, 16, interleaved=True) for c in (new, old)]
    torch.testing.assert_close(rotaries[0].cos_sin_table, rotaries[1].cos_sin_table, rtol=0, atol=0)
    assert softmax_scale(new.hf_config) == softmax_scale(old.hf_config) != 48**-0.5


def test_quantized_checkpoint_is_rejected_before_loading(preset_dir, tmp_path):
    model_dir = copy_preset(preset_dir, "tiny-deepseek-v3", tmp_path)
    raw = json.loads((model_dir / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (model_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(NotImplementedError, match="quantized checkpoints \\('fp8'"):
        load_model_config(model_dir)


def test_bad_dtype_and_rank(preset_dir):
    config = load_model_config(preset_dir("tiny-qwen3"))
    with pytest.raises(ValueError, match="unknown dtype 'float7'"):
        build_model(config, dtype="float7")
    with pytest.raises(ValueError, match="tp_rank 2 is outside"):
        build_model(config, 2, 2)
