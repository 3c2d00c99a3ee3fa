"""Sliding-window and hybrid models (Mistral, Qwen2/Qwen3 layer_types, Gemma 3) against HF
transformers on CPU float32: per-layer windows read like transformers, logits and greedy tokens
at TP 1, 2 and 4 (real gloo processes), and the checks that what is unsupported stays refused."""

import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvxfer.models import load_model_config

from .harness import run_ranks
from .hybrid import DECODE_STEPS, HYBRID_PRESETS, PROMPT_LENS, WINDOW, hybrid_logits, hybrid_tp_logits


def hf_reference(model_dir, tokens: dict[int, list[int]]) -> dict[int, torch.Tensor]:
    hf, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return {seq: hf(torch.tensor([toks])).logits[0] for seq, toks in tokens.items()}


def assert_matches_hf(name, results, reference, tol=2e-4):
    worst = max((logits - reference[seq][pos]).abs().max().item() for seq, pos, logits in results)
    assert worst < tol, f"{name}: max |logit diff| {worst}"
    first = {}
    for seq, pos, logits in results:
        first.setdefault(seq, (pos, logits))
        top2 = reference[seq][pos].topk(2).values
        if top2[0] - top2[1] > 1e-3:  # not a rounding tie
            assert int(logits.argmax()) == int(reference[seq][pos].argmax()), f"{name}: greedy differs at {seq}/{pos}"
    for seq, (pos, logits) in first.items():
        diff = torch.log_softmax(logits, -1) - torch.log_softmax(reference[seq][pos], -1)
        assert diff.abs().max().item() < 1e-4, f"{name}: first-token log-probs of sequence {seq}"


@pytest.fixture(scope="module", params=HYBRID_PRESETS)
def greedy_run(request, preset_dir):
    path = preset_dir(request.param)
    results, tokens = hybrid_logits(path, greedy=True)
    return request.param, path, results, tokens


def test_preset_windows_are_shorter_than_the_prompts(greedy_run):
    name, path, _, _ = greedy_run
    windows = load_model_config(path).sliding_windows
    assert WINDOW in windows and set(windows) <= {WINDOW, None}, windows
    assert min(PROMPT_LENS) < WINDOW == PROMPT_LENS[1] < 3 * WINDOW < max(PROMPT_LENS)
    assert min(PROMPT_LENS) + DECODE_STEPS > WINDOW  # the short prompt's generation crosses the window


def test_greedy_logits_match_hf(greedy_run):
    name, path, results, tokens = greedy_run
    assert_matches_hf(name, results, hf_reference(path, tokens))


def test_greedy_tokens_equal_hf_generate(greedy_run):
    """HF's own generate loop (its sliding-window KV cache) picks the same tokens."""
    name, path, _, tokens = greedy_run
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for seq, (prompt_len, toks) in enumerate(zip(PROMPT_LENS, tokens.values())):
        prompt = torch.tensor([toks[:prompt_len]])
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(toks) - prompt_len,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out[0].tolist() == toks, f"{name}: sequence {seq}"


def test_without_the_window_the_logits_differ(greedy_run):
    """Negative control: the window changes these models' outputs, so the parity above tests it."""
    name, path, _, tokens = greedy_run
    results, tokens = hybrid_logits(path, greedy=True, windows=False)
    reference = hf_reference(path, tokens)
    worst = max((logits - reference[seq][pos]).abs().max().item() for seq, pos, logits in results)
    assert worst > 1.0, f"{name}: dropping the window changed logits by only {worst}"


def test_gemma3_bfloat16_on_cpu_tracks_float32(preset_dir):
    """bfloat16 weights and cache (Gemma's norms and embedding scale round like HF's) stay close."""
    path = preset_dir("tiny-gemma3")
    expected, tokens = hybrid_logits(path)
    got, got_tokens = hybrid_logits(path, dtype=torch.bfloat16)
    assert got_tokens == tokens
    worst = max((a.float() - b).abs().max().item() for (_, _, a), (_, _, b) in zip(got, expected))
    agree = sum(int(a.argmax() == b.argmax()) for (_, _, a), (_, _, b) in zip(got, expected)) / len(got)
    assert worst < 1.0 and agree >= 0.8, (worst, agree)


@pytest.mark.cuda
@pytest.mark.parametrize("name", HYBRID_PRESETS)
def test_cuda_float32_matches_hf(preset_dir, name):
    """The Triton kernels with windows, through whole models."""
    torch.backends.cuda.matmul.allow_tf32 = False
    results, tokens = hybrid_logits(preset_dir(name), greedy=True, device="cuda")
    assert_matches_hf(f"{name} on CUDA", [(s, p, logits.cpu()) for s, p, logits in results],
                      hf_reference(preset_dir(name), tokens), tol=1e-3)


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tp_ranks_match_hf(tp_size, preset_dir, tmp_path):
    # tiny-gemma3 has 2 KV heads: at TP 4 each is replicated on two ranks.
    run_ranks(hybrid_tp_logits, tp_size, [(name, preset_dir(name)) for name in HYBRID_PRESETS], str(tmp_path))
    for name in HYBRID_PRESETS:
        results, tokens = torch.load(tmp_path / f"{name}.pt")
        assert_matches_hf(f"{name} at TP {tp_size}", results, hf_reference(preset_dir(name), tokens))


def edit_config(src, dst, **changes):
    model_dir = shutil.copytree(src, dst)
    raw = json.loads((model_dir / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            raw.pop(key, None)
        else:
            raw[key] = value
    (model_dir / "config.json").write_text(json.dumps(raw))
    return model_dir


def hf_windows(model_dir) -> tuple:
    """Each layer's window the way transformers' Qwen/Gemma attention modules pick it."""
    hf = AutoConfig.from_pretrained(model_dir)
    return tuple(hf.sliding_window if kind == "sliding_attention" else None for kind in hf.layer_types)


@pytest.mark.parametrize(
    "changes,expected",
    [
        # No layer_types: layers from max_window_layers on slide (Qwen's __post_init__).
        (dict(layer_types=..., max_window_layers=1), (None, WINDOW, WINDOW, WINDOW)),
        (dict(layer_types=..., max_window_layers=3), (None, None, None, WINDOW)),
        # Without use_sliding_window Qwen drops the window, and no layer slides.
        (dict(layer_types=..., use_sliding_window=False), (None,) * 4),
    ],
)
def test_qwen3_windows_follow_transformers(preset_dir, tmp_path, changes, expected):
    model_dir = edit_config(preset_dir("tiny-qwen3-hybrid"), tmp_path / "m", **changes)
    assert load_model_config(model_dir).sliding_windows == hf_windows(model_dir) == expected


def test_gemma3_default_pattern_and_mistral_without_window(preset_dir, tmp_path):
    gemma = edit_config(preset_dir("tiny-gemma3"), tmp_path / "g", layer_types=..., sliding_window_pattern=2,
                        num_hidden_layers=4)
    assert load_model_config(gemma).sliding_windows == hf_windows(gemma) == (WINDOW, None, WINDOW, None)
    mistral = edit_config(preset_dir("tiny-mistral-swa"), tmp_path / "m", sliding_window=None)
    assert load_model_config(mistral).sliding_windows == (None, None)


@pytest.mark.parametrize(
    "preset,changes,error,match",
    [
        ("tiny-qwen3-hybrid", dict(use_sliding_window=False), ValueError, "sliding_window is None.*use_sliding_window"),
        ("tiny-qwen3-hybrid", dict(layer_types=["chunked_attention"] * 4), NotImplementedError, "chunked_attention"),
        ("tiny-gemma3", dict(attn_logit_softcapping=50.0), NotImplementedError, "attn_logit_softcapping"),
        ("tiny-gemma3", dict(hidden_activation="relu"), ValueError, "hidden_activation 'relu'"),
        ("tiny-gemma3", dict(use_bidirectional_attention=True), NotImplementedError, "bidirectional"),
    ],
)
def test_unsupported_window_configs_are_named(preset_dir, tmp_path, preset, changes, error, match):
    model_dir = edit_config(preset_dir(preset), tmp_path / "m", **changes)
    with pytest.raises(error, match=match):
        load_model_config(model_dir)


TRANSFORMERS_MADE = {
    # Qwen2: q/k/v biases but no o bias; windows from use_sliding_window + max_window_layers.
    "qwen2": (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=WINDOW,
                   max_window_layers=1, tie_word_embeddings=False), (None, WINDOW, WINDOW)),
    "mistral": (dict(architectures=["MistralForCausalLM"], sliding_window=WINDOW, tie_word_embeddings=False),
                (WINDOW,) * 3),
    # Gemma 3 in the legacy config form: rope_theta / rope_local_base_freq, sliding_window_pattern.
    "gemma3_text": (dict(architectures=["Gemma3ForCausalLM"], sliding_window=WINDOW, sliding_window_pattern=3,
                         rope_theta=500000.0, rope_local_base_freq=5000.0, query_pre_attn_scalar=20,
                         head_dim=16), (WINDOW, WINDOW, None)),
}


@pytest.mark.parametrize("model_type", sorted(TRANSFORMERS_MADE))
def test_transformers_made_checkpoint_matches_hf(tmp_path, model_type):
    """A checkpoint written by transformers itself, weights rescaled so attention is far from uniform."""
    changes, windows = TRANSFORMERS_MADE[model_type]
    config = AutoConfig.for_model(
        model_type, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **changes,
    )
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(0.0 if model_type.startswith("gemma") else 1.0)  # Gemma scales by 1 + w
            elif param.dim() == 1:
                param.normal_(0, 0.1)
            else:
                param.normal_(0, 4.0 if name == "lm_head.weight" else 1.0).div_(param.shape[1] ** 0.5)
    hf.save_pretrained(tmp_path)
    assert load_model_config(tmp_path).sliding_windows == windows
    results, tokens = hybrid_logits(str(tmp_path), greedy=True)
    assert_matches_hf(f"transformers-made {model_type}", results, hf_reference(tmp_path, tokens))
