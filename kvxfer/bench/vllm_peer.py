"""The vLLM side of `kvxfer bench engine --vllm-python`: runs a workload on vLLM, offline.

Run by path with the Python of a separate vLLM environment (vLLM is a benchmark peer, never a
kvxfer dependency), so this file imports nothing from kvxfer. It reads one JSON job
`{model_dir, dtype, prompts, outputs, block_size, max_num_seqs, max_num_batched_tokens,
enforce_eager}` from the file named by argv[1] and writes `{seconds, tokens}` to argv[2]:
the wall time of the whole batch (after a warm-up) and each prompt's greedy output ids.
"""

from __future__ import annotations

import json
import sys
import time


def main(job_path: str, result_path: str) -> None:
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
        seed=0,
    )
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)

    llm.generate(prompts[:2], [params(4)] * 2, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    results = llm.generate(prompts, [params(n) for n in job["outputs"]], use_tqdm=False)
    seconds = time.perf_counter() - start
    with open(result_path, "w") as f:
        json.dump({"seconds": seconds, "tokens": [list(r.outputs[0].token_ids) for r in results]}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
