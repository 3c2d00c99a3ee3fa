"""Pure logic of the serving layer: proxy backend choice, chat rendering without a template,
the accuracy script's comparison."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from kvxfer.entrypoints.protocol import BadRequest, ChatMessage
from kvxfer.entrypoints.proxy import Backend, Pool


def pool(policy: str, loads: list[int], healthy: list[bool]) -> Pool:
    return Pool("decode", [Backend(f"http://b{i}", h, n) for i, (n, h) in enumerate(zip(loads, healthy))], policy)


def test_round_robin_cycles_over_healthy_backends():
    p = pool("round_robin", [0, 0, 0], [True, False, True])
    assert [p.pick(set()).url for _ in range(4)] == ["http://b0", "http://b2", "http://b0", "http://b2"]
    assert p.pick({"http://b0", "http://b2"}) is None


def test_least_loaded_takes_the_fewest_in_flight():
    p = pool("least_loaded", [3, 1, 0], [True, True, False])
    assert p.pick(set()).url == "http://b1"
    assert p.pick({"http://b1"}).url == "http://b0"


def test_default_chat_template_when_the_tokenizer_has_none(tiny_qwen3, tmp_path):
    from kvxfer.entrypoints.render import Renderer

    plain = tmp_path / "plain"
    shutil.copytree(tiny_qwen3, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    renderer = Renderer(str(plain))
    assert not renderer.has_chat_template
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")]
    expected = renderer.tokenizer.encode("system: Be brief.\nuser: Hi\nassistant:", add_special_tokens=False)
    assert renderer.encode_chat(messages) == expected
    with pytest.raises(BadRequest, match="only text content parts"):
        renderer.encode_chat([ChatMessage(role="user", content=[{"type": "image_url", "image_url": "x"}])])


def _accuracy_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "integration" / "accuracy_check.py"
    spec = importlib.util.spec_from_file_location("accuracy_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["accuracy_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_accuracy_compare_counts_near_ties_and_rejects_real_mismatches():
    ac = _accuracy_check()
    stats = {"bytes": 4096, "descriptors": 2, "seconds": 0.01}
    prompts = [[1, 2, 3]] * 6
    ref = [
        ac.Result([5, 6, 7], [[(5, -0.1), (9, -2.0)]] * 3),
        ac.Result([5, 6, 7], [[(5, -0.1), (9, -2.0)], [(6, -0.5), (8, -0.5004)], [(7, -0.1), (1, -3.0)]]),
        ac.Result([5, 6, 7], [[(5, -0.1), (9, -2.0)], [(6, -0.5), (8, -0.6)], [(7, -0.1), (1, -3.0)]]),
        ac.Result([5, 6, 7], [[(5, -0.1), (9, -2.0)]] * 3),
        ac.Result([5, 6, 7], [[(5, -0.1), (9, -2.0)]] * 3),
        ac.Result([5, 6, 7], [[(5, -0.1)]] * 3),
    ]
    pd = [
        ac.Result([5, 6, 7], stats=stats),  # equal
        ac.Result([5, 8, 7], stats=stats),  # differs where the gap is 4e-4: a near-tie
        ac.Result([5, 8, 7], stats=stats),  # differs where the gap is 0.1: a real mismatch
        ac.Result([5, 6, 7], stats={"bytes": 0}),  # equal but recomputed: no transfer
        RuntimeError("decode server failed"),
        ac.Result([5, 8, 7], stats=stats),  # differs where the reference gave no top-2: cannot be a tie
    ]
    report = ac.compare(prompts, pd, ref, 1e-3)
    assert report["exact"] == 2
    assert len(report["near_ties"]) == 1 and "#1" in report["near_ties"][0]
    assert len(report["mismatches"]) == 2 and "#2" in report["mismatches"][0]
    assert "#5" in report["mismatches"][1] and "no top-2" in report["mismatches"][1]
    assert len(report["no_transfer"]) == 1 and "#3" in report["no_transfer"][0]
    assert len(report["errors"]) == 1 and "#4" in report["errors"][0]


def test_accuracy_prompts_cover_the_required_shapes():
    ac = _accuracy_check()
    b = 16
    prompts = ac.build_prompts(100, b, 512, {0}, seed=0)
    lengths = [len(p) for p in prompts]
    assert len(prompts) == 100 and len({tuple(p) for p in prompts}) == 100
    assert min(lengths) == 2 and max(lengths) >= 8 * b
    assert {b, 2 * b, 3 * b, 5 * b} <= set(lengths)  # exact block multiples
    assert not any(0 in p for p in prompts)
    shared = sum(1 for p in prompts for q in prompts if p is not q and p[:b] == q[:b])
    assert shared >= 20  # groups sharing at least a block of prefix


def test_the_proxy_keeps_a_backends_504_and_4xx_and_turns_other_5xx_into_502():
    """A decode's 504 (KV failure kind "expired": the prefill's lease ran out before the pull)
    reaches the client as a 504 with the reason; a 4xx as it was; anything else 5xx is a 502."""
    import httpx

    from kvxfer.entrypoints.proxy import _upstream_error

    def answer(status: int, message: str) -> httpx.Response:
        return httpx.Response(status, json={"error": {"message": message, "code": status}})

    assert _upstream_error(answer(504, "lease ran out"), "decode") == (
        504, "decode returned 504: lease ran out", "proxy_error")
    assert _upstream_error(answer(409, "already claimed"), "decode") == (409, "already claimed",
                                                                         "invalid_request_error")
    assert _upstream_error(answer(500, "boom"), "decode")[0] == 502
