"""`kvxfer bench transfer`'s rank processes: each prefill and decode TP rank with its own
connector worker and KV pool, driven over a pipe (fill, hold, pull, verify, raw READ), and the
parent's handle on them (`Ranks`), which also owns both engines' connector scheduler sides."""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import replace
from typing import Any

import numpy as np

from kvxfer.bench.transfer_data import (
    Shape,
    expected_blocks,
    global_heads,
    make_groups,
    make_spec,
)
from kvxfer.ports import free_port

REQUEST_START_DELAY_S = 0.2  # all decode ranks start their reads together after this
REPLY_TIMEOUT_S = 300.0


def _rank_main(conn, role: str, rank: int, tp: int, shape: Shape, block_size: int, pools: tuple[int, ...], config,
               device: str) -> None:
    import torch

    from kvxfer.connectors.base import ConnectorMetadata
    from kvxfer.connectors.descriptors import read_descriptors
    from kvxfer.connectors.nixl_worker import NixlConnectorWorker
    from kvxfer.engine.rank_events import RankEvents

    spec, groups = make_spec(shape, block_size), make_groups(shape, block_size)
    heads = global_heads(shape.num_kv_heads, rank, tp)
    worker = None

    # The connector's progress thread signals finished transfers on a rank-event pipe, as in the
    # engine; collecting only then (not spinning on `get_finished`, whose lock that thread takes
    # each period) leaves it the core, so the pull is timed as the engine sees it.
    events = RankEvents()
    config = replace(config, event_fd=events.write_fd)

    def wait_for(pred, timeout: float):
        deadline = time.monotonic() + timeout
        while (result := pred(worker.get_finished())) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{role} rank {rank}: no result after {timeout}s")
            events.wait(left)
        return result

    def sync() -> None:
        """Wait for the kernels writing the pool: CUDA runs them asynchronously, and another
        process READs (or the connector overwrites) the bytes as soon as the parent hears back."""
        if device == "cuda":
            torch.cuda.synchronize()

    def poll_read(handles) -> None:
        while any(worker.agent.check_xfer_state(h) == "PROC" for h in handles):
            pass
        if any(worker.agent.check_xfer_state(h) == "ERR" for h in handles):
            raise RuntimeError("raw READ failed")

    def expected(g: int, seed: int, num_held: int):
        return expected_blocks(seed, num_held, shape.num_kv_heads, groups[g].spec.bytes_per_head_block(), heads, dev)

    try:
        dev = torch.device("cpu")
        if device == "cuda":
            dev = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(dev)
        # The pools before the agent: on CUDA this creates the context UCX must find when the
        # agent starts (it picks its CUDA transports then).
        dtype = getattr(torch, shape.dtype)
        kvs = [torch.zeros((n, *g.spec.block_shape(tp)), dtype=dtype, device=dev) for n, g in zip(pools, groups)]
        sync()
        worker = NixlConnectorWorker(config, spec, rank, tp, model_identity=f"bench:{shape}", groups=groups)
        worker.register_kv_caches(kvs)
        words = [kv.view(torch.int64).view(n, g.spec.heads_per_rank(tp), -1) for kv, n, g in zip(kvs, pools, groups)]
        conn.send(("ready", None))
        while True:
            cmd, arg = conn.recv()
            if cmd == "stop":
                break
            if cmd == "fill":  # prefill: each group's held blocks get known data, the rest garbage
                for g, (seed, held) in enumerate(arg):
                    words[g].fill_(-1)
                    words[g][held] = expected(g, seed, len(held))
                sync()
                conn.send(("ok", None))
            elif cmd == "hold":  # prefill: serve one request (the hold table's metadata) until its readers notify
                meta, req_id, timeout = arg
                worker.start_load_kv(meta)
                wait_for(lambda o: o if req_id in o.finished_sending else None, timeout)
                conn.send(("ok", None))
            elif cmd == "pull":  # decode: one request through the connector's worker path
                req, start_at = arg
                for w in words:
                    w.zero_()
                sync()  # the zeroing must land before the READs, not race them
                time.sleep(max(start_at - time.monotonic(), 0))
                t0 = time.monotonic()
                worker.start_load_kv(ConnectorMetadata(recv=[req]))
                out = wait_for(lambda o: o if o.finished_recving or o.failed_recving else None, REPLY_TIMEOUT_S)
                t1 = time.monotonic()
                if out.failed_recving:
                    raise RuntimeError(f"connector pull failed: {out.failed_recving}")
                stats = out.recv_stats[req.request_id]
                # What the descriptors of each group cover, per remote rank: the raw baseline's reads.
                slices = spec.get_tp_transfer_slices(rank, tp, req.remote_tp_size)
                regions = worker.peers[req.remote_engine_id].regions
                plan = {r: [0] * len(groups) for r in regions}
                for g, (lids, rids) in enumerate(zip(req.local_block_ids, req.remote_block_ids)):
                    remotes = {r: rg[g] for r, rg in regions.items()}
                    for r, (loc, _) in read_descriptors(slices, worker.regions[g], remotes, lids, rids).items():
                        plan[r][g] = int(loc[:, 1].sum())
                conn.send(("ok", (t0, t1, stats.bytes, stats.descriptors, plan)))
            elif cmd == "verify":  # decode: each group's read blocks exact, every other block untouched
                ok = True
                for g, (seed, num_held, positions, local_ids) in enumerate(arg):
                    others = torch.ones(pools[g], dtype=torch.bool, device=dev)
                    others[local_ids] = False
                    ok &= torch.equal(words[g][local_ids], expected(g, seed, num_held)[positions])
                    ok &= not words[g][others].any()
                conn.send(("ok", bool(ok)))
            elif cmd == "raw":  # decode: the same bytes per remote rank and group as one contiguous READ
                engine_id, plan, start_at = arg
                peer = worker.peers[engine_id]
                local_off, handles, dlists = [0] * len(groups), [], []
                time.sleep(max(start_at - time.monotonic(), 0))
                t0 = time.monotonic()
                for r, per_group in plan.items():
                    for g, nbytes in enumerate(per_group):
                        if not nbytes:
                            continue
                        region, remote_region = worker.regions[g], peer.regions[r][g]
                        local = np.array([[region.base_addr + local_off[g], nbytes, region.device_id]], np.int64)
                        remote = np.array([[remote_region.base_addr, nbytes, remote_region.device_id]], np.int64)
                        lh = worker.agent.prep_xfer_dlist("NIXL_INIT_AGENT", local, worker.mem_type)
                        rh = worker.agent.prep_xfer_dlist(peer.agents[r], remote, peer.meta.ranks[r].mem_type)
                        h = worker.agent.make_prepped_xfer("READ", lh, [0], rh, [0], b"")
                        worker.agent.transfer(h)
                        handles.append(h)
                        dlists += [lh, rh]
                        local_off[g] += nbytes
                poll_read(handles)
                t1 = time.monotonic()
                for h in handles + dlists:
                    h.release()
                conn.send(("ok", (t0, t1)))
    except Exception as e:  # report, then exit: the parent stops everything
        conn.send(("error", f"{role} rank {rank}: {type(e).__name__}: {e}"))
    finally:
        if worker is not None:
            worker.shutdown()
        events.close()


class Ranks:
    """The spawned prefill and decode rank processes, and both engines' connector scheduler sides
    (in this process); always stopped on exit."""

    def __init__(self, shape: Shape, block_size: int, pools: tuple[int, ...], p_tp: int, d_tp: int, lease: float,
                 device: str = "cpu") -> None:
        from kvxfer.connectors.config import KVTransferConfig
        from kvxfer.connectors.nixl_scheduler import NixlConnectorScheduler

        ctx = mp.get_context("spawn")
        spec, groups = make_spec(shape, block_size), make_groups(shape, block_size)
        self.prefill_config = KVTransferConfig(role="prefill", side_channel_port=free_port(), lease_seconds=lease)
        decode_config = KVTransferConfig(role="decode")
        # The prefill engine's hold table and side channel, and the decode engine's scheduler side
        # (which turns the prefill's params into the per-group reads).
        self.table = NixlConnectorScheduler(self.prefill_config, spec, p_tp, f"bench:{shape}", groups)
        self.decode_scheduler = NixlConnectorScheduler(decode_config, spec, d_tp, f"bench:{shape}", groups)
        self.procs, self.prefill, self.decode = [], [], []
        for role, tp, config, conns in (("prefill", p_tp, self.prefill_config, self.prefill),
                                        ("decode", d_tp, decode_config, self.decode)):
            for rank in range(tp):
                parent, child = ctx.Pipe()
                args = (child, role, rank, tp, shape, block_size, pools, config, device)
                proc = ctx.Process(target=_rank_main, args=args, daemon=True)
                proc.start()
                self.procs.append(proc)
                conns.append(parent)
        self.collect(self.prefill + self.decode)

    def send(self, conns, cmd: str, args) -> None:
        for conn, arg in zip(conns, args):
            conn.send((cmd, arg))

    def collect(self, conns) -> list[Any]:
        results = []
        for conn in conns:
            if not conn.poll(REPLY_TIMEOUT_S):
                raise TimeoutError("a rank process did not answer")
            status, value = conn.recv()
            if status == "error":
                raise RuntimeError(value)
            results.append(value)
        return results

    def call(self, conns, cmd: str, args) -> list[Any]:
        self.send(conns, cmd, args)
        return self.collect(conns)

    def close(self) -> None:
        for conn in self.prefill + self.decode:
            try:
                conn.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.table.shutdown()
        self.decode_scheduler.shutdown()
