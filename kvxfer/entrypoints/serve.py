"""`kvxfer serve MODEL_DIR --role prefill|decode|both ...`: one engine behind the HTTP API."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import uuid
from pathlib import Path

logger = logging.getLogger("kvxfer.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="HF-format model directory (config.json, *.safetensors, tokenizer)")
    parser.add_argument("--role", choices=["prefill", "decode", "both"], default="both",
                        help="prefill: computes prompts and lends their KV; decode: pulls KV and generates; "
                             "both: either, and plain colocated serving")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (engine default when unset)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--side-channel-port", type=int, default=5600,
                        help="zmq port where decode engines fetch this engine's KV metadata "
                             "(prefill and both; a decode engine does not listen)")
    parser.add_argument("--side-channel-host", default=None,
                        help="address peers use for the side channel (default: --host, or 127.0.0.1 for 0.0.0.0)")
    parser.add_argument("--engine-id", default=None, help="unique engine id (default: random)")
    parser.add_argument("--served-model-name", default=None, help="model name in the API (default: directory name)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size (default: sized from memory)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="cuda: share of each GPU's TOTAL memory this engine may use for weights, peak "
                             "activations and KV (default 0.9; two engines on one GPU: e.g. 0.4 each)")
    parser.add_argument("--device-ids", type=_device_ids, default=None,
                        help="cuda: comma-separated GPU index per TP rank, e.g. 0,1 (default 0..tp-1); "
                             "keeps every GPU visible so instances can share KV over CUDA IPC")
    graphs = parser.add_mutually_exclusive_group()
    graphs.add_argument("--cuda-graphs", dest="enforce_eager", action="store_false", default=None,
                        help="cuda: capture decode steps in CUDA graphs (EXPERIMENTAL: opt-in until they "
                             "have run on a GPU)")
    graphs.add_argument("--enforce-eager", dest="enforce_eager", action="store_true",
                        help="run every step eagerly, no CUDA graphs (the default for now)")
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--kv-lease-seconds", type=float, default=None,
                        help="prefill: how long finished requests' blocks wait for their decode engine "
                             "(default: KVTransferConfig's)")
    parser.add_argument("--kv-failure-policy", choices=["fail", "recompute"], default="fail",
                        help="decode: what a failed KV pull does to the request")
    parser.add_argument("--kv-handshake-timeout", type=float, default=10.0,
                        help="decode: seconds to reach a prefill engine's side channel")
    parser.add_argument("--kv-transfer-timeout", type=float, default=30.0,
                        help="decode: a READ still running after this long fails (keep below the prefill lease)")
    parser.add_argument("--kv-auth-key-file", default=os.environ.get("KVXFER_KV_AUTH_KEY_FILE"),
                        help="file with a shared secret (>= 16 bytes; the same on every prefill and decode "
                             "instance) authenticating every side-channel message; env KVXFER_KV_AUTH_KEY_FILE. "
                             "Without it, keep the side channel on a private network")
    parser.add_argument("--kv-peers", default="",
                        help="decode: prefill side channels HOST:PORT,... to handshake with at start (an "
                             "incompatible peer, or a lease the transfer time-out does not fit, fails the start)")
    parser.add_argument("--kv-allowed-peers", default="",
                        help="decode: the only prefill side channels kv_transfer_params may name, HOST:PORT or "
                             "CIDR (IP literals), comma-separated; --kv-peers are allowed too (default: any)")
    parser.add_argument("--kv-connector", choices=["nixl", "none"], default="nixl",
                        help="none: plain colocated serving, no KV transfer (role must be both)")
    parser.add_argument("--log-level", default="info")


def engine_config(args: argparse.Namespace):
    """EngineConfig for the arguments; its kv_transfer_config is None without a connector."""
    from kvxfer.engine import EngineConfig

    kv_config = None
    if args.kv_connector == "none":
        if args.role != "both":
            raise SystemExit(f"error: --role {args.role} needs a KV connector (--kv-connector nixl)")
    else:
        kv_config = _kv_transfer_config(args)
    optional = {
        "dtype": args.dtype, "num_kv_blocks": args.num_kv_blocks, "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "gpu_memory_utilization": args.gpu_memory_utilization, "device_ids": args.device_ids,
        "enforce_eager": args.enforce_eager,
    }
    try:
        return EngineConfig(
            model_dir=args.model_dir, tensor_parallel_size=args.tp, device=args.device, block_size=args.block_size,
            enable_prefix_caching=not args.no_prefix_caching, kv_transfer_config=kv_config,
            **{k: v for k, v in optional.items() if v is not None},
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _device_ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU indices such as 0,1, got {text!r}") from None


def _kv_transfer_config(args: argparse.Namespace):
    from kvxfer.connectors.config import KVTransferConfig

    side_host = args.side_channel_host or ("127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host)
    auth_key = None
    if args.kv_auth_key_file:
        try:
            auth_key = Path(args.kv_auth_key_file).read_bytes().strip()
        except OSError as exc:
            raise SystemExit(f"error: --kv-auth-key-file: {exc}") from None
    optional = {"lease_seconds": args.kv_lease_seconds} if args.kv_lease_seconds is not None else {}
    try:
        return KVTransferConfig(
            connector="nixl", role=args.role, engine_id=args.engine_id or f"{args.role}-{uuid.uuid4().hex[:12]}",
            side_channel_host=side_host, side_channel_port=args.side_channel_port,
            failure_policy=args.kv_failure_policy, handshake_timeout_s=args.kv_handshake_timeout,
            transfer_timeout_s=args.kv_transfer_timeout, auth_key=auth_key,
            peers=tuple(p for p in args.kv_peers.split(",") if p),
            allowed_peers=tuple(p for p in args.kv_allowed_peers.split(",") if p), **optional,
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def build_server(args: argparse.Namespace):
    """The started AsyncEngine and the FastAPI app serving it; the caller runs the app and
    shuts the engine down. Raises SystemExit with a clear message on bad settings."""
    from kvxfer.engine import LLMEngine
    from kvxfer.engine.sampling_params import SamplingParams
    from kvxfer.entrypoints.api_server import ServerContext, build_app
    from kvxfer.entrypoints.async_engine import AsyncEngine
    from kvxfer.entrypoints.engine_probes import dead_ranks_problem, engine_stats, side_channel_problem
    from kvxfer.entrypoints.metrics import ServerMetrics
    from kvxfer.entrypoints.render import Renderer

    model_dir = os.path.abspath(args.model_dir)
    if not Path(model_dir, "config.json").is_file():
        raise SystemExit(f"error: {model_dir} is not a model directory (no config.json)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch sees no CUDA device")
    config = engine_config(args)
    renderer = Renderer(model_dir)  # fails fast on a missing tokenizer, before workers spawn

    logger.info("starting %s engine: %s tp=%d device=%s", args.role, model_dir, args.tp, args.device)
    try:
        # Built on the main thread: TP workers then die with this process even on SIGKILL.
        llm_engine = LLMEngine(config)
    except Exception as exc:
        raise SystemExit(f"error: engine failed to start: {exc}") from None
    metrics = ServerMetrics()
    engine = AsyncEngine(llm_engine, on_finished=metrics.record_finished)
    engine.start()
    ctx = ServerContext(
        engine=engine, renderer=renderer, metrics=metrics,
        model_name=args.served_model_name or Path(model_dir).name, role=args.role,
        sampling_params=SamplingParams, max_model_len=llm_engine.max_model_len,
        ranks_problem=functools.partial(dead_ranks_problem, llm_engine.worker_pids()),
        engine_stats=engine_stats,
    )
    kv = config.kv_transfer_config
    if kv is not None and kv.is_producer:  # only engines that lend KV listen on a side channel
        ctx.side_channel_problem = functools.partial(
            side_channel_problem, kv.side_channel_host, kv.side_channel_port, kv.engine_id, args.tp, 2.0, kv.auth_key
        )
    return engine, build_app(ctx)


def main(args: argparse.Namespace) -> int:
    from kvxfer.entrypoints import http_server

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine, app = build_server(args)
    try:
        http_server.run(app, args.host, args.port, args.log_level)
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="kvxfer serve", description=__doc__.splitlines()[0])
    add_arguments(cli)
    raise SystemExit(main(cli.parse_args()))
