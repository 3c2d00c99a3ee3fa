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
import statistics
import time
from dataclasses import replace
from typing import Any

from kvxfer.bench.transfer_data import (
    Shape,
    layout,
    make_groups,
    make_spec,
    preset_shape,
    with_layer_pattern,
)
from kvxfer.bench.transfer_ranks import REPLY_TIMEOUT_S, REQUEST_START_DELAY_S, Ranks


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
