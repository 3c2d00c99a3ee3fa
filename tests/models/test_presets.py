"""`make-model` presets: deterministic, HF-loadable tokenizer, TP-friendly sizes."""

import argparse
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from kvxfer.models import load_model_config
from kvxfer.models import presets


def shards(model_dir):
    return {path.name: load_file(path) for path in sorted(model_dir.glob("*.safetensors"))}


def test_same_seed_same_checkpoint_other_seed_differs(preset_dir, tmp_path):
    reference = shards(Path(preset_dir("tiny-llama-gqa2")))
    again = shards(Path(presets.make_model("tiny-llama-gqa2", str(tmp_path / "again"))))
    other = shards(Path(presets.make_model("tiny-llama-gqa2", str(tmp_path / "other"), seed=1)))
    assert reference.keys() == again.keys() == other.keys() and len(reference) >= 2  # several shards
    for file, tensors in reference.items():
        for name, tensor in tensors.items():
            assert tensor.equal(again[file][name]), name
            assert not tensor.equal(other[file][name]), name


def test_tokenizer_loads_with_eos_and_chat_template(preset_dir):
    path = preset_dir("tiny-qwen3")
    tok = AutoTokenizer.from_pretrained(path)
    config = load_model_config(path)
    assert tok.eos_token_id in config.eos_token_ids
    assert 256 < len(tok) <= config.vocab_size and config.vocab_size % 4 == 0
    text = "The prefill engine writes the cache."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text) / 2  # merges learnt, round trip exact
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_qwen3_0_6b_shape_preset_has_the_real_dimensions():
    c = presets.PRESETS["qwen3-0.6b-shape"].config
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]) == (
        1024, 28, 16, 8,
    )
    shapes = presets.weight_shapes("Qwen3ForCausalLM", c)
    assert 0.59e9 < sum(math.prod(s) for s in shapes.values()) < 0.61e9


def test_cli_arguments_and_unknown_preset(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    presets.add_arguments(parser)
    args = parser.parse_args(["--preset", "tiny-deepseek-mla", "--out", str(tmp_path / "m"), "--seed", "3"])
    assert presets.main(args) == 0
    assert load_model_config(tmp_path / "m").architecture == "DeepseekV2ForCausalLM"
    assert "wrote tiny-deepseek-mla" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["--preset", "nope", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        presets.make_model("nope", str(tmp_path))
