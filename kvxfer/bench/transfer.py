"""`kvxfer bench transfer`: one request's KV pulled through the NIXL connector against a raw read.

Spawns the prefill and decode TP ranks as processes, each with its own connector worker and
KV pool. Prefill pools get known data (no model compute); every decode rank pulls one
request through the connector's worker path (handshake, slices, descriptors, READs,
notifications) and checks its pool byte for byte against an independent computation of what
it must hold. In the same run the same decode ranks read the same number of bytes from the
same prefill ranks as one contiguous region per rank pair and KV cache group: the raw NIXL
baseline.

Hybrid (sliding-window) shapes are cached in KV cache groups as the engine caches them: the
prefill side holds what `held_entries` names, the decode side's `RecvRequest` comes from the
decode scheduler's own path (`update_state_after_alloc`), and the bytes moved per group are
checked against what the specs predict (`blocks_to_read(P)` blocks of each group: the decode
side receives the whole prompt and computes the prefill's first token; the whole prompt of a full
group, about one window of a sliding group).
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
    # Per layer: its sliding window, or None for full attention; () when every layer attends fully.
    sliding_windows: tuple[int | None, ...] = ()


def preset_shape(name: str) -> Shape:
    """KV shape of a `kvxfer make-model` preset, as the engine reads the preset's HF config."""
    import tempfile

    from transformers import AutoConfig

    from kvxfer.models.config import load_model_config
    from kvxfer.models.presets import MODEL_TYPES, PRESETS

    if name not in PRESETS:
        raise SystemExit(f"unknown --shape {name!r}; known: {sorted(PRESETS)}")
    preset = PRESETS[name]
    with tempfile.TemporaryDirectory() as tmp:  # config.json only: no weights are written
        hf = AutoConfig.for_model(MODEL_TYPES[preset.architecture], architectures=[preset.architecture],
                                  **preset.config)
        hf.save_pretrained(tmp)
        mc = load_model_config(tmp)
    windows = mc.sliding_windows if any(mc.sliding_windows) else ()
    return Shape(mc.num_kv_heads, mc.head_size, mc.num_layers, str(preset.dtype).removeprefix("torch."), mc.is_mla,
                 windows)


def with_layer_pattern(shape: Shape, window: int, pattern: str) -> Shape:
    """`shape` with its layers sliding (window `window`) or full as `pattern` ("s"/"f" per layer,
    repeated over the layers; e.g. "sssssf" is Gemma 3's five local layers per global one)."""
    if shape.mla:
        raise SystemExit("--sliding-window: an MLA shape has no sliding layers")
    if window < 1 or not pattern or set(pattern) - {"s", "f"}:
        raise SystemExit(f"--sliding-window {window} --layer-pattern {pattern!r}: need a positive window and a "
                         "pattern of 's' (sliding) and 'f' (full)")
    windows = tuple(window if pattern[i % len(pattern)] == "s" else None for i in range(shape.num_layers))
    return replace(shape, sliding_windows=windows)


def make_spec(shape: Shape, block_size: int):
    """The whole model's spec (heads, dtype, block size: what the handshake compares)."""
    from kvxfer.specs import FullAttentionSpec, MLAAttentionSpec

    cls = MLAAttentionSpec if shape.mla else FullAttentionSpec
    return cls(num_kv_heads=shape.num_kv_heads, head_size=shape.head_size, num_layers=shape.num_layers,
               block_size=block_size, dtype=shape.dtype)


def make_groups(shape: Shape, block_size: int):
    """The KV cache groups the engine would cache `shape` in (`ModelConfig.kv_cache_groups`)."""
    from kvxfer.connectors.metadata import one_group
    from kvxfer.specs import group_layers

    if not shape.sliding_windows:
        return one_group(make_spec(shape, block_size))
    return group_layers(shape.sliding_windows, shape.num_kv_heads, shape.head_size, block_size, shape.dtype)


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


@dataclass(frozen=True)
class Layout:
    """One request's blocks in every group on both sides: the prefill holds `held[g]` (the
    entries `held_entries` names), the decode side's table is `tables[g]` (null block 0 before a
    sliding group's window); each group's pool has `pools[g]` blocks."""

    held: list[list[int]]
    tables: list[list[int]]
    pools: tuple[int, ...]


def layout(groups, tokens: int, seed: int) -> Layout:
    from kvxfer.connectors.metadata import held_entries
    from kvxfer.specs import SlidingWindowSpec

    entries = held_entries(groups, tokens)
    held, tables, pools = [], [], []
    for g, (group, entry) in enumerate(zip(groups, entries)):
        k = len(entry)
        sliding = isinstance(group.spec, SlidingWindowSpec)
        pool = k + k // 4 + 1 + sliding  # room to fragment; block 0 of a sliding pool is its null block
        ids = [[sliding + b for b in fragmented_ids(k, pool - sliding, seed + 10 * g + side)] for side in (1, 2)]
        held.append(ids[0])
        tables.append([0] * entry.start + ids[1])
        pools.append(pool)
    return Layout(held, tables, tuple(pools))


def run(shape: Shape, tokens: int, p_tp: int, d_tp: int, block_size: int = 16, iterations: int = 5,
        seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    from kvxfer.connectors.base import KVConnectorOutput
    from kvxfer.connectors.metadata import describe_groups
    from kvxfer.engine.request import Request
    from kvxfer.engine.sampling_params import SamplingParams

    spec, groups = make_spec(shape, block_size), make_groups(shape, block_size)
    spec.validate_tp(p_tp)
    spec.validate_tp(d_tp)
    lay = layout(groups, tokens, seed)
    # What the specs predict: each group's blocks holding what position P (the prefill's first
    # token, computed on the decode side) attends to, read in full by every decode rank's heads.
    reads = [g.spec.blocks_to_read(tokens) for g in groups]
    predicted = [len(r) * g.spec.bytes_per_block(d_tp) * d_tp for r, g in zip(reads, groups)]
    # What the one-tensor layout (all layers in one cache) moved: every layer's whole prompt.
    prompt_blocks = -(-tokens // block_size)
    one_tensor = prompt_blocks * spec.bytes_per_block(d_tp) * d_tp
    ranks = Ranks(shape, block_size, lay.pools, p_tp, d_tp, lease=REPLY_TIMEOUT_S, device=device)
    cfg = ranks.prefill_config
    try:
        connector, seconds, raw = [], [], []
        result: dict[str, Any] = {}

        def pull(it: int) -> float:
            data_seeds = [(seed * 1000 + it) * 16 + g for g in range(len(groups))]
            ranks.call(ranks.prefill, "fill", [list(zip(data_seeds, lay.held))] * p_tp)
            req_id = f"bench-{it}"
            params = ranks.table.hold(req_id, [b for held in lay.held for b in held], tokens, first_token_id=0)
            meta = ranks.table.build_connector_meta(None)
            request = Request(req_id, list(range(tokens)), SamplingParams(max_tokens=1), params)
            sched = ranks.decode_scheduler
            sched.check_new_request(request)
            received = sched.get_num_new_matched_tokens(request, 0)
            sched.update_state_after_alloc(request, lay.tables, 0, received)
            (req,) = sched.build_connector_meta(None).recv
            for g, r in enumerate(reads):  # the scheduler reads exactly the predicted entries
                if req.local_block_ids[g] != lay.tables[g][r.start : r.stop]:
                    raise RuntimeError(f"group {g}: the decode scheduler reads entries other than {r}")
            ranks.send(ranks.prefill, "hold", [(meta, req_id, REPLY_TIMEOUT_S)] * p_tp)
            start_at = time.monotonic() + REQUEST_START_DELAY_S
            pulls = ranks.call(ranks.decode, "pull", [(req, start_at)] * d_tp)
            ranks.collect(ranks.prefill)
            ranks.table.update_connector_output(KVConnectorOutput(finished_sending={req_id}))
            position = [{b: i for i, b in enumerate(held)} for held in lay.held]
            check = [(s, len(held), [pos[b] for b in rids], lids) for s, held, pos, lids, rids in
                     zip(data_seeds, lay.held, position, req.local_block_ids, req.remote_block_ids)]
            if not all(ranks.call(ranks.decode, "verify", [check] * d_tp)):
                raise RuntimeError("decode pools differ from the prefill data")
            nbytes = sum(p[2] for p in pulls)
            per_group = [sum(sum(p[4][r][g] for r in p[4]) for p in pulls) for g in range(len(groups))]
            if nbytes != sum(per_group) or per_group != predicted:
                raise RuntimeError(f"moved {nbytes} bytes ({per_group} per group), the specs predict {predicted}")
            result.update(bytes=nbytes, descriptors=sum(p[3] for p in pulls), plans=[p[4] for p in pulls])
            elapsed = max(p[1] for p in pulls) - min(p[0] for p in pulls)
            seconds.append(elapsed)
            return nbytes / elapsed / 1e9

        def read_raw() -> float:
            start_at = time.monotonic() + REQUEST_START_DELAY_S
            raws = ranks.call(ranks.decode, "raw", [(cfg.engine_id, plan, start_at) for plan in result["plans"]])
            return result["bytes"] / (max(r[1] for r in raws) - min(r[0] for r in raws)) / 1e9

        pull(0)  # warm-up: handshake, first-touch pages, connection set-up
        read_raw()
        seconds.clear()
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
        "blocks": prompt_blocks, "bytes": result["bytes"], "predicted_bytes": sum(predicted),
        "one_tensor_bytes": one_tensor, "descriptors": result["descriptors"], "iterations": iterations,
        "groups": [{"group": name, "blocks": len(r), "bytes": b} for name, r, b in
                   zip(describe_groups(groups), reads, predicted)],
        "connector_seconds": round(statistics.median(seconds), 6),
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
    parser.add_argument("--sliding-window", type=int, default=None,
                        help="make the shape hybrid: layers marked 's' in --layer-pattern slide this window")
    parser.add_argument("--layer-pattern", default="s",
                        help="with --sliding-window: 's' (sliding) / 'f' (full) per layer, repeated over the layers "
                        "(default: every layer slides; 'sssssf': Gemma 3's 5 local per global layer)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the KV pools live (cuda: VRAM, rank r on GPU r mod count)")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    shape = preset_shape(args.shape)
    if args.num_layers is not None:
        if shape.sliding_windows and args.sliding_window is None:
            raise SystemExit(f"--num-layers: {args.shape} has one window per layer; give --sliding-window and "
                             "--layer-pattern with it")
        shape = replace(shape, num_layers=args.num_layers, sliding_windows=())
    if args.sliding_window is not None:
        shape = with_layer_pattern(shape, args.sliding_window, args.layer_pattern)
    if args.dtype is not None:
        shape = replace(shape, dtype=args.dtype)
    if args.tokens < 2 or args.iterations < 1:
        raise SystemExit("--tokens must be at least 2 (the decode side computes the last prompt token), "
                         "--iterations positive")
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
    for g in result["groups"]:
        print(f"  group {g['group']}: {g['blocks']} blocks, {g['bytes']} bytes (as the spec predicts)")
    print(f"{'bytes':>12} {'one-tensor':>12} {'descriptors':>11} {'seconds':>9} {'connector GB/s':>14} "
          f"{'raw GB/s':>9} {'ratio':>6}")
    print(f"{result['bytes']:>12} {result['one_tensor_bytes']:>12} {result['descriptors']:>11} "
          f"{result['connector_seconds']:>9.4f} {result['connector_gbps']:>14.2f} {result['raw_gbps']:>9.2f} "
          f"{result['ratio']:>6.3f}")
    return 0
