"""The vLLM side of `kvxfer bench engine --vllm-python` and of `python -m kvxfer.bench.attention
--ttft PRESET --vllm-python`: runs a workload on vLLM, offline.

Run by path with the Python of a separate vLLM environment (vLLM is a benchmark peer, never a
kvxfer dependency), so this file imports nothing from kvxfer. It reads one JSON job
`{model_dir, dtype, block_size, max_num_seqs, max_num_batched_tokens, enforce_eager,
memory_fraction, max_model_len, mode}` from the file named by argv[1].

- `mode` "batch" (with `prompts` and `outputs`): writes `{seconds, cpu_seconds, tokens}` to argv[2]:
  the wall and CPU time of the whole batch (after a warm-up) and each prompt's greedy output ids.
- `mode` "ttft": after a warm-up writes `{"ready": true}`, then for each line of stdin (a JSON
  list of prompt token ids) generates one token and writes `{"ms": wall time of that generate}`,
  one JSON line each, until stdin closes; so the caller can alternate single prompts between
  kvxfer and vLLM. Those lines go to the original stdout; vLLM's own prints go to stderr.

vLLM's engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 unless set), so the
CPU time counts all of its work, as kvxfer's does for its in-process rank 0.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(job_path: str, result_path: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # The protocol stream is a private copy of stdout; anything vLLM prints lands on stderr.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    from vllm import LLM, SamplingParams

    with open(job_path) as f:
        job = json.load(f)
    llm = LLM(
        model=job["model_dir"],
        dtype=job["dtype"],
        # Token-id prompts in, token ids out: no text work on either side.
        skip_tokenizer_init=True,
        block_size=job["block_size"],
        max_num_seqs=job["max_num_seqs"],
        max_num_batched_tokens=job["max_num_batched_tokens"],
        enforce_eager=job["enforce_eager"],
        # On CPU this is the share of host RAM vLLM reserves (weights + KV); its default, 0.92,
        # refuses to start on a host where anything else holds memory.
        gpu_memory_utilization=job["memory_fraction"],
        # The workload's longest sequence, not the checkpoint's 40k positions, sizes its KV check.
        max_model_len=job["max_model_len"],
        seed=0,
    )

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)

    if job["mode"] == "ttft":
        llm.generate([{"prompt_token_ids": [5] * 8}], params(1), use_tqdm=False)  # warm-up
        protocol.write(json.dumps({"ready": True}) + "\n")
        for line in sys.stdin:
            prompt = {"prompt_token_ids": json.loads(line)}
            start = time.perf_counter()
            llm.generate([prompt], params(1), use_tqdm=False)
            protocol.write(json.dumps({"ms": (time.perf_counter() - start) * 1e3}) + "\n")
        return
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    llm.generate(prompts[:2], [params(4)] * 2, use_tqdm=False)  # warm-up
    start, cpu_start = time.perf_counter(), time.process_time()
    results = llm.generate(prompts, [params(n) for n in job["outputs"]], use_tqdm=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    with open(result_path, "w") as f:
        tokens = [list(r.outputs[0].token_ids) for r in results]
        json.dump({"seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": tokens}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
