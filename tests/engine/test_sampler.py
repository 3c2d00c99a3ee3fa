"""The batched sampler against independent computations: greedy rows are the argmax, random
rows follow softmax(logits / T) restricted to the top-p nucleus, and a seeded row draws the
same token whatever it is batched with. Seeds are fixed, so every count below is deterministic."""

import torch

from kvxfer.engine.sampler import Sampler, SamplingInfo

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])


def info(i: int, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, n: int = 0) -> SamplingInfo:
    return SamplingInfo(f"r{i}", temperature, top_p, seed, None, n)


def test_random_rows_follow_the_tempered_distribution_and_greedy_rows_the_argmax():
    rows = 6000
    logits = LOGITS.repeat(rows, 1)
    infos = [info(i, temperature=0.0 if i % 3 == 0 else 1.5) for i in range(rows)]
    tokens = [t for t, _ in Sampler(torch.device("cpu"), seed=0)(logits, infos)]
    assert {tokens[i] for i in range(0, rows, 3)} == {0}
    drawn = torch.tensor([tokens[i] for i in range(rows) if i % 3])
    freq = torch.bincount(drawn, minlength=5).float() / drawn.numel()
    expected = torch.softmax(LOGITS / 1.5, dim=-1)
    assert (freq - expected).abs().max() < 0.03, (freq, expected)


def test_top_p_never_draws_outside_the_nucleus():
    rows = 2000
    # softmax(LOGITS): 0.53, 0.20, 0.12, 0.03, 0.07: with top_p 0.6 the nucleus is tokens {0, 1}.
    infos = [info(i, top_p=0.6) for i in range(rows)]
    tokens = [t for t, _ in Sampler(torch.device("cpu"), seed=1)(LOGITS.repeat(rows, 1), infos)]
    counts = torch.bincount(torch.tensor(tokens), minlength=5)
    assert counts[2:].sum() == 0 and counts[0] > counts[1] > 0
    expected = 0.53 / (0.53 + 0.20)
    assert abs(counts[0].item() / rows - expected) < 0.04


def test_a_seeded_row_draws_the_same_tokens_in_any_batch():
    def draws(sampler: Sampler, batch_before: int, steps: int = 8) -> list[int]:
        out = []
        for n in range(steps):
            infos = [info(i, temperature=1.0) for i in range(batch_before)] + [info(99, 2.0, seed=1234, n=n)]
            out.append(sampler(LOGITS.repeat(len(infos), 1), infos)[-1][0])
        return out

    alone = draws(Sampler(torch.device("cpu"), seed=0), 0)
    batched = draws(Sampler(torch.device("cpu"), seed=5), 7)
    assert alone == batched and len(set(alone)) > 1


def test_a_seeded_token_depends_on_its_index_not_on_earlier_draws():
    """The n-th token of a seeded request is the same whether this sampler drew tokens 0 .. n-1
    before (colocated) or none (a decode engine continuing from a prefill's first token), and
    the same seed at other indexes, or another seed, draws differently."""
    in_order = [Sampler(torch.device("cpu"), seed=0)(LOGITS[None], [info(1, 2.0, seed=7, n=n)])[0][0]
                for n in range(40)]
    fresh = [Sampler(torch.device("cpu"), seed=n)(LOGITS[None], [info(2, 2.0, seed=7, n=n)])[0][0]
             for n in reversed(range(40))]
    other_seed = [Sampler(torch.device("cpu"), seed=0)(LOGITS[None], [info(1, 2.0, seed=8, n=n)])[0][0]
                  for n in range(40)]
    assert in_order == fresh[::-1] and len(set(in_order)) > 1
    assert other_seed != in_order
