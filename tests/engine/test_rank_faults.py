"""A failing TP rank (real rank processes over gloo, real NIXL connector): a failed step does
not lose the other ranks' transfer reports, and a rank whose KV connector is broken stops the
engine with a clear EngineDeadError instead of failing every later step.

Faults are injected into the spawned rank only, by tests/engine/rank_faults/sitecustomize.py
(test-only, put on the ranks' PYTHONPATH here)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from engine_helpers import prompts_of

from kvxfer import LLM, KVTransferConfig, SamplingParams
from kvxfer.engine.executor import EngineDeadError
from kvxfer.ports import free_port

PRESET = "tiny-qwen3"
GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
HOOKS = Path(__file__).parent / "rank_faults"


def _prefill_tp2(model: str, monkeypatch, fault: str) -> LLM:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("KVXFER_TEST_RANK_FAULT", fault)
    monkeypatch.setenv("KVXFER_TEST_DEAD_PORT", str(free_port()))
    for attempt in range(3):  # a probed free port may be taken by another process before we bind it
        config = KVTransferConfig(role="prefill", side_channel_port=free_port(), lease_seconds=120.0)
        try:
            return LLM(model, tensor_parallel_size=2, block_size=8, num_kv_blocks=32, kv_transfer_config=config)
        except Exception as e:
            if "cannot bind the KV side channel" not in str(e) or attempt == 2:
                raise


def _wait_exited(pids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split(")")[-1][:3]
                   for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_a_rank_whose_registration_failed_stops_the_engine_once_and_clearly(model_dir, monkeypatch):
    llm = _prefill_tp2(model_dir(PRESET), monkeypatch, "register-unreachable")
    engine, pids = llm.engine, llm.engine.worker_pids()
    try:
        (prompt,) = prompts_of((12,), offset=41)
        engine.add_request("r", prompt, GREEDY, {"do_remote_decode": True})
        deadline = time.monotonic() + 60
        with pytest.raises(EngineDeadError) as dead:
            while time.monotonic() < deadline:  # the registration gives up after 1 s
                engine.step()
        message = str(dead.value)
        assert "rank 1" in message and "KV connector failed: HandshakeError" in message
        assert engine.dead == message
        # Dead for good, with the same reason, and nothing else is taken.
        for call in (engine.step, lambda: engine.add_request("s", prompt, GREEDY),
                     lambda: engine.collective_rpc("kv_pool_info")):
            with pytest.raises(EngineDeadError, match="KV connector failed"):
                call()
    finally:
        llm.shutdown()
    assert _wait_exited(pids)


def test_a_failed_step_keeps_the_reports_of_the_ranks_that_finished_it(model_dir, monkeypatch):
    llm = _prefill_tp2(model_dir(PRESET), monkeypatch, "model-error-on-release")
    engine = llm.engine
    try:
        held, victim, after = prompts_of((20, 9, 11), offset=42)
        (out,) = llm.generate([held], GREEDY, kv_transfer_params={"do_remote_decode": True})
        engine.step()  # the ranks now hold it under its 120 s lease
        assert engine.stats()["connector"]["held_requests"] == 1
        engine.add_request("victim", victim, GREEDY)
        assert engine.abort_request(out.request_id, out.kv_transfer_params["transfer_token"]) == "released"
        # This step carries the release and the victim's prefill; rank 1 fails it after the
        # model ran, rank 0 reports the release.
        outputs = {o.request_id: o for o in engine.step()}
        assert "injected model failure" in outputs["victim"].error and "rank 1" in outputs["victim"].error
        deadline = time.monotonic() + 30  # rank 1 reports its release with its next step
        while engine.stats()["num_pending_free"] and time.monotonic() < deadline:
            engine.step()
        stats = engine.stats()
        assert stats["num_pending_free"] == 0 and stats["connector"]["held_requests"] == 0
        assert stats["connector"]["released"] == 1 and stats["connector"]["expired_leases"] == 0
        assert stats["num_free_blocks"] == stats["num_blocks"]
        (ok,) = llm.generate([after], GREEDY)  # the engine goes on
        assert ok.error is None and len(ok.output_token_ids) == 3
    finally:
        llm.shutdown()
