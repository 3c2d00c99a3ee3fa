"""Every preset (and every scaled-RoPE variant) built and run with all model tensors on a
device other than the host default: the `meta` device, which refuses to mix with host tensors
as CUDA does, so a host/device mix-up fails here in CI rather than on the first GPU."""

import json
import os

import pytest
import torch

from kvxfer.layers import torch_ops
from kvxfer.layers.attention import AttentionMetadata, layers_of
from kvxfer.layers.moe import MoE
from kvxfer.models import build_model, load_model_config
from kvxfer.models import presets

SCALED_ROPE = {
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 1024,
    },
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024},
}
CASES = [(name, None) for name in presets.PRESETS] + [("tiny-llama-gqa2", rope) for rope in SCALED_ROPE]


def config_only(name: str, out_dir: str, rope: str | None):
    """The preset's config.json (no weights: meta tensors hold none), with `rope` swapped in."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(presets, "_write_weights", lambda *args: None)
        presets.make_model(name, out_dir)
    if rope is not None:
        path = os.path.join(out_dir, "config.json")
        with open(path) as f:
            config = json.load(f)
        config["rope_parameters"] = SCALED_ROPE[rope]
        with open(path, "w") as f:
            json.dump(config, f)
    return load_model_config(out_dir)


def check_store_devices(kv_layer, key, value, slot_mapping):
    devices = {t.device for t in (kv_layer, key, value, slot_mapping) if t is not None}
    assert len(devices) == 1, devices


@pytest.mark.parametrize("name,rope", CASES, ids=[f"{n}-{r or 'preset'}" for n, r in CASES])
def test_build_and_forward_with_every_tensor_on_another_device(tmp_path, monkeypatch, name, rope):
    config = config_only(name, str(tmp_path), rope)
    # A meta tensor has no values: MoE's one host transfer (pairs per expert) gets a fixed split,
    # and the cache write (which skips padding slots by value) only checks where its inputs live.
    monkeypatch.setattr(MoE, "_expert_counts", lambda self, ids: [ids.numel()] + [0] * (self.w13.shape[0] - 1))
    monkeypatch.setattr(torch_ops, "store_kv", check_store_devices)
    device = torch.device("meta")
    model = build_model(config, 0, 1, device, torch.bfloat16)
    assert {p.device for p in model.parameters()} | {b.device for b in model.buffers()} == {device}
    block = 4
    spec = config.kv_cache_spec(block, torch.bfloat16)
    cache = torch.empty((8, *spec.block_shape(1)), dtype=torch.bfloat16, device=device)
    # A chunked prefill of 5 tokens and a decode at position 6, in one flattened batch.
    attn = AttentionMetadata.build([5, 1], [5, 7], [[0, 1], [2, 3]], block, device)
    ids = torch.zeros(6, dtype=torch.long, device=device)
    positions = torch.tensor([0, 1, 2, 3, 4, 6], device=device)
    with torch.inference_mode():
        layers = layers_of(cache)
        hidden = model(ids, positions, layers, [attn] * len(layers))
        logits = model.compute_logits(hidden[torch.tensor([4, 5], device=device)])
    assert hidden.device == device and hidden.shape == (6, config.hidden_size)
    assert logits.device == device and logits.shape == (2, config.vocab_size)
