"""Sliding-window scenario for the hybrid presets (window 6, paged blocks of 4): prompts shorter
than, equal to and more than three times the window, one of them chunked, then decodes that
carry the short prompt across the window. Runs in one process or as a TP rank."""

from __future__ import annotations

import torch

from .harness import PagedRunner, recording_step

HYBRID_PRESETS = ["tiny-mistral-swa", "tiny-qwen3-hybrid", "tiny-gemma3"]
WINDOW = 6
PROMPT_LENS = (4, WINDOW, 3 * WINDOW + 2)
CHUNK = 7  # the long prompt arrives as 7 + 15 tokens: the second chunk reads a cached prefix
DECODE_STEPS = 8


def hybrid_prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def run_hybrid(runner: PagedRunner, prompts: list[list[int]], pick) -> list[tuple[int, int, torch.Tensor]]:
    """(sequence, position, logits) of every step's last tokens; `pick(seq, logits)` chooses."""
    p0, p1, p2 = prompts
    results, step = recording_step(runner, pick)
    for seq in range(3):
        runner.add(seq)
    t0, t1, _ = step([(0, p0), (1, p1), (2, p2[:CHUNK])])
    nxt = dict(zip((0, 2, 1), step([(0, [t0]), (2, p2[CHUNK:]), (1, [t1])])))
    for _ in range(DECODE_STEPS):
        nxt = dict(enumerate(step([(s, [nxt[s]]) for s in range(3)])))
    return results


def forced_pick(vocab: int):
    """Tokens independent of the logits (absent on TP ranks > 0): the same on every rank."""
    counts: dict[int, int] = {}

    def pick(seq: int, _logits) -> int:
        counts[seq] = counts.get(seq, 0) + 1
        return (seq * 37 + counts[seq] * 13) % (vocab - 3) + 3

    return pick


def hybrid_logits(
    model_dir: str,
    tp_rank: int = 0,
    tp_size: int = 1,
    greedy: bool = False,
    windows: bool = True,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """The scenario on this rank's shard; returns (results, every sequence's tokens).

    `windows=False` drops every layer's window (a negative control: HF must then disagree).
    """
    from kvxfer.models import build_model, load_model_config

    config = load_model_config(model_dir)
    model = build_model(config, tp_rank, tp_size, device, dtype)
    model.load_weights(model_dir)
    if not windows:
        for layer in model.layers:
            layer.self_attn.sliding_window = None
    runner = PagedRunner(model, config, tp_size, device=device, dtype=dtype)
    pick = (lambda seq, logits: int(logits.argmax())) if greedy else forced_pick(config.vocab_size)
    results = run_hybrid(runner, hybrid_prompts(config.vocab_size), pick)
    return results, runner.tokens


def hybrid_tp_logits(model_dir: str, rank: int, tp_size: int):
    """`hybrid_logits` on one TP rank (for `harness.run_ranks`); only rank 0 holds logits."""
    results, tokens = hybrid_logits(model_dir, rank, tp_size)
    assert rank == 0 or all(logits is None for _, _, logits in results)
    return results, tokens
