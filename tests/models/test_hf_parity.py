"""Our models (TP 1, paged KV cache, mixed batches) against HF transformers on CPU float32."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from kvxfer.models import build_model, load_model_config

from .conftest import TINY_PRESETS
from .harness import PagedRunner, make_prompts, run_scenario


@pytest.fixture(scope="module", params=TINY_PRESETS)
def parity_run(request, preset_dir):
    path = preset_dir(request.param)
    config = load_model_config(path)
    model = build_model(config, 0, 1, "cpu", torch.float32)
    model.load_weights(path)
    runner = PagedRunner(model, config, tp_size=1)
    results = run_scenario(runner, make_prompts(config.vocab_size), lambda seq, logits: int(logits.argmax()))
    hf, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        reference = {seq: hf(torch.tensor([toks])).logits[0] for seq, toks in runner.tokens.items()}
    return request.param, info, results, reference


def test_hf_loads_the_preset_without_missing_or_unexpected_weights(parity_run):
    _, info, _, _ = parity_run
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_logits_match_hf_at_every_step(parity_run):
    name, _, results, reference = parity_run
    assert len(results) == 3 + 3 + 4 + 4 * 4
    worst = max((logits - reference[seq][pos]).abs().max().item() for seq, pos, logits in results)
    assert worst < 2e-4, f"{name}: max |logit diff| {worst}"


def test_first_token_logprobs_and_greedy_tokens_match_hf(parity_run):
    _, _, results, reference = parity_run
    first = {}
    for seq, pos, logits in results:
        first.setdefault(seq, (pos, logits))
        ref = reference[seq][pos]
        top2 = ref.topk(2).values
        # Greedy choices agree wherever the reference is not a rounding tie.
        if top2[0] - top2[1] > 1e-3:
            assert int(logits.argmax()) == int(ref.argmax())
    for seq, (pos, logits) in first.items():
        ours = torch.log_softmax(logits, -1)
        ref = torch.log_softmax(reference[seq][pos], -1)
        assert (ours - ref).abs().max().item() < 1e-4


def test_logit_margins_are_well_above_float_rounding(parity_run):
    name, _, _, reference = parity_run
    gaps = torch.cat([(lambda t: t[:, 0] - t[:, 1])(r.topk(2, -1).values) for r in reference.values()])
    assert gaps.median() > 0.1, f"{name}: median top-1/top-2 gap {gaps.median():.4f}"
    assert gaps.min() > 1e-4, f"{name}: smallest top-1/top-2 gap {gaps.min():.2e}"



def replace_q_lora_with_q_proj(model_dir):
    """Swap every layer's q_a/q_b LoRA pair for a random plain q_proj (as in V2-Lite)."""
    for shard in model_dir.glob("*.safetensors"):
        tensors = load_file(shard)
        for key in [k for k in tensors if k.endswith("q_b_proj.weight")]:
            q_proj = torch.randn(tensors[key].shape[0], 128, generator=torch.Generator().manual_seed(0)) / 128**0.5
            tensors[key.replace("q_b_proj", "q_proj")] = q_proj
        save_file({k: v for k, v in tensors.items() if ".q_a_" not in k and ".q_b_" not in k}, shard)
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k.replace("q_b_", "q_"): v for k, v in index["weight_map"].items() if ".q_a_" not in k}
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize(
    "name,changes",
    [
        ("tiny-deepseek-mla", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}),
        ("tiny-deepseek-v3", {"rope_interleave": False, "q_lora_rank": None}),
    ],
)
def test_config_variants_match_hf(preset_dir, tmp_path, name, changes):
    """Routing, rope and q-projection options the presets do not cover."""
    model_dir = shutil.copytree(preset_dir(name), tmp_path / name)
    raw = json.loads((model_dir / "config.json").read_text())
    raw.update(changes)
    (model_dir / "config.json").write_text(json.dumps(raw))
    if "q_lora_rank" in changes:
        replace_q_lora_with_q_proj(model_dir)
    config = load_model_config(model_dir)
    model = build_model(config)
    model.load_weights(str(model_dir))
    runner = PagedRunner(model, config, tp_size=1)
    results = run_scenario(runner, make_prompts(config.vocab_size), lambda seq, logits: int(logits.argmax()))
    hf, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        reference = {seq: hf(torch.tensor([toks])).logits[0] for seq, toks in runner.tokens.items()}
    worst = max((logits - reference[seq][pos]).abs().max().item() for seq, pos, logits in results)
    assert worst < 2e-4, f"{name} {changes}: max |logit diff| {worst}"
