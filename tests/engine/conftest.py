"""Engine test fixtures: tiny checkpoints built once per session, HF references per preset."""

from __future__ import annotations

import pytest
from engine_helpers import HFReference, preset_available

from kvxfer.models.presets import make_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """preset name -> directory of its checkpoint, written on first use."""
    root = tmp_path_factory.mktemp("models")
    built: dict[str, str] = {}

    def get(preset: str) -> str:
        if not preset_available(preset):
            pytest.skip(f"{preset}: its model family is not implemented yet")
        if preset not in built:
            built[preset] = make_model(preset, str(root / preset))
        return built[preset]

    return get


@pytest.fixture(scope="session")
def hf_reference(model_dir):
    refs: dict[str, HFReference] = {}

    def get(preset: str) -> HFReference:
        if preset not in refs:
            refs[preset] = HFReference(model_dir(preset))
        return refs[preset]

    return get
