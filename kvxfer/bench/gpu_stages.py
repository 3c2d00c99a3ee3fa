"""The measuring stages of `make gpu-check` (see kvxfer/bench/gpu_check.py), one subcommand each;
every result is one JSON line on stdout.

- `env`: versions, the GPU, UCX transport modules NIXL ships, and a NIXL agent created (and VRAM
  registered) after CUDA is initialised, the order the engine uses.
- `kernels`: HBM copy bandwidth, paged decode attention's read bandwidth against it, and causal
  prefill attention TFLOP/s, at Qwen3-0.6B attention shapes.
- `parity`: kvxfer greedy vs HF transformers greedy in the same dtype on the same device; a
  token difference passes only where HF's top-1/top-2 log-prob gap there is below `--tie`.
- `decode`: engine decode step time against the memory-bandwidth floor ((weights + KV bytes
  read per step) / measured copy bandwidth), eager and with CUDA graphs.

`--device cpu` (with `--quick`) runs the same code on the host, for a smoke test.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import time
from collections.abc import Callable

import torch


def _emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _time_s(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 2) -> float:
    """Median seconds of `fn()` (CUDA events on the GPU, wall clock on the host)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device memory bandwidth in bytes/s from a large copy (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = _time_s(lambda: dst.copy_(src), device, iters=10)
    return 2 * nbytes / seconds


# --- env ------------------------------------------------------------------------------------


def stage_env(args: argparse.Namespace) -> int:
    import importlib.metadata as md
    import platform

    versions = {}
    for pkg in ("torch", "triton", "transformers", "nixl", "nixl-cu13", "nixl-cu12", "msgspec", "pyzmq", "fastapi",
                "uvicorn", "httpx", "pytest", "pytest-timeout"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    info = {"python": platform.python_version(), "torch_cuda": torch.version.cuda, "versions": versions}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
    _emit(stage="env", **info)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # CUDA first (context created, memory allocated), then NIXL: UCX picks transports at agent start.
    buf = torch.zeros(1 << 20, dtype=torch.uint8, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    import nixl
    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent("gpu-check-probe", nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    descs = agent.register_memory(buf)
    agent.deregister_memory(descs)
    libs = os.path.dirname(os.path.dirname(nixl.__file__))
    modules = sorted({os.path.basename(p).split(".so")[0] for p in glob.glob(os.path.join(libs, "nixl*.libs", "ucx", "*.so*"))})
    _emit(stage="env", nixl_after_cuda="ok", registered=str(device), ucx_modules=modules,
          ucx_env={k: v for k, v in os.environ.items() if k.startswith("UCX_")})
    return 0


# --- kernels --------------------------------------------------------------------------------


def stage_kernels(args: argparse.Namespace) -> int:
    from kvxfer.layers import attention
    from kvxfer.layers.attention import AttentionMetadata

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    hq, hkv, d, bs = 16, 8, 128, 16  # Qwen3-0.6B attention, one layer
    batch, context = (2, 64) if args.quick else (64, 4096)
    iters = 2 if args.quick else 20
    bw = copy_bandwidth(device, (16 if args.quick else 2048) << 20)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:  # drawn where it lives: GiBs are slow to draw on the host
        return torch.randn(shape, device=device, dtype=dtype)

    def cache_for(tokens: int) -> tuple[torch.Tensor, list[list[int]]]:
        blocks_per_seq = -(-tokens // bs)
        n = batch * blocks_per_seq
        ids = torch.randperm(n, generator=gen).view(batch, blocks_per_seq).tolist()  # scattered, as in a busy pool
        return randn(n, hkv, 1, 2, bs, d)[:, :, 0], ids

    kv, tables = cache_for(context)
    decode = AttentionMetadata.build([1] * batch, [context] * batch, tables, bs, device)
    q = randn(batch, hq, d)
    s = _time_s(lambda: attention.paged_attention(q, kv, decode, d**-0.5), device, iters=iters)
    kv_bytes = batch * context * hkv * 2 * d * kv.element_size()
    _emit(stage="kernels", kernel="paged_decode", batch=batch, context=context, dtype=args.dtype,
          us=round(s * 1e6, 1), gbps=round(kv_bytes / s / 1e9, 3), copy_gbps=round(bw / 1e9, 1),
          fraction_of_copy=round(kv_bytes / s / bw, 3))

    prompt = 64 if args.quick else 2048
    kv, tables = cache_for(prompt)
    prefill = AttentionMetadata.build([prompt] * batch, [prompt] * batch, tables, bs, device)
    q = randn(batch * prompt, hq, d)
    s = _time_s(lambda: attention.paged_attention(q, kv, prefill, d**-0.5), device, iters=max(iters // 2, 1))
    flops = batch * 2 * 2 * hq * d * prompt * (prompt + 1) / 2  # QK^T and PV over the causal half
    _emit(stage="kernels", kernel="paged_prefill", batch=batch, prompt=prompt, dtype=args.dtype,
          ms=round(s * 1e3, 3), tflops=round(flops / s / 1e12, 4))
    return 0


# --- parity ---------------------------------------------------------------------------------


def stage_parity(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    from kvxfer import LLM, SamplingParams
    from kvxfer.bench.engine import preset_dir

    model_dir = preset_dir(args.preset)
    dtype = getattr(torch, args.dtype)
    rng = random.Random(0)
    lengths = [3, 15, 16, 17, 40, 64, 100, 200][: 3 if args.quick else None]
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]
    with LLM(model_dir, device=args.device, dtype=args.dtype, num_kv_blocks=256) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    exact = ties = 0
    mismatches = []
    with torch.inference_mode():
        for prompt, out in zip(prompts, outs):
            ids = torch.tensor([prompt], device=args.device)
            result = hf(ids, use_cache=True)
            for i, token in enumerate(out.output_token_ids):
                lp = torch.log_softmax(result.logits[0, -1].float(), -1)
                top = lp.topk(2)
                best = int(top.indices[0])
                if best != token:
                    gap = float(top.values[0] - top.values[1])
                    if gap < args.tie and token == int(top.indices[1]):
                        ties += 1
                    else:
                        mismatches.append({"prompt_len": len(prompt), "position": i, "hf": best, "kvxfer": token,
                                           "gap": round(gap, 4)})
                    break
                result = hf(torch.tensor([[token]], device=args.device), past_key_values=result.past_key_values,
                            use_cache=True)
            else:
                exact += 1
    _emit(stage="parity", preset=args.preset, dtype=args.dtype, device=args.device, prompts=len(prompts),
          tokens=args.max_tokens, exact=exact, near_ties=ties, tie_threshold=args.tie, mismatches=mismatches)
    return 1 if mismatches else 0


# --- decode ---------------------------------------------------------------------------------


def stage_decode(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    from kvxfer import LLM, SamplingParams
    from kvxfer.bench.engine import preset_dir
    from kvxfer.models import load_model_config

    preset = "tiny-qwen3" if args.quick else args.preset
    batches = [1, 4] if args.quick else [1, 32, 128]
    context, steps = (20, 3) if args.quick else (1024, 32)
    model_dir = preset_dir(preset)
    device = torch.device(args.device)
    dtype_bytes = getattr(torch, args.dtype).itemsize
    params = 0
    for path in glob.glob(os.path.join(model_dir, "*.safetensors")):
        with safe_open(path, "pt") as f:
            params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    spec = load_model_config(model_dir).kv_cache_spec(16, args.dtype)
    kv_per_token = spec.bytes_per_block(1) // 16
    bw = copy_bandwidth(device, (16 if args.quick else 2048) << 20)
    modes = ["eager"] + (["cuda_graphs"] if device.type == "cuda" else [])
    step_s: dict[tuple[str, int], float] = {}
    for mode in modes:
        extra = {"enforce_eager": mode == "eager"} if device.type == "cuda" else {}
        blocks = max(batches) * (-(-(context + steps + 8) // 16)) + 16
        with LLM(model_dir, device=args.device, dtype=args.dtype, num_kv_blocks=blocks,
                 max_num_seqs=max(batches), max_num_batched_tokens=max(batches) * context, **extra) as llm:
            for batch in batches:
                step_s[(mode, batch)] = _decode_step_seconds(llm, SamplingParams, batch, context, steps)
    for batch in batches:
        read = params * dtype_bytes + batch * (context + steps // 2) * kv_per_token
        floor = read / bw
        row = {f"{m}_ms": round(step_s[(m, batch)] * 1e3, 3) for m in modes}
        # Significant figures, not decimals: a slow step (95 ms against a 0.03 ms floor on a busy
        # CPU) rounded to 0.0 at three decimals.
        row.update({f"{m}_floor_fraction": float(f"{floor / step_s[(m, batch)]:.3g}") for m in modes})
        _emit(stage="decode", preset=preset, dtype=args.dtype, batch=batch, context=context,
              floor_ms=float(f"{floor * 1e3:.4g}"),
              weights_gb=round(params * dtype_bytes / 1e9, 3), copy_gbps=round(bw / 1e9, 1), **row)
    return 0


def _decode_step_seconds(llm, sampling_params, batch: int, context: int, steps: int) -> float:
    """Mean wall time of an engine step decoding `batch` sequences of about `context` tokens."""
    engine = llm.engine
    rng = random.Random(batch)
    ids = [f"decode-{batch}-{i}" for i in range(batch)]
    params = sampling_params(max_tokens=steps + 4, ignore_eos=True)
    for rid in ids:
        engine.add_request(rid, [rng.randrange(3, 500) for _ in range(context)], params)
    produced = dict.fromkeys(ids, 0)
    while min(produced.values()) < 2:  # every prompt prefilled, and one decode step behind us
        for out in engine.step():
            produced[out.request_id] = len(out.output_token_ids)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()  # returns sampled tokens to the host: the step is complete
    seconds = (time.perf_counter() - start) / steps
    while engine.has_unfinished_requests():
        engine.step()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_stages", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    sub.add_parser("env", help="on the GPU when there is one, else on the host")
    for name in ("kernels", "parity", "decode"):
        p = sub.add_parser(name)
        p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
        p.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not a measurement)")
        p.add_argument("--dtype", default="bfloat16")
        if name in ("parity", "decode"):
            p.add_argument("--preset", default="tiny-qwen3" if name == "parity" else "qwen3-0.6b-shape")
        if name == "parity":
            p.add_argument("--max-tokens", type=int, default=16)
            p.add_argument("--tie", type=float, default=0.05,
                           help="log-prob gap under which HF's top-1/top-2 count as a tie (bf16 rounding)")
    args = parser.parse_args(argv)
    if getattr(args, "device", None) == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU")
    return {"env": stage_env, "kernels": stage_kernels, "parity": stage_parity, "decode": stage_decode}[args.stage](args)


if __name__ == "__main__":
    raise SystemExit(main())
