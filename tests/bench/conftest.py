"""Fixtures of the bench tests: a real colocated server and a real P/D pair behind the proxy
(tiny-qwen3, loopback), started once per module and always stopped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serving"))  # the serving tests' Cluster
from serving_helpers import Cluster  # noqa: E402


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """{"colocated": url, "pd": proxy url}."""
    from kvxfer.models.presets import make_model

    model = make_model("tiny-qwen3", str(tmp_path_factory.mktemp("models") / "tiny-qwen3"))
    c = Cluster(model, tmp_path_factory.mktemp("logs"))
    try:
        colocated = c.server("colocated", "both", 1, "--kv-connector", "none")
        prefill = c.server("prefill", "prefill")
        decode = c.server("decode", "decode")
        proxy = c.proxy([prefill], [decode])
        c.wait_healthy()
        yield {"colocated": colocated.url, "pd": proxy.url}
    finally:
        c.stop()
