"""Shared fixtures for the connector tests: free ports and tiny checkpoints built once."""

import pytest

from kvxfer.models.presets import make_model
from kvxfer.ports import free_port


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """preset name -> directory of its random-weight checkpoint, written on first use."""
    root = tmp_path_factory.mktemp("connector-models")
    built: dict[str, str] = {}

    def get(preset: str) -> str:
        if preset not in built:
            built[preset] = make_model(preset, str(root / preset))
        return built[preset]

    return get
