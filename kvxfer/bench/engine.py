"""`kvxfer bench engine`: kvxfer throughput against HF transformers `generate`, and against
vLLM (`--vllm-python`, the Python of a separate vLLM environment) on the same prompts.

All run greedy with EOS ignored, so every prompt yields exactly its output length; HF
runs batched with left padding. Throughput counts generated tokens (and, separately,
prompt + generated tokens) over the wall time of the whole batch. With `--repeat N` kvxfer
and vLLM alternate N times (the host may be shared) and the medians are compared; the CPU
time of each batch (its process, all threads; TP 1) is reported too, as the figure that a
busy shared host distorts least.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import tempfile
import time


def _length_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 1 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI with 1 <= LO <= HI, got {text!r}")
    return lo_i, hi_i


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvxfer.models.presets import PRESETS

    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=_length_range, default=(128, 128), help="N, or LO-HI drawn per prompt")
    parser.add_argument("--output-len", type=_length_range, default=(64, 64), help="N, or LO-HI drawn per prompt")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the kvxfer engine")
    parser.add_argument("--device", nargs="?", const="cuda", default="cpu", choices=["cpu", "cuda"],
                        help="--device alone means cuda")
    parser.add_argument("--model-dir", help="use this checkpoint instead of building the preset")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="kvxfer and vLLM dtype (auto: see EngineConfig.dtype)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="cuda: decode steps in CUDA graphs (experimental, opt-in until run on a GPU)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="cuda: share of the GPU's total memory the engine may use (default 0.9)")
    parser.add_argument("--hf-batch-size", type=int, default=0, help="HF generate batch (0: all prompts at once)")
    parser.add_argument("--skip-hf", action="store_true", help="do not run HF generate")
    parser.add_argument("--vllm-python", help="also run vLLM with this Python (a separate vLLM environment)")
    parser.add_argument("--vllm-eager", action="store_true", help="vLLM with enforce_eager (default: compiled)")
    parser.add_argument("--vllm-block-size", type=int, default=128,
                        help="vLLM KV block size (its CPU attention needs a multiple of 32)")
    parser.add_argument("--vllm-memory-fraction", type=float, default=0.3,
                        help="share of host RAM vLLM may reserve on CPU (its gpu_memory_utilization)")
    parser.add_argument("--repeat", type=int, default=1, help="alternate kvxfer and vLLM this many times")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON object")


def preset_dir(preset: str) -> str:
    """The preset's checkpoint in a cache dir keyed by its definition; built when missing."""
    from kvxfer.models.presets import PRESETS, make_model

    key = hashlib.sha256(repr(PRESETS[preset]).encode()).hexdigest()[:12]
    root = os.environ.get("KVXFER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kvxfer"))
    path = os.path.join(root, "models", f"{preset}-{key}")
    if not os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        tmp = f"{path}.tmp{os.getpid()}"
        make_model(preset, tmp)
        os.replace(tmp, path)
    return path


def make_workload(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(args.seed)
    prompts, outputs = [], []
    for _ in range(args.num_prompts):
        prompts.append([rng.randrange(3, vocab) for _ in range(rng.randint(*args.input_len))])
        outputs.append(rng.randint(*args.output_len))
    return prompts, outputs


def run_kvxfer(args, model_dir: str, prompts: list[list[int]], outputs: list[int]) -> tuple[float, float, list[list[int]]]:
    from kvxfer import LLM, SamplingParams

    cuda = {"enforce_eager": not args.cuda_graphs, "gpu_memory_utilization": args.gpu_memory_utilization}
    llm = LLM(model_dir, tensor_parallel_size=args.tp, device=args.device, dtype=args.dtype,
              block_size=args.block_size, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              **{k: v for k, v in cuda.items() if v is not None})
    try:
        warm_up(llm, prompts, outputs)
        params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in outputs]
        start, cpu_start = time.perf_counter(), time.process_time()
        results = llm.generate(prompts, params, use_tqdm=True)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        stats = llm.engine.stats()
    finally:
        llm.shutdown()
    produced = sum(len(r.output_token_ids) for r in results)
    if produced != sum(outputs):
        raise RuntimeError(f"kvxfer produced {produced} tokens, expected {sum(outputs)}")
    print(f"kvxfer: {stats['num_blocks']} KV blocks, {stats['num_preemptions']} preemptions")
    return seconds, cpu_seconds, [r.output_token_ids for r in results]


def run_vllm(args, model_dir: str, prompts: list[list[int]], outputs: list[int]) -> tuple[float, float, list[list[int]]]:
    """One offline vLLM run in a child process of the vLLM environment; (seconds, CPU seconds, output ids)."""
    job = vllm_job(model_dir, args.dtype, args.device, "batch", max(len(p) + n for p, n in zip(prompts, outputs)),
                   block_size=args.vllm_block_size, max_num_seqs=args.max_num_seqs,
                   max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.vllm_eager,
                   memory_fraction=args.vllm_memory_fraction)
    job.update(prompts=prompts, outputs=outputs)
    with tempfile.TemporaryDirectory() as tmp:
        job_path, result_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "result.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        subprocess.run(vllm_command(args.vllm_python, job_path, result_path), env=vllm_env(), check=True,
                       timeout=3600)
        with open(result_path) as f:
            result = json.load(f)
    return result["seconds"], result["cpu_seconds"], result["tokens"]


def vllm_job(model_dir: str, dtype: str, device: str, mode: str, max_model_len: int, **engine) -> dict:
    """The job `vllm_peer.py` reads (see its docstring), in the dtype kvxfer resolves `dtype` to
    (vLLM's own "auto" may resolve differently on CPU); `engine`: the remaining engine fields."""
    from kvxfer.engine.config import resolve_dtype
    from kvxfer.models import load_model_config

    dtype = resolve_dtype(dtype, device, load_model_config(model_dir).checkpoint_dtype)
    return {"model_dir": model_dir, "dtype": dtype, "mode": mode, "max_model_len": max_model_len, **engine}


def vllm_command(python: str, job_path: str, result_path: str = "") -> list[str]:
    from kvxfer.bench import vllm_peer

    return [python, vllm_peer.__file__, job_path] + ([result_path] if result_path else [])


def vllm_env() -> dict[str, str]:
    """The peer reads only its job file; PYTHONPATH must not put kvxfer's tree in front of vLLM's."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def token_agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(share of prompts whose outputs are equal, mean share of each output's equal leading tokens)."""
    equal = sum(x == y for x, y in zip(a, b)) / len(a)
    prefix = []
    for x, y in zip(a, b):
        n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        prefix.append(n / max(len(x), 1))
    return equal, sum(prefix) / len(prefix)


def warm_up(llm, prompts: list[list[int]], outputs: list[int]) -> None:
    """Compile, before timing, every kernel variant the run meets: prefill (one variant for
    any batch with a prompt token, mixed with decodes or not), non-split decode (short
    contexts), and split decode with each split-count variant (one per power of two; contexts
    of 512+ tokens split) up to the run's longest sequence."""
    from kvxfer import SamplingParams

    short = SamplingParams(max_tokens=4, ignore_eos=True)
    llm.generate(prompts[:2], short)
    longest = max(len(p) for p in prompts) + max(outputs)
    length = 512
    while length <= longest:  # one sequence decoding alone: as many splits as its length allows
        llm.generate([(prompts[0] * (length // len(prompts[0]) + 1))[: length - 2]], short)
        length *= 2


def run_hf(args, model_dir: str, prompts: list[list[int]], outputs: list[int]) -> float:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.float32 if args.device == "cpu" else torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    pad = model.generation_config.pad_token_id or 0
    batch = args.hf_batch_size or len(prompts)

    def generate(chunk: list[list[int]], new_tokens: int) -> None:
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=args.device)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=pad)

    with torch.inference_mode():
        generate(prompts[:2], 4)  # warm-up
        _sync(args.device)
        start = time.perf_counter()
        for i in tqdm(range(0, len(prompts), batch), desc="hf generate"):
            # A batch runs until its longest output; only the requested tokens are counted.
            generate(prompts[i : i + batch], max(outputs[i : i + batch]))
        _sync(args.device)
        return time.perf_counter() - start


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def main(args: argparse.Namespace) -> int:
    from kvxfer.models import load_model_config

    model_dir = args.model_dir or preset_dir(args.preset)
    vocab = load_model_config(model_dir).vocab_size
    prompts, outputs = make_workload(args, vocab)
    n_out, n_in = sum(outputs), sum(len(p) for p in prompts)
    print(f"{args.preset}: {len(prompts)} prompts, {n_in} prompt + {n_out} output tokens, "
          f"tp={args.tp}, device={args.device}")
    result = {"preset": args.preset, "num_prompts": len(prompts), "input_tokens": n_in, "output_tokens": n_out,
              "tp": args.tp, "device": args.device}
    kv_runs, kv_cpu, vllm_runs, vllm_cpu = [], [], [], []
    for i in range(max(args.repeat, 1)):
        kv_s, cpu_s, kv_tokens = run_kvxfer(args, model_dir, prompts, outputs)
        kv_runs.append(kv_s)
        kv_cpu.append(cpu_s)
        print(f"kvxfer: {kv_s:.2f} s ({cpu_s:.2f} CPU s), {n_out / kv_s:.1f} output tok/s, "
              f"{(n_in + n_out) / kv_s:.1f} total tok/s")
        if args.vllm_python:
            vllm_s, cpu_s, vllm_tokens = run_vllm(args, model_dir, prompts, outputs)
            vllm_runs.append(vllm_s)
            vllm_cpu.append(cpu_s)
            print(f"vllm: {vllm_s:.2f} s ({cpu_s:.2f} CPU s), {n_out / vllm_s:.1f} output tok/s; run {i + 1}: "
                  f"ratio kvxfer / vllm {vllm_s / kv_s:.2f}x (CPU time {cpu_s / kv_cpu[-1]:.2f}x)")
    kv_s, kv_c = statistics.median(kv_runs), statistics.median(kv_cpu)
    result.update(kvxfer_seconds=kv_s, kvxfer_runs=kv_runs, kvxfer_cpu_runs=kv_cpu,
                  kvxfer_output_tok_s=n_out / kv_s, kvxfer_total_tok_s=(n_in + n_out) / kv_s)
    if args.vllm_python:
        vllm_s, vllm_c = statistics.median(vllm_runs), statistics.median(vllm_cpu)
        equal, prefix = token_agreement(kv_tokens, vllm_tokens)
        result.update(vllm_seconds=vllm_s, vllm_runs=vllm_runs, vllm_cpu_runs=vllm_cpu,
                      vllm_output_tok_s=n_out / vllm_s, vllm_ratio=vllm_s / kv_s, vllm_cpu_ratio=vllm_c / kv_c,
                      vllm_equal_outputs=equal, vllm_equal_prefix=prefix)
        print(f"medians over {len(kv_runs)} alternating runs: kvxfer {kv_s:.2f} s ({kv_c:.2f} CPU s), "
              f"vllm {vllm_s:.2f} s ({vllm_c:.2f} CPU s); ratio kvxfer / vllm (throughput): "
              f"{vllm_s / kv_s:.2f}x wall, {vllm_c / kv_c:.2f}x CPU time")
        print(f"greedy outputs equal to vllm's: {equal:.0%} of prompts, {prefix:.0%} of tokens before a divergence")
    if not args.skip_hf:
        hf_s = run_hf(args, model_dir, prompts, outputs)
        result.update(hf_seconds=hf_s, hf_output_tok_s=n_out / hf_s, ratio=hf_s / kv_s)
        print(f"hf generate: {hf_s:.2f} s, {n_out / hf_s:.1f} output tok/s")
        print(f"ratio kvxfer / hf: {hf_s / kv_s:.2f}x")
    if args.json:
        print(json.dumps(result))
    return 0
