"""`LLM`: the offline API. Tokenizes prompts, feeds the engine, steps it until done."""

from __future__ import annotations

import itertools
import time
from typing import Any

from kvxfer.connectors.config import KVTransferConfig
from kvxfer.engine.config import EngineConfig
from kvxfer.engine.engine import LLMEngine
from kvxfer.engine.request import RequestOutput
from kvxfer.engine.sampling_params import SamplingParams

_STALLED_WAIT_S = 0.05  # at most this long between steps while requests only wait for remote KV


class LLM:
    def __init__(
        self,
        model_dir: str,
        tensor_parallel_size: int = 1,
        device: str = "cpu",
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        kv_transfer_config: KVTransferConfig | None = None,
        **engine_kwargs: Any,
    ) -> None:
        config = EngineConfig(
            model_dir=str(model_dir),
            tensor_parallel_size=tensor_parallel_size,
            device=device,
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            enable_prefix_caching=enable_prefix_caching,
            kv_transfer_config=kv_transfer_config,
            **engine_kwargs,
        )
        self.engine = LLMEngine(config)
        self.tokenizer = _load_tokenizer(config.model_dir)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        kv_transfer_params: dict[str, Any] | list[dict[str, Any] | None] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs in prompt order. Invalid input raises
        ValueError before any prompt is queued."""
        if isinstance(prompts, (str, tuple)) or (prompts and isinstance(prompts[0], int)):
            raise ValueError("prompts must be a list of strings or a list of token-id lists")
        n = len(prompts)
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * n
        kv_list = kv_transfer_params if isinstance(kv_transfer_params, list) else [kv_transfer_params] * n
        if len(params_list) != n or len(kv_list) != n:
            raise ValueError(f"{n} prompts but {len(params_list)} sampling params and {len(kv_list)} kv_transfer_params")
        requests = [
            self.engine.make_request(f"llm-{next(self._ids)}", self._tokenize(p), sp, kv)
            for p, sp, kv in zip(prompts, params_list, kv_list)
        ]
        for request in requests:
            self.engine.enqueue(request)
        order = {r.request_id: i for i, r in enumerate(requests)}
        results: list[RequestOutput | None] = [None] * n
        bar = _progress(n, use_tqdm)
        events = self.engine.executor.events
        woke = False
        while any(r is None for r in results):
            outputs = self.engine.step()
            for out in outputs:
                if out.finished and out.request_id in order:
                    if self.tokenizer is not None:
                        out.text = self.tokenizer.decode(out.output_token_ids, skip_special_tokens=True)
                    results[order[out.request_id]] = out
                    bar.update(1)
            if outputs or self.engine.last_step_num_tokens or woke:
                woke = False  # after a woken step, what its reports unblocked runs in the next one
            elif events is not None:
                # Only remote KV in flight: sleep until a rank reports; the deadline bounds a
                # report no rank wakes for.
                woke = events.wait(_STALLED_WAIT_S) > 0
            else:
                time.sleep(0.001)
        bar.close()
        return results

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.engine.config.model_dir} has no tokenizer; pass token ids")
            return self.tokenizer(prompt)["input_ids"]
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return list(prompt)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc="generate")


def _load_tokenizer(model_dir: str):
    """The checkpoint's tokenizer, or None when it ships none (token-id prompts only)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError):
        return None
