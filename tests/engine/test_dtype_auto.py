"""dtype "auto": what a checkpoint runs in on CPUs with and without native bfloat16."""

import pytest

from kvxfer.engine import config as config_module
from kvxfer.engine.config import EngineConfig, resolve_dtype


@pytest.mark.parametrize(
    "features,checkpoint,expected",
    [
        (("avx512_bf16",), "bfloat16", "bfloat16"),
        (("amx_bf16", "avx512_bf16"), "float16", "bfloat16"),
        ((), "bfloat16", "float32"),
        (("amx_bf16",), "float32", "float32"),
        (("amx_bf16",), None, "float32"),
    ],
)
def test_auto_on_cpu_follows_the_checkpoint_and_the_cpu(monkeypatch, features, checkpoint, expected):
    monkeypatch.setattr(config_module, "cpu_bf16_features", lambda: features)
    assert resolve_dtype("auto", "cpu", checkpoint) == expected


def test_explicit_dtypes_and_cuda_are_not_resolved_from_the_cpu(monkeypatch):
    monkeypatch.setattr(config_module, "cpu_bf16_features", lambda: ())
    assert resolve_dtype("bfloat16", "cpu", "float32") == "bfloat16"
    assert resolve_dtype("auto", "cuda", "float32") == "bfloat16"


def test_engine_config_reads_the_checkpoint_dtype(tmp_path, monkeypatch):
    from kvxfer.models.presets import make_model

    monkeypatch.setattr(config_module, "cpu_bf16_features", lambda: ("avx512_bf16",))
    path = make_model("tiny-qwen3", str(tmp_path))  # a float32 checkpoint
    assert EngineConfig(path).torch_dtype_name == "float32"
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(path, dtype="fp8")
