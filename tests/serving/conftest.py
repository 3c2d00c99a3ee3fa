"""Serving test fixtures: real `kvxfer serve` and proxy processes on loopback ports.

Servers are module-scoped (start-up costs seconds) and always stopped in `finally`; a server
a test kills on purpose is that test's own.
"""

from __future__ import annotations

import pytest
from serving_helpers import Cluster


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> str:
    from kvxfer.models.presets import make_model

    return make_model("tiny-qwen3", str(tmp_path_factory.mktemp("models") / "tiny-qwen3"))


@pytest.fixture(scope="module")
def cluster(tiny_qwen3, tmp_path_factory):
    c = Cluster(tiny_qwen3, tmp_path_factory.mktemp("logs"))
    try:
        yield c
    finally:
        c.stop()
