"""Finding 8, the decode load state machine alone: a READ whose cancel NIXL refuses (its abort
still running) keeps the load in flight, its blocks neither reported nor reusable, until NIXL
says the handle ended. NIXL cannot be made to refuse a release on demand, so the agent and
handle here are stand-ins; the transfers themselves are tested over NIXL in test_worker_pull."""

import time
from concurrent.futures import ThreadPoolExecutor

from kvxfer.connectors.base import KVConnectorOutput, RecvRequest
from kvxfer.connectors.config import KVTransferConfig
from kvxfer.connectors.metadata import compat_of
from kvxfer.connectors.nixl_loads import LoadTracker, _Load
from kvxfer.specs import FullAttentionSpec

SPEC = FullAttentionSpec(num_kv_heads=2, head_size=8, num_layers=2, block_size=4, dtype="float32")


class StuckRead:
    """A READ in flight whose release raises until its abort has finished."""

    def __init__(self) -> None:
        self.state, self.abort_done, self.released = "PROC", False, False

    def release(self) -> None:
        if not self.abort_done:
            raise RuntimeError("NIXL_IN_PROG: abort still running")
        self.released = True


class Agent:
    def check_xfer_state(self, handle) -> str:
        return handle.state


def test_a_read_that_cannot_be_cancelled_stays_in_flight_until_nixl_ends_it():
    config = KVTransferConfig(role="decode", transfer_timeout_s=1.0)
    pool = ThreadPoolExecutor(1)
    loads = LoadTracker(Agent(), config, SPEC, 0, 1, compat_of(SPEC, "m"), pool, {"failures": 0})
    req = RecvRequest("r", "r", "peer", "inst", "127.0.0.1", 1, 1, "t" * 32, [3], [[0]], [[3]])
    read = StuckRead()
    load = _Load(req, "peer", time.perf_counter(), deadline=time.perf_counter() - 1, handles=[read])
    loads._loads["r"] = load
    try:
        out = KVConnectorOutput()
        loads.poll(out)  # past its deadline: cancelled, but NIXL refuses the release
        assert not out.failed_recving and not out.finished_recving and loads.busy()
        read.abort_done, read.state = True, "ERR"  # NIXL finished the abort
        loads.poll(out := KVConnectorOutput())
        assert "KV READ not done" in out.failed_recving["r"] and out.failure_kinds["r"] == "peer"
        assert read.released and not loads.busy()
    finally:
        pool.shutdown()
