"""`kvxfer bench transfer`: one request's KV pulled through the NIXL connector against a raw read.

Spawns the prefill and decode TP ranks as processes, each with its own connector worker and
KV pool. Prefill pools get known data (no model compute); every decode rank pulls one
request through the connector's worker path (handshake, slices, descriptors, READs,
notifications) and checks its pool byte for byte against an independent computation of what
it must hold. In the same run the same decode ranks read the same number of bytes from the
same prefill ranks as one contiguous region per rank pair: the raw NIXL baseline.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from kvxfer.ports import free_port

REQUEST_START_DELAY_S = 0.2  # all decode ranks start their reads together after this
REPLY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Shape:
    num_kv_heads: int
    head_size: int
    num_layers: int
    dtype: str
    mla: bool = False


def preset_shape(name: str) -> Shape:
    """KV shape of a `kvxfer make-model` preset, read from its model config."""
    from kvxfer.models.presets import PRESETS

    if name not in PRESETS:
        raise SystemExit(f"unknown --shape {name!r}; known: {sorted(PRESETS)}")
    preset = PRESETS[name]
    c = preset.config
    dtype = str(preset.dtype).removeprefix("torch.")
    if "kv_lora_rank" in c:  # MLA: one latent [kv_lora_rank | rope] per token
        return Shape(1, c["kv_lora_rank"] + c["qk_rope_head_dim"], c["num_hidden_layers"], dtype, mla=True)
    head_size = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return Shape(c.get("num_key_value_heads") or c["num_attention_heads"], head_size, c["num_hidden_layers"], dtype)


def make_spec(shape: Shape, block_size: int):
    from kvxfer.specs import FullAttentionSpec, MLAAttentionSpec

    cls = MLAAttentionSpec if shape.mla else FullAttentionSpec
    return cls(num_kv_heads=shape.num_kv_heads, head_size=shape.head_size, num_layers=shape.num_layers,
               block_size=block_size, dtype=shape.dtype)


# --- known data, computed independently of the connector ----------------------------------------


def global_heads(num_heads: int, rank: int, tp: int) -> range:
    """Global KV heads in rank `rank`'s tensor: a split of H, or one replicated head when tp > H."""
    if tp <= num_heads:
        per = num_heads // tp
        return range(rank * per, (rank + 1) * per)
    head = rank // (tp // num_heads)
    return range(head, head + 1)


def request_data(seed: int, num_blocks: int, num_heads: int, head_bytes: int):
    """(base[block, head], pattern[words]): head h of request block i holds base[i, h] + pattern."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(-(2**62), 2**62, (num_blocks, num_heads), generator=gen, dtype=torch.int64)
    pattern = torch.randint(-(2**62), 2**62, (head_bytes // 8,), generator=gen, dtype=torch.int64)
    return base, pattern


def expected_blocks(seed: int, n_blocks: int, num_heads: int, head_bytes: int, heads: range, device="cpu"):
    """Drawn on the host (deterministic), expanded on `device` (GBs at 32k tokens)."""
    base, pattern = request_data(seed, n_blocks, num_heads, head_bytes)
    return base[:, heads.start : heads.stop, None].to(device) + pattern.to(device)


def fragmented_ids(n: int, pool: int, seed: int) -> list[int]:
    """`n` distinct block ids out of `pool`, in shuffled runs of 1..32 as a busy allocator leaves them."""
    rng = np.random.default_rng(seed)
    runs, start = [], 0
    while start < pool:
        length = int(rng.integers(1, 33))
        runs.append(range(start, min(start + length, pool)))
        start += length
    rng.shuffle(runs)
    return [b for run in runs for b in run][:n]


# --- rank processes -----------------------------------------------------------------------------


def _rank_main(conn, role: str, rank: int, tp: int, shape: Shape, block_size: int, num_blocks: int, config,
               device: str) -> None:
    import torch

    from kvxfer.connectors.base import ConnectorMetadata
    from kvxfer.connectors.nixl_worker import NixlConnectorWorker

    spec = make_spec(shape, block_size)
    heads = global_heads(shape.num_kv_heads, rank, tp)
    head_bytes = spec.bytes_per_head_block()
    worker = None

    def wait_for(pred, timeout: float, sleep: float = 0.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = worker.get_finished()
            if (result := pred(out)) is not None:
                return result
            if sleep:
                time.sleep(sleep)
        raise TimeoutError(f"{role} rank {rank}: no result after {timeout}s")

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

    try:
        dev = torch.device("cpu")
        if device == "cuda":
            dev = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(dev)
        # The pool before the agent: on CUDA this creates the context UCX must find when the
        # agent starts (it picks its CUDA transports then).
        kv = torch.zeros((num_blocks, *spec.block_shape(tp)), dtype=getattr(torch, shape.dtype), device=dev)
        sync()
        worker = NixlConnectorWorker(config, spec, rank, tp, model_identity=f"bench:{shape}")
        worker.register_kv_caches([kv])
        words = kv.view(torch.int64).view(num_blocks, spec.heads_per_rank(tp), -1)
        conn.send(("ready", None))
        while True:
            cmd, arg = conn.recv()
            if cmd == "stop":
                break
            if cmd == "fill":  # prefill: request blocks get known data, the rest garbage
                seed, ids = arg
                words.fill_(-1)
                words[ids] = expected_blocks(seed, len(ids), shape.num_kv_heads, head_bytes, heads, dev)
                sync()
                conn.send(("ok", None))
            elif cmd == "hold":  # prefill: serve one request (the hold table's metadata) until its readers notify
                meta, req_id, timeout = arg
                worker.start_load_kv(meta)
                wait_for(lambda o: o if req_id in o.finished_sending else None, timeout, sleep=0.001)
                conn.send(("ok", None))
            elif cmd == "pull":  # decode: one request through the connector's worker path
                req, start_at = arg
                words.zero_()
                sync()  # the zeroing must land before the READs, not race them
                time.sleep(max(start_at - time.monotonic(), 0))
                t0 = time.monotonic()
                worker.start_load_kv(ConnectorMetadata(recv=[req]))
                out = wait_for(lambda o: o if o.finished_recving or o.failed_recving else None, REPLY_TIMEOUT_S)
                t1 = time.monotonic()
                if out.failed_recving:
                    raise RuntimeError(f"connector pull failed: {out.failed_recving}")
                stats = out.recv_stats[req.request_id]
                conn.send(("ok", (t0, t1, stats.bytes, stats.descriptors)))
            elif cmd == "verify":  # decode: request blocks exact, every other block untouched
                seed, ids = arg
                expected = expected_blocks(seed, len(ids), shape.num_kv_heads, head_bytes, heads, dev)
                others = torch.ones(num_blocks, dtype=torch.bool, device=dev)
                others[ids] = False
                ok = torch.equal(words[ids], expected) and not words[others].any()
                conn.send(("ok", bool(ok)))
            elif cmd == "raw":  # decode: the same bytes per remote rank as one contiguous READ
                engine_id, per_rank_bytes, start_at = arg
                peer = worker.peers[engine_id]
                local_off, handles, dlists = 0, [], []
                time.sleep(max(start_at - time.monotonic(), 0))
                t0 = time.monotonic()
                for r, nbytes in per_rank_bytes.items():
                    region, remote_region = worker.regions[0], peer.regions[r][0]  # one KV cache group
                    local = np.array([[region.base_addr + local_off, nbytes, region.device_id]], np.int64)
                    remote = np.array([[remote_region.base_addr, nbytes, remote_region.device_id]], np.int64)
                    lh = worker.agent.prep_xfer_dlist("NIXL_INIT_AGENT", local, worker.mem_type)
                    rh = worker.agent.prep_xfer_dlist(peer.agents[r], remote, peer.meta.ranks[r].mem_type)
                    h = worker.agent.make_prepped_xfer("READ", lh, [0], rh, [0], b"")
                    worker.agent.transfer(h)
                    handles.append(h)
                    dlists += [lh, rh]
                    local_off += nbytes
                poll_read(handles)
                t1 = time.monotonic()
                for h in handles + dlists:
                    h.release()
                conn.send(("ok", (t0, t1)))
            elif cmd == "plan":  # decode: bytes the connector reads from each prefill rank
                engine_id, p_tp, n = arg
                from kvxfer.connectors.descriptors import read_descriptors

                slices = spec.get_tp_transfer_slices(rank, tp, p_tp)
                ids = list(range(n))
                remotes = {r: regions[0] for r, regions in worker.peers[engine_id].regions.items()}
                plan = read_descriptors(slices, worker.regions[0], remotes, ids, ids)
                conn.send(("ok", {r: int(loc[:, 1].sum()) for r, (loc, _) in plan.items()}))
    except Exception as e:  # report, then exit: the parent stops everything
        conn.send(("error", f"{role} rank {rank}: {type(e).__name__}: {e}"))
    finally:
        if worker is not None:
            worker.shutdown()


class Ranks:
    """The spawned prefill and decode rank processes; always stopped on exit."""

    def __init__(self, shape: Shape, block_size: int, num_blocks: int, p_tp: int, d_tp: int, lease: float,
                 device: str = "cpu") -> None:
        from kvxfer.connectors.config import KVTransferConfig
        from kvxfer.connectors.nixl_scheduler import NixlConnectorScheduler

        ctx = mp.get_context("spawn")
        self.prefill_config = KVTransferConfig(role="prefill", side_channel_port=free_port(), lease_seconds=lease)
        decode_config = KVTransferConfig(role="decode")
        # The prefill engine's scheduler side: its hold table and side channel, in this process.
        self.table = NixlConnectorScheduler(self.prefill_config, make_spec(shape, block_size), p_tp, f"bench:{shape}")
        self.procs, self.prefill, self.decode = [], [], []
        for role, tp, config, conns in (("prefill", p_tp, self.prefill_config, self.prefill),
                                        ("decode", d_tp, decode_config, self.decode)):
            for rank in range(tp):
                parent, child = ctx.Pipe()
                args = (child, role, rank, tp, shape, block_size, num_blocks, config, device)
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


def run(shape: Shape, tokens: int, p_tp: int, d_tp: int, block_size: int = 16, iterations: int = 5,
        seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    from kvxfer.connectors.base import KVConnectorOutput, RecvRequest

    spec = make_spec(shape, block_size)
    spec.validate_tp(p_tp)
    spec.validate_tp(d_tp)
    n = -(-tokens // block_size)
    pool = n + n // 4 + 1
    prefill_ids = fragmented_ids(n, pool, seed + 1)
    decode_ids = fragmented_ids(n, pool, seed + 2)
    ranks = Ranks(shape, block_size, pool, p_tp, d_tp, lease=REPLY_TIMEOUT_S, device=device)
    cfg = ranks.prefill_config
    try:
        connector, raw, descriptors, nbytes, per_rank = [], [], 0, 0, None

        def pull(it: int) -> float:
            nonlocal descriptors, nbytes, per_rank
            data_seed = seed * 1000 + it
            ranks.call(ranks.prefill, "fill", [(data_seed, prefill_ids)] * p_tp)
            req_id = f"bench-{it}"
            params = ranks.table.hold(req_id, prefill_ids, n * block_size)
            req = RecvRequest(req_id, req_id, cfg.engine_id, cfg.instance_id, cfg.side_channel_host,
                              cfg.side_channel_port, p_tp, params.transfer_token, prefill_ids, [decode_ids],
                              [prefill_ids])  # one KV cache group
            meta = ranks.table.build_connector_meta(None)
            ranks.send(ranks.prefill, "hold", [(meta, req_id, REPLY_TIMEOUT_S)] * p_tp)
            start_at = time.monotonic() + REQUEST_START_DELAY_S
            pulls = ranks.call(ranks.decode, "pull", [(req, start_at)] * d_tp)
            ranks.collect(ranks.prefill)
            ranks.table.update_connector_output(KVConnectorOutput(finished_sending={req_id}))
            if not all(ranks.call(ranks.decode, "verify", [(data_seed, decode_ids)] * d_tp)):
                raise RuntimeError("decode pools differ from the prefill data")
            nbytes, descriptors = sum(p[2] for p in pulls), sum(p[3] for p in pulls)
            if per_rank is None:  # after the first pull: the handshake is done
                per_rank = ranks.call(ranks.decode, "plan", [(cfg.engine_id, p_tp, n)] * d_tp)
                if nbytes != sum(sum(b.values()) for b in per_rank):
                    raise RuntimeError("the raw baseline would not move the connector's bytes")
            return nbytes / (max(p[1] for p in pulls) - min(p[0] for p in pulls)) / 1e9

        def read_raw() -> float:
            start_at = time.monotonic() + REQUEST_START_DELAY_S
            raws = ranks.call(ranks.decode, "raw", [(cfg.engine_id, b, start_at) for b in per_rank])
            return nbytes / (max(r[1] for r in raws) - min(r[0] for r in raws)) / 1e9

        pull(0)  # warm-up: handshake, first-touch pages, connection set-up
        read_raw()
        for it in range(1, iterations + 1):  # alternate the order so neither side gets a warmer cache
            if it % 2:
                connector.append(pull(it))
                raw.append(read_raw())
            else:
                raw.append(read_raw())
                connector.append(pull(it))
    finally:
        ranks.close()
    connector_gbps, raw_gbps = statistics.median(connector), statistics.median(raw)
    return {
        "shape": shape.__dict__, "tokens": tokens, "block_size": block_size, "prefill_tp": p_tp, "decode_tp": d_tp,
        "blocks": n, "bytes": nbytes, "descriptors": descriptors, "iterations": iterations,
        "connector_gbps": round(connector_gbps, 3), "raw_gbps": round(raw_gbps, 3),
        "ratio": round(connector_gbps / raw_gbps, 3), "verified": True,
        "connector_runs": [round(x, 3) for x in connector], "raw_runs": [round(x, 3) for x in raw],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", required=True, help="model preset whose KV shape to use, e.g. qwen3-0.6b-shape")
    parser.add_argument("--tokens", type=int, default=4096, help="prompt tokens of the request pulled")
    parser.add_argument("--prefill-tp", type=int, default=1)
    parser.add_argument("--decode-tp", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--dtype", default=None, help="override the KV dtype, e.g. float32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the KV pools live (cuda: VRAM, rank r on GPU r mod count)")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    shape = preset_shape(args.shape)
    if args.num_layers is not None:
        shape = replace(shape, num_layers=args.num_layers)
    if args.dtype is not None:
        shape = replace(shape, dtype=args.dtype)
    if args.tokens < 1 or args.iterations < 1:
        raise SystemExit("--tokens and --iterations must be positive")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no GPU visible (torch.cuda.is_available() is false)")
    result = run(shape, args.tokens, args.prefill_tp, args.decode_tp, args.block_size, args.iterations, args.seed,
                 args.device)
    result["device"] = args.device
    result["preset"] = args.shape
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.shape}: {shape.num_layers} layers x {shape.num_kv_heads} kv heads x {shape.head_size} "
          f"({shape.dtype}), "
          f"{args.tokens} tokens, prefill TP {args.prefill_tp} -> decode TP {args.decode_tp}; bytes verified")
    print(f"{'bytes':>12} {'descriptors':>11} {'connector GB/s':>14} {'raw GB/s':>9} {'ratio':>6}")
    print(f"{result['bytes']:>12} {result['descriptors']:>11} {result['connector_gbps']:>14.2f} "
          f"{result['raw_gbps']:>9.2f} {result['ratio']:>6.3f}")
    return 0
