"""`python -m kvxfer.bench.attention`: the CPU attention ops timed against their previous version.

Times `torch_ops.paged_attention` on random paged caches for prefill (no cached prefix),
chunked prefill over a cached prefix and batched decode, at the head shapes of tiny-qwen3 and
qwen3-0.6b, next to the implementation it replaced (kept here, not in the package) and a lower
bound: one SDPA call on contiguous K/V that needs no paging at all. Variants run interleaved
and each figure is the best of `--repeats` rounds, so a busy machine shifts them together.
`--model PRESET` times whole model forward steps (prefill of each `--prefill` length, decode
of each batch and context) with the old and the new ops swapped in turn in one process;
`--linear ROWS...` times one bfloat16 projection as a bfloat16 and as a float32 GEMM;
`--ttft PRESET` times colocated prefills through `LLM.generate` (one output token) for
whichever kvxfer is on `PYTHONPATH`, and with `--vllm-python` vLLM's on the same prompts,
alternating in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch
import torch.nn.functional as F

from kvxfer.layers import torch_ops
from kvxfer.layers.attention import AttentionMetadata, layers_of

SHAPES = {"tiny-qwen3": (8, 4, 32), "qwen3-0.6b": (16, 8, 128)}  # (query heads, KV heads, head size)


def _old_paged_attention(query, kv_layer, attn, scale):
    """The implementation before the causal fast path and the per-step decode plans (no windows):
    it gathers the paged context per sequence; the attention over it is today's `_attend`."""
    attend = torch_ops._attend
    out = query.new_empty(query.shape[0], query.shape[1], kv_layer.shape[4])
    starts = attn.query_start_loc_host
    decodes = []
    for b in range(len(attn.seq_lens_host)):
        q_len = starts[b + 1] - starts[b]
        if q_len == 1:
            decodes.append(b)
        elif q_len > 1:
            start, end = starts[b], starts[b + 1]
            seq_len = attn.seq_lens_host[b]
            keys, values = _old_gather(kv_layer, attn.block_tables[b, : -(-seq_len // kv_layer.shape[3])])
            keys, values = keys[:, :seq_len], values[:, :seq_len]
            rows = torch.arange(q_len)[:, None] + (seq_len - q_len)
            mask = torch.arange(seq_len)[None, :] <= rows
            out[start:end] = attend(query[start:end].transpose(0, 1), keys, values, mask, scale).transpose(0, 1)
    if decodes:
        longest = -(-max(attn.seq_lens_host[b] for b in decodes) // kv_layer.shape[3]) * kv_layer.shape[3]
        chunk = max(1, (1 << 26) // (longest * kv_layer[0, :, :, 0].numel()))
        for i in range(0, len(decodes), chunk):
            group = decodes[i : i + chunk]
            index = torch.tensor(group)
            lens = attn.seq_lens[index]
            tokens = attn.query_start_loc[index].long()
            num_blocks = max(-(-attn.seq_lens_host[b] // kv_layer.shape[3]) for b in group)
            columns = torch.arange(num_blocks).clamp_(max=attn.block_tables.shape[1] - 1)
            columns = columns[None, :].expand(len(group), -1)
            keys, values = _old_gather(kv_layer, attn.block_tables[index[:, None], columns])
            mask = torch.arange(num_blocks * kv_layer.shape[3])[None, :] < lens[:, None]
            result = attend(query.index_select(0, tokens).unsqueeze(2), keys, values, mask[:, None, :], scale)
            out.index_copy_(0, tokens, result.squeeze(2))
    return out


def _old_gather(kv_layer, block_ids):
    num_blocks, heads, _, block_size, head_size = kv_layer.shape
    rows = (block_ids.long().unsqueeze(-2) * heads + torch.arange(heads).unsqueeze(-1)).reshape(-1)
    shape = (*block_ids.shape[:-1], heads, block_ids.shape[-1] * block_size, head_size)
    tiles = [kv_layer[:, :, s].reshape(num_blocks * heads, -1).index_select(0, rows).view(shape) for s in (0, 1)]
    return tiles[0], tiles[1]


def _case(shape: str, dtype: torch.dtype, seqs: list[tuple[int, int]], block_size: int, gen):
    """A paged cache holding sequences of `context` tokens, each adding its last `new`, per `seqs`."""
    hq, h, d = SHAPES[shape]
    blocks = [-(-context // block_size) for context, _ in seqs]
    cache = torch.randn(sum(blocks) + 1, h, 2, block_size, d, generator=gen).to(dtype)
    order = torch.randperm(sum(blocks) + 1, generator=gen).tolist()  # scattered, as in a real cache
    tables = [order[sum(blocks[:i]) : sum(blocks[: i + 1])] for i in range(len(seqs))]
    query = torch.randn(sum(new for _, new in seqs), hq, d, generator=gen).to(dtype)
    # Lower bound: the same attention on contiguous K/V, no paging: one SDPA call per run of
    # equal-shaped sequences (one call for the uniform cases), masked only for a cached prefix.
    runs: list[list] = []  # [(context, new), count]
    for context, new in seqs:
        if runs and runs[-1][0] == (context, new):
            runs[-1][1] += 1
        else:
            runs.append([(context, new), 1])
    bounds = []
    row = 0
    for (context, new), count in runs:
        q4 = query[row : row + count * new].view(count, new, hq, d).transpose(1, 2)
        row += count * new
        keys = torch.randn(count, h, context, d, generator=gen).to(dtype)
        values = torch.randn(count, h, context, d, generator=gen).to(dtype)
        mask = None
        if 1 < new < context:
            mask = torch.arange(context)[None, :] <= torch.arange(new)[:, None] + (context - new)
        bounds.append((q4, keys, values, mask, new == context))

    def bound():
        for q4, keys, values, mask, causal in bounds:
            F.scaled_dot_product_attention(q4, keys, values, attn_mask=mask, is_causal=causal, scale=0.1,
                                           enable_gqa=True)

    def fresh():  # the engine builds one metadata per step: time that too, and reuse no plan
        return AttentionMetadata.build([n for _, n in seqs], [c for c, _ in seqs], tables, block_size)

    return {
        "old": lambda: _old_paged_attention(query, cache, fresh(), 0.1),
        "new": lambda: torch_ops.paged_attention(query, cache, fresh(), 0.1),
        "sdpa_bound": bound,
    }


def _best_ms(variants: dict, repeats: int) -> dict[str, float]:
    best = {name: float("inf") for name in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in variants.items():  # interleaved: load changes hit every variant alike
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


def cases(args: argparse.Namespace):
    """(kind, [(context, new)] per sequence, context label, new-token label) of each row."""
    for n in args.prefill:
        yield "prefill", [(n, n)], n, n
    for prefix, n in args.chunked:
        yield "chunked", [(prefix + n, n)], prefix + n, n
    for batch in args.decode_batch:
        for ctx in args.decode_context:
            yield "decode", [(ctx, 1)] * batch, ctx, 1
    if args.mixed:
        # The engine workload of issue 9 (prompts of 64-256 tokens, 32 output tokens): a step of
        # `mixed` decodes at contexts 64-288, and a step of `mixed / 4` whole prefills of 64-256.
        rng = random.Random(0)
        yield "mixdec", [(rng.randint(64, 288), 1) for _ in range(args.mixed)], "64-288", 1
        prompts = [rng.randint(64, 256) for _ in range(max(1, args.mixed // 4))]
        yield "mixpre", [(n, n) for n in prompts], "64-256", "=ctx"


def _pairs(text: str) -> tuple[int, int]:
    prefix, _, new = text.partition("+")
    return int(prefix), int(new)


def model_steps(args: argparse.Namespace, dtype_name: str) -> None:
    """Whole-model forward steps of `args.model` with the previous and the current attention ops."""
    from kvxfer.bench.engine import preset_dir
    from kvxfer.models import build_model, load_model_config

    model_dir = preset_dir(args.model)
    config = load_model_config(model_dir)
    dtype = getattr(torch, dtype_name)
    model = build_model(config, dtype=dtype)
    model.load_weights(model_dir)
    spec = config.kv_cache_spec(args.block_size, dtype_name)
    steps = [(1, n, n) for n in args.prefill] + [(b, c, 1) for b in args.decode_batch for c in args.decode_context]
    num_blocks = max(b * -(-c // args.block_size) for b, c, _ in steps) + 1
    cache = torch.randn(num_blocks, *spec.block_shape(1), dtype=dtype)
    current = torch_ops.paged_attention

    def old(query, kv_layer, attn, scale, v_dim=None, sliding_window=None):
        if v_dim is not None or sliding_window is not None:
            raise ValueError("the previous implementation kept here covers full attention with K and V only")
        return _old_paged_attention(query, kv_layer, attn, scale)

    def step(batch: int, context: int, new: int, ops) -> None:
        blocks = -(-context // args.block_size)
        tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(batch)]
        meta = AttentionMetadata.build([new] * batch, [context] * batch, tables, args.block_size)
        ids = torch.randint(3, config.vocab_size, (batch * new,))
        positions = torch.arange(context - new, context).repeat(batch)
        torch_ops.paged_attention = ops  # looked up per call by kvxfer.layers.attention
        try:
            model(ids, positions, layers_of(cache), [meta] * config.num_layers)
        finally:
            torch_ops.paged_attention = current

    with torch.inference_mode():
        for batch, context, new in steps:
            if args.profile:
                _profile(f"{args.model} {dtype_name} batch {batch} context {context} new {new}",
                         lambda: step(batch, context, new, current), args.profile)
                continue
            ms = _best_ms({"old": lambda: step(batch, context, new, old),
                           "new": lambda: step(batch, context, new, current)}, args.repeats)
            print(json.dumps(dict(model=args.model, dtype=dtype_name, batch=batch, context=context, new_tokens=new,
                                  old_ms=round(ms["old"], 2), new_ms=round(ms["new"], 2),
                                  old_over_new=round(ms["old"] / ms["new"], 2))))


def linear_dtypes(rows: list[int], repeats: int) -> None:
    """qwen3-0.6b-shape projections (gate/up 1024 -> 6144, down 3072 -> 1024) with bfloat16
    inputs and weights, as a bfloat16 GEMM and as a float32 GEMM on upcast copies of both (the
    output rounded back: `linear._linear` from `_FLOAT32_GEMM_MIN_ROWS` rows), interleaved, best
    of `repeats`, ms."""
    gen = torch.Generator().manual_seed(0)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, AMX {torch.cpu._is_amx_tile_supported()}; best of {repeats}, ms")
    with torch.inference_mode():
        for out_features, in_features in ((6144, 1024), (1024, 3072)):
            weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
            for m in rows:
                x = torch.randn(m, in_features, generator=gen).bfloat16()
                ms = _best_ms({"bf16": lambda: F.linear(x, weight),
                               "f32": lambda: F.linear(x.float(), weight.float()).bfloat16()}, repeats)
                print(json.dumps(dict(weight=[out_features, in_features], rows=m, bfloat16_ms=round(ms["bf16"], 3),
                                      float32_ms=round(ms["f32"], 3), bf16_over_f32=round(ms["bf16"] / ms["f32"], 2))))


def _profile(title: str, fn, top: int) -> None:
    """`torch.profiler` over one call of `fn` after a warm-up: the `top` ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        wall_ms = (time.perf_counter() - start) * 1e3
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"# {title}: {wall_ms:.1f} ms wall (profiled), {total / 1e3:.1f} ms self CPU time")
    for e in events[:top]:
        print(f"  {e.key:<48} {100 * e.self_cpu_time_total / total:5.1f}% {e.self_cpu_time_total / 1e3:9.2f} ms "
              f"{e.count:6d} calls")


def ttft(args: argparse.Namespace) -> None:
    """Median wall time of `LLM.generate` of one token for a fresh prompt of each length, in ms.

    With `--vllm-python` the same prompts go to a vLLM peer (`vllm_peer.py`, mode "ttft", its own
    process) in the same run, alternating prompt by prompt, who goes first swapping each round, so
    a load change on the shared host hits both sides alike; the peer times its own `generate`.
    """
    import statistics

    from kvxfer import LLM, SamplingParams
    from kvxfer.bench.engine import preset_dir

    model_dir = preset_dir(args.ttft)
    peer = _TtftPeer(args, model_dir) if args.vllm_python else None
    llm = None
    try:
        llm = LLM(model_dir, dtype=args.dtype)
        rng = random.Random(0)
        params = SamplingParams(max_tokens=1, ignore_eos=True)
        llm.generate([[5] * 8], params)  # warm-up
        if peer is not None:
            peer.wait_ready()
        print(f"# {args.ttft} dtype {llm.engine.config.torch_dtype_name}, torch threads {torch.get_num_threads()}, "
              f"load average {os.getloadavg()[0]:.2f} at start")
        for n in args.prefill:
            times: dict[str, list[float]] = {"kvxfer": [], "vllm": []}
            for i in range(args.repeats):
                prompt = [rng.randrange(3, 500) for _ in range(n)]  # fresh ids: no prefix-cache hit
                sides = ["kvxfer", "vllm"] if peer is not None else ["kvxfer"]
                for side in sides if i % 2 == 0 else sides[::-1]:
                    if side == "vllm":
                        times["vllm"].append(peer.ttft_ms(prompt))
                        continue
                    start = time.perf_counter()
                    llm.generate([prompt], params)
                    times["kvxfer"].append((time.perf_counter() - start) * 1e3)
            row = dict(preset=args.ttft, dtype=args.dtype, prompt_tokens=n,
                       ttft_ms=round(statistics.median(times["kvxfer"]), 2))
            if peer is not None:
                vllm_ms = statistics.median(times["vllm"])
                row.update(vllm_ttft_ms=round(vllm_ms, 2), vllm_over_kvxfer=round(vllm_ms / row["ttft_ms"], 2))
            print(json.dumps(row))
        print(f"# load average {os.getloadavg()[0]:.2f} at end")
    finally:
        if llm is not None:
            llm.shutdown()
        if peer is not None:
            peer.close()


class _TtftPeer:
    """A vLLM process in the peer's "ttft" mode: one prompt per line in, one time per line out."""

    START_DEADLINE_S = 1800.0  # vLLM compiles its graph on the first start (minutes on 2 busy cores)
    PROMPT_DEADLINE_S = 600.0

    def __init__(self, args: argparse.Namespace, model_dir: str) -> None:
        import subprocess
        import tempfile

        from kvxfer.bench.engine import vllm_command, vllm_env, vllm_job

        job = vllm_job(model_dir, args.dtype, "cpu", "ttft", max(args.prefill) + 8, block_size=args.vllm_block_size,
                       max_num_seqs=8, max_num_batched_tokens=max(8192, max(args.prefill)), enforce_eager=False,
                       memory_fraction=0.2)
        self._dir = tempfile.TemporaryDirectory()
        job_path = os.path.join(self._dir.name, "job.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        self._log = open(os.path.join(self._dir.name, "vllm.log"), "w+")
        self._proc = subprocess.Popen(vllm_command(args.vllm_python, job_path), env=vllm_env(), text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)

    def _reply(self, deadline_s: float) -> dict:
        import select

        ready, _, _ = select.select([self._proc.stdout], [], [], deadline_s)
        line = self._proc.stdout.readline() if ready else ""
        if not line:
            self._log.seek(0)
            tail = self._log.read()[-3000:]
            raise RuntimeError(f"vLLM peer gave no reply within {deadline_s:.0f} s (exit {self._proc.poll()}):\n{tail}")
        return json.loads(line)

    def wait_ready(self) -> None:
        self._reply(self.START_DEADLINE_S)

    def ttft_ms(self, prompt: list[int]) -> float:
        self._proc.stdin.write(json.dumps(prompt) + "\n")
        self._proc.stdin.flush()
        return self._reply(self.PROMPT_DEADLINE_S)["ms"]

    def close(self) -> None:
        import subprocess

        self._proc.stdin.close()  # the peer's loop ends at end of input
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=60)
        self._log.close()
        self._dir.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--prefill", nargs="*", type=int, default=[16, 128, 512, 1024])
    parser.add_argument("--chunked", nargs="*", type=_pairs, default=[(512, 128), (768, 256)], help="PREFIX+NEW")
    parser.add_argument("--decode-batch", nargs="*", type=int, default=[1, 8, 32])
    parser.add_argument("--decode-context", nargs="*", type=int, default=[128, 1024])
    parser.add_argument("--mixed", type=int, default=32, help="engine-like mixed steps of N decodes (0: none)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row instead of a table")
    parser.add_argument("--model", metavar="PRESET", help="time whole-model forward steps instead")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="--model: profile one step of each case instead, printing the top N ops")
    parser.add_argument("--linear", nargs="*", type=int, metavar="ROWS",
                        help="time a bfloat16 projection as a bfloat16 and as a float32 GEMM at these row counts")
    parser.add_argument("--ttft", metavar="PRESET", help="time colocated LLM.generate prefills instead")
    parser.add_argument("--dtype", default="auto", help="engine dtype for --ttft")
    parser.add_argument("--vllm-python", help="--ttft: also time vLLM, alternating, with this Python")
    parser.add_argument("--vllm-block-size", type=int, default=128, help="--ttft: vLLM's KV block size")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ttft:
        return ttft(args)
    if args.linear:
        return linear_dtypes(args.linear, args.repeats)
    if args.model:
        for dtype_name in args.dtypes:
            model_steps(args, dtype_name)
        return None
    gen = torch.Generator().manual_seed(0)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s), block size {args.block_size}; "
          f"best of {args.repeats}, ms")
    if not args.json:
        print(f"{'shape':<11} {'dtype':<8} {'case':<8} {'B':>3} {'ctx':>5} {'new':>5} "
              f"{'old':>9} {'new':>9} {'bound':>9} {'old/new':>8}")
    with torch.inference_mode():
        for shape in args.shapes:
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                for kind, seqs, ctx, new in cases(args):
                    batch = len(seqs)
                    variants = _case(shape, dtype, seqs, args.block_size, gen)
                    # The figures are only worth reading if both versions compute the same thing.
                    got, want = variants["new"]().float(), variants["old"]().float()
                    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
                    ms = _best_ms(variants, args.repeats)
                    row = dict(shape=shape, dtype=dtype_name, case=kind, batch=batch, context=ctx, new_tokens=new, **ms)
                    if args.json:
                        print(json.dumps(row))
                    else:
                        print(f"{shape:<11} {dtype_name:<8} {kind:<8} {batch:>3} {ctx:>5} {new:>5} {ms['old']:>9.3f} "
                              f"{ms['new']:>9.3f} {ms['sdpa_bound']:>9.3f} {ms['old'] / ms['new']:>8.2f}")


if __name__ == "__main__":
    main()
