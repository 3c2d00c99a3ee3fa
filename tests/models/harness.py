"""A minimal paged-KV driver for model tests: sequences with block tables over one cache tensor
in the contract layout, stepped in flattened mixed batches (no engine involved)."""

from __future__ import annotations

import torch

from kvxfer.layers.attention import AttentionMetadata, layers_of

BLOCK = 4

# Prompt lengths: shorter than a block, an exact multiple of the block, and one prefilled in
# two chunks (6 + 5).
PROMPT_LENS = (3, 8, 11)
CHUNK = 6
DECODE_STEPS = 4


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


class PagedRunner:
    def __init__(self, model, model_config, tp_size: int, num_blocks: int = 48, device="cpu", dtype=torch.float32):
        spec = model_config.kv_cache_spec(BLOCK, dtype)
        self.cache = torch.zeros((num_blocks, *spec.block_shape(tp_size)), dtype=dtype, device=device)
        self.device = device
        self.model = model
        self.free = list(range(num_blocks))[::-1]  # hand out blocks in a non-trivial order
        self.free = self.free[1::2] + self.free[0::2]
        self.tables: dict[int, list[int]] = {}
        self.tokens: dict[int, list[int]] = {}  # every token whose KV is (or is being) cached

    def add(self, seq: int, shared_from: int | None = None, shared_blocks: int = 0) -> None:
        """A new sequence, optionally starting with another one's first full blocks (a prefix hit)."""
        self.tables[seq] = list(self.tables[shared_from][:shared_blocks]) if shared_from is not None else []
        self.tokens[seq] = list(self.tokens[shared_from][: shared_blocks * BLOCK]) if shared_from is not None else []

    @torch.no_grad()
    def step(self, work: list[tuple[int, list[int]]]) -> torch.Tensor | None:
        """Run one batch; `work` is (sequence, its new tokens). Returns each sequence's last-token logits."""
        ids, positions, query_lens, seq_lens, tables = [], [], [], [], []
        for seq, new in work:
            start = len(self.tokens[seq])
            self.tokens[seq].extend(new)
            total = len(self.tokens[seq])
            while len(self.tables[seq]) * BLOCK < total:
                self.tables[seq].append(self.free.pop())
            ids.extend(new)
            positions.extend(range(start, total))
            query_lens.append(len(new))
            seq_lens.append(total)
            tables.append(self.tables[seq])
        attn = AttentionMetadata.build(query_lens, seq_lens, tables, BLOCK, self.device)
        ids_t = torch.tensor(ids, device=self.device)
        layers = layers_of(self.cache)  # every layer in one tensor, all sharing one block table
        hidden = self.model(ids_t, torch.tensor(positions, device=self.device), layers, [attn] * len(layers))
        last = torch.tensor(attn.query_start_loc_host[1:], device=self.device) - 1
        logits = self.model.compute_logits(hidden[last])
        return logits.cpu() if logits is not None else None


def recording_step(runner: PagedRunner, pick):
    """(results, step): `step(work)` runs one batch, appends (sequence, position, logits) of
    each sequence's last token to `results`, and returns the tokens `pick(seq, logits)` chose."""
    results = []

    def step(work):
        logits = runner.step(work)
        chosen = []
        for b, (seq, _) in enumerate(work):
            row = logits[b] if logits is not None else None
            results.append((seq, len(runner.tokens[seq]) - 1, row))
            chosen.append(pick(seq, row))
        return chosen

    return results, step


def run_scenario(runner: PagedRunner, prompts: list[list[int]], pick) -> list[tuple[int, int, torch.Tensor]]:
    """Prefill (one prompt chunked), mixed prefill+decode, a cached-prefix prefill, decodes.

    `pick(seq, logits)` chooses each sequence's next token. Returns (sequence, position,
    logits) for every computed last token, with logits None on non-zero TP ranks.
    """
    p0, p1, p2 = prompts
    results, step = recording_step(runner, pick)
    for seq in range(3):
        runner.add(seq)
    t0, t1, _ = step([(0, p0), (1, p1), (2, p2[:CHUNK])])
    t0, t2, t1 = step([(0, [t0]), (2, p2[CHUNK:]), (1, [t1])])
    # Sequence 3 shares sequence 1's two full prompt blocks and prefills 4 more tokens over them.
    runner.add(3, shared_from=1, shared_blocks=2)
    suffix = [(x * 7 + 5) % 500 + 3 for x in p1[:4]]
    t0, t1, t2, t3 = step([(0, [t0]), (1, [t1]), (2, [t2]), (3, suffix)])
    nxt = {0: t0, 1: t1, 2: t2, 3: t3}
    for _ in range(DECODE_STEPS):
        toks = step([(s, [nxt[s]]) for s in range(4)])
        nxt = dict(enumerate(toks))
    return results


def forced_tokens(vocab: int):
    """A `pick` that ignores logits (absent on TP ranks > 0): the same tokens on every rank."""
    counts: dict[int, int] = {}

    def pick(seq: int, _logits) -> int:
        counts[seq] = counts.get(seq, 0) + 1
        return (seq * 31 + counts[seq] * 17) % (vocab - 3) + 3

    return pick


def scenario_logits(
    model_dir: str, tp_rank: int = 0, tp_size: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> list[tuple[int, int, torch.Tensor]]:
    """The scenario with forced tokens on this rank's shard of the model."""
    from kvxfer.models import build_model, load_model_config

    config = load_model_config(model_dir)
    model = build_model(config, tp_rank, tp_size, device, dtype)
    model.load_weights(model_dir)
    runner = PagedRunner(model, config, tp_size, device=device, dtype=dtype)
    return run_scenario(runner, make_prompts(config.vocab_size), forced_tokens(config.vocab_size))


def run_ranks(compute, tp_size: int, jobs: list[tuple[str, str]], out_dir: str, timeout_s: float = 240) -> None:
    """Run `compute(model_dir, rank, tp_size)` for every `(name, model_dir)` job on `tp_size` real
    processes over gloo; rank 0 saves each job's result as `out_dir/<name>.pt`. `compute` is a
    module-level function (the ranks are spawned)."""
    import os
    import time

    import torch.multiprocessing as mp

    # A file store (a fresh path in out_dir): no probed TCP port another process could take.
    store = os.path.join(out_dir, "rendezvous")
    ctx = mp.start_processes(
        _rank_main, args=(tp_size, store, compute, jobs, out_dir), nprocs=tp_size, join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"TP {tp_size} ranks did not finish in {timeout_s}s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=10)


def _rank_main(rank: int, tp_size: int, store: str, compute, jobs: list[tuple[str, str]], out_dir: str) -> None:
    import os
    import sys
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=tp_size, timeout=timedelta(seconds=240)
    )
    try:
        for name, model_dir in jobs:
            result = compute(model_dir, rank, tp_size)
            if rank == 0:
                torch.save(result, os.path.join(out_dir, f"{name}.pt"))
        # Leave together: no rank tears down its gloo pairs while a peer may still be finishing
        # the last collective.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalization: gloo's threads torn down there aborted a rank that had
    # finished its work (CI, once: "terminate called without an active exception", SIGABRT).
    # Everything this rank owes is on disk; its exit code still tells run_ranks it succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def tp_logits(model_dir: str, rank: int, tp_size: int):
    """`scenario_logits` on one TP rank; only rank 0 holds logits."""
    results = scenario_logits(model_dir, rank, tp_size)
    assert rank == 0 or all(logits is None for _, _, logits in results)
    return results
