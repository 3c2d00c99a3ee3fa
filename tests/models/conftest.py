"""Random-weight preset checkpoints, written once per test session."""

import pytest

from kvxfer.models.presets import make_model

TINY_PRESETS = ["tiny-qwen3", "tiny-llama-gqa2", "tiny-deepseek-mla", "tiny-deepseek-v3"]


@pytest.fixture(scope="session")
def preset_dir(tmp_path_factory):
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            made[name] = make_model(name, str(tmp_path_factory.mktemp(name)))
        return made[name]

    return get
