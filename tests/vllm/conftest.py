"""vLLM connector tests: real vLLM servers (the interpreter named by KVXFER_VLLM_PYTHON, which
can `import vllm, kvxfer`) with kvxfer's connector, behind kvxfer's proxy.

Without KVXFER_VLLM_PYTHON every test here skips (`make test` stays green on machines without
vLLM); `make test-vllm` sets it. Servers are module-scoped: a vLLM server takes tens of seconds
to start on a busy host.
"""

from __future__ import annotations

import os

import pytest

SKIP_REASON = "vLLM tests run by `make test-vllm`"


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.vllm)
            if not os.environ.get("KVXFER_VLLM_PYTHON"):
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def vllm_python() -> str:
    return os.environ["KVXFER_VLLM_PYTHON"]


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> str:
    from kvxfer.models.presets import make_model

    return make_model("tiny-qwen3", str(tmp_path_factory.mktemp("models") / "tiny-qwen3"))
